"""RREDCoT: reward redistribution over the segments of a chain of thought.

Pure, vectorized tensor functions (no model, no config objects, no I/O). The model calls that
produce log-probs and entropies happen elsewhere; this file only does the arithmetic.

Reference
---------
* RREDCoT -- reward redistribution for chains of thought, arXiv:2606.06475. A final-answer
  reward is a delayed reward; RUDDER-style redistribution (Arjona-Medina et al.,
  arXiv:1806.07857) gives each segment of the chain of thought the change in expected return it
  caused, ``r_i = V(s_i) - V(s_{i-1})``, where ``s_i`` is the prefix up to the end of segment i.
  The paper segments by keywords, by token entropy, or both, and estimates ``V`` with the model
  itself (no new generation), an importance-sampling estimator among others.

What is ours (the paper's text is not available to us; see docs/algorithms.md section 4)
-------------------------------------------------------------------------------------------
* Segmentation rules: a delimiter token *ends* its segment (the next token starts a new one);
  a high-entropy token *starts* a new segment ("forking token"); the entropy threshold is a
  per-sequence quantile over unmasked tokens, compared with a strict ``>``; ``min_len`` is
  enforced greedily from left to right, and a boundary is also dropped when fewer than
  ``min_len`` tokens would remain after it, so every segment has at least ``min_len`` tokens
  (unless the whole sequence is shorter).
* :func:`redistribute` replaces the value after the last segment by the observed return, so the
  segment rewards telescope to ``return - V(s_0)`` (or to the return with ``include_baseline``).
* :func:`segment_advantages` uses reward-to-go and normalizes over all valid segments of a
  prompt group (not per segment position: positions do not align across samples).
* The two value estimators (:func:`answer_prob_values`, :func:`importance_values`) are our
  reading; see their docstrings.

Shapes: ``B`` sequences, ``L`` tokens, ``S`` segments (padded to the batch maximum), ``J``
candidate continuations. ``seg_id == -1`` marks masked tokens; valid segments of a row are the
left-aligned ids ``0 .. n_b - 1``.
"""
from __future__ import annotations

import torch
from torch import Tensor

SEG_SCALES = ("std", "none")


# ---------------------------------------------------------------- segmentation


def _rank(mask: Tensor) -> Tensor:
    """Each token's index among the unmasked tokens of its row (meaningful only where ``mask``)."""
    return mask.long().cumsum(dim=1) - 1  # [B, L]


def _compact(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Left-align the unmasked entries of each row.

    Returns ``(compacted [B, L], rank [B, L])``: ``compacted[b, r]`` is the r-th unmasked entry
    of row b (zero beyond the row's count); ``rank[b, t]`` is token t's index among the unmasked
    tokens of its row (meaningful only where ``mask``).
    """
    b, length = x.shape
    rank = _rank(mask)  # [B, L]
    idx = torch.where(mask, rank, torch.full_like(rank, length))  # [B, L]; masked -> dump column
    out = torch.zeros(b, length + 1, dtype=x.dtype, device=x.device)  # [B, L+1]
    out.scatter_(1, idx, x)
    return out[:, :length], rank  # [B, L], [B, L]


def _enforce_min_len(start: Tensor, n: Tensor, min_len: int) -> Tensor:
    """Greedy left-to-right selection of segment starts at least ``min_len`` apart.

    ``start [B, L]`` bool candidate starts in rank space, ``n [B]`` unmasked tokens per row.
    Rank 0 and ranks ``>= n`` never start a segment. A start at rank r is kept when it lies
    ``>= min_len`` after the last kept start (or 0) and leaves ``>= min_len`` tokens
    (``r <= n - min_len``).

    The loop runs once per kept segment (vectorized over rows and tokens), not once per token.
    """
    b, length = start.shape
    r = torch.arange(length, device=start.device).expand(b, length)  # [B, L]
    start = start & (r > 0) & (r < n.unsqueeze(1))  # [B, L]
    if min_len <= 1:
        return start
    eligible = start & (r <= (n - min_len).unsqueeze(1))  # [B, L]
    last = torch.zeros(b, dtype=torch.long, device=start.device)  # [B] start of current segment
    kept = torch.zeros_like(start)  # [B, L]
    while True:
        ok = eligible & (r >= (last + min_len).unsqueeze(1))  # [B, L]
        nxt = torch.where(ok, r, torch.full_like(r, length)).min(dim=1).values  # [B]
        found = nxt < length  # [B]
        if not bool(found.any()):
            return kept
        kept |= r == nxt.unsqueeze(1)  # rows without a find have nxt == L, never matched
        last = torch.where(found, nxt, last)  # [B]


def _ids_from_starts(start: Tensor, rank: Tensor, mask: Tensor) -> Tensor:
    """Segment ids per token from kept starts in rank space; -1 where masked."""
    seg_rank = start.long().cumsum(dim=1)  # [B, L] in rank space
    seg = seg_rank.gather(1, rank.clamp_min(0))  # [B, L] back to token positions
    return torch.where(mask, seg, torch.full_like(seg, -1))  # [B, L]


def _as_batch(x: Tensor, name: str) -> tuple[Tensor, bool]:
    if x.dim() == 1:
        return x.unsqueeze(0), True
    if x.dim() == 2:
        return x, False
    raise ValueError(f"{name} must be [L] or [B, L], got shape {tuple(x.shape)}")


def _delimiter_starts(token_ids: Tensor, mask: Tensor, boundary_token_ids: Tensor) -> Tensor:
    """Candidate starts in rank space: the unmasked token after each unmasked delimiter."""
    boundary_token_ids = torch.as_tensor(boundary_token_ids, device=token_ids.device)
    is_bnd = torch.isin(token_ids, boundary_token_ids) & mask  # [B, L]
    bnd_c, _ = _compact(is_bnd.long(), mask)  # [B, L] rank space
    start = torch.zeros_like(bnd_c, dtype=torch.bool)  # [B, L]
    start[:, 1:] = bnd_c[:, :-1] > 0
    return start  # a start at rank n (delimiter last) is dropped by _enforce_min_len


def _entropy_starts(entropy: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """Candidate starts in rank space: unmasked tokens above the row's entropy quantile."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    ent = entropy if entropy.is_floating_point() else entropy.to(torch.get_default_dtype())
    nan = torch.full_like(ent, float("nan"))
    thresh = torch.nanquantile(torch.where(mask, ent, nan), quantile, dim=1)  # [B]; NaN if empty
    high = (ent > thresh.unsqueeze(1)) & mask  # [B, L]; NaN threshold -> False
    high_c, _ = _compact(high.long(), mask)  # [B, L] rank space
    return high_c > 0


def segment_by_delimiters(
    token_ids: Tensor,
    mask: Tensor,
    boundary_token_ids: Tensor,
    min_len: int = 1,
) -> Tensor:
    """Keyword segmentation (RREDCoT, arXiv:2606.06475): a segment ends at each delimiter token.

    A new segment starts at the first unmasked token *after* each unmasked token whose id is in
    ``boundary_token_ids`` (e.g. the ids of ``"\\n\\n"``, ``"Step"``, ``"So"``, ``"Therefore"``,
    ``"</think>"`` pieces, picked by the caller from its tokenizer). Masked tokens are skipped:
    they neither end a segment nor count towards ``min_len``, so padding (left or right) and
    holes in the mask do not change the ids of unmasked tokens.

    Args:
        token_ids: ``[L]`` or ``[B, L]`` long.
        mask: same shape, bool (True = part of the chain of thought).
        boundary_token_ids: 1-D ids (tensor or list).
        min_len: minimum tokens per segment (our addition; 1 = every delimiter splits).

    Returns:
        ``seg_id`` with the shape of ``token_ids``: ``0, 1, ...`` in order, ``-1`` where masked.
    """
    ids, squeeze = _as_batch(token_ids, "token_ids")
    m, _ = _as_batch(mask.bool(), "mask")
    start = _delimiter_starts(ids, m, boundary_token_ids)  # [B, L] rank space
    start = _enforce_min_len(start, m.sum(dim=1), min_len)  # [B, L]
    seg = _ids_from_starts(start, _rank(m), m)  # [B, L]
    return seg[0] if squeeze else seg


def segment_by_entropy(
    entropy: Tensor,
    mask: Tensor,
    quantile: float = 0.9,
    min_len: int = 4,
) -> Tensor:
    """Entropy segmentation (RREDCoT, arXiv:2606.06475): high-entropy tokens start segments.

    A token whose entropy is strictly above its row's ``quantile`` (linear interpolation, over
    unmasked tokens only) starts a new segment, subject to ``min_len`` (see module docstring).
    A row of constant entropy is one segment.

    Args:
        entropy: ``[B, L]`` (or ``[L]``) per-token entropy of the sampling distribution.
        mask: same shape, bool.
        quantile: per-row threshold quantile in ``[0, 1]``.
        min_len: minimum tokens per segment.

    Returns:
        ``seg_id`` with the shape of ``entropy``; ``-1`` where masked.
    """
    ent, squeeze = _as_batch(entropy, "entropy")
    m, _ = _as_batch(mask.bool(), "mask")
    start = _entropy_starts(ent, m, quantile)  # [B, L]
    start = _enforce_min_len(start, m.sum(dim=1), min_len)  # [B, L]
    seg = _ids_from_starts(start, _rank(m), m)  # [B, L]
    return seg[0] if squeeze else seg


def segment_hybrid(
    token_ids: Tensor,
    entropy: Tensor,
    mask: Tensor,
    boundary_token_ids: Tensor,
    quantile: float = 0.9,
    min_len: int = 4,
) -> Tensor:
    """Hybrid segmentation: union of delimiter and entropy boundaries, then ``min_len``.

    Candidate starts are those of :func:`segment_by_delimiters` and :func:`segment_by_entropy`;
    the greedy ``min_len`` rule is applied once to the union (so a delimiter and an entropy
    spike a token apart give one boundary, the earlier one).

    Returns:
        ``seg_id`` with the shape of ``token_ids``; ``-1`` where masked.
    """
    ids, squeeze = _as_batch(token_ids, "token_ids")
    ent, _ = _as_batch(entropy, "entropy")
    m, _ = _as_batch(mask.bool(), "mask")
    start = _delimiter_starts(ids, m, boundary_token_ids) | _entropy_starts(ent, m, quantile)
    start = _enforce_min_len(start, m.sum(dim=1), min_len)  # [B, L]
    seg = _ids_from_starts(start, _rank(m), m)  # [B, L]
    return seg[0] if squeeze else seg


def segment_ends(seg_id: Tensor, num_segments: int | None = None) -> tuple[Tensor, Tensor]:
    """Index of each segment's last token.

    Args:
        seg_id: ``[B, L]`` from a segmenter (``-1`` = masked).
        num_segments: pad to this ``S``; ``None`` uses the batch maximum (a host sync).

    Returns:
        ``(ends [B, S] long, valid [B, S] bool)``. ``ends`` is 0 where not valid, so it is safe
        as a gather index; always combine it with ``valid``. The value of prefix ``s_i`` is read
        at token ``ends[:, i-1]`` (``s_0`` is the bare prompt).
    """
    if seg_id.dim() != 2:
        raise ValueError(f"seg_id must be [B, L], got shape {tuple(seg_id.shape)}")
    b, length = seg_id.shape
    top = int(seg_id.max()) if seg_id.numel() else -1
    s = top + 1 if num_segments is None else num_segments
    if top >= s:
        raise ValueError(f"seg_id has ids >= num_segments={s}")
    pos = torch.arange(length, device=seg_id.device).expand(b, length)  # [B, L]
    idx = torch.where(seg_id >= 0, seg_id, torch.full_like(seg_id, s))  # [B, L]; masked -> dump
    last = torch.full((b, s + 1), -1, dtype=torch.long, device=seg_id.device)  # [B, S+1]
    last.scatter_reduce_(1, idx, pos, reduce="amax", include_self=True)
    last = last[:, :s]  # [B, S]
    valid = last >= 0  # [B, S]
    return last.clamp_min(0), valid


# ---------------------------------------------------------------- redistribution


def _check_left_aligned(valid: Tensor) -> None:
    if valid.dim() != 2:
        raise ValueError(f"valid must be [B, S], got shape {tuple(valid.shape)}")
    if valid.shape[1] > 1 and bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        raise ValueError("valid segments must be left-aligned (ids 0 .. n-1 of each row)")


def redistribute(
    values: Tensor,
    valid: Tensor,
    returns: Tensor,
    include_baseline: bool = False,
) -> Tensor:
    """RUDDER-style segment rewards ``r_i = V(s_i) - V(s_{i-1})`` (RREDCoT, arXiv:2606.06475).

    ``values[:, 0]`` is ``V(s_0)``, the value of the bare prompt; ``values[:, i]`` the value after
    segment i (1-based). Our choice: the value after the row's *last valid* segment is replaced
    by the observed return, so the rewards telescope exactly (up to float rounding)::

        sum_i r_i = returns - V(s_0)          (include_baseline=False)
        sum_i r_i = returns                   (include_baseline=True: r_1 += V(s_0))

    Without the baseline the rewards are the advantage the chain earned over what the prompt
    promised, which is what :func:`segment_advantages` accumulates; with it, the redistribution
    conserves the return itself, as RUDDER's return-equivalence asks. Either way the final
    segment carries the estimator's error at the end of the chain (``R - V(s_{n-1})``), never
    lost.

    Args:
        values: ``[B, S+1]`` value estimates; entries past a row's last valid segment are ignored
            (they may hold NaN).
        valid: ``[B, S]`` bool, left-aligned (from :func:`segment_ends`).
        returns: ``[B]`` observed final returns.
        include_baseline: add ``V(s_0)`` to the first segment.

    Returns:
        ``[B, S]`` segment rewards, 0 where not valid. A row without segments gets all zeros.
    """
    _check_left_aligned(valid)
    b, s = valid.shape
    if values.shape != (b, s + 1):
        raise ValueError(f"values must be [B, S+1] = {(b, s + 1)}, got {tuple(values.shape)}")
    if returns.shape != (b,):
        raise ValueError(f"returns must be [B] = {(b,)}, got {tuple(returns.shape)}")
    dtype = torch.promote_types(values.dtype, returns.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    values = values.to(dtype)  # [B, S+1]
    n = valid.sum(dim=1)  # [B]
    is_last = torch.arange(s, device=valid.device).unsqueeze(0) == (n - 1).unsqueeze(1)  # [B, S]
    after = torch.where(is_last, returns.to(dtype).unsqueeze(1), values[:, 1:])  # [B, S]
    before = values[:, :-1]  # [B, S]
    if include_baseline:
        first = torch.zeros_like(valid)
        first[:, 0] = True
        before = torch.where(first, torch.zeros_like(before), before)  # [B, S]
    r = after - before  # [B, S]
    return torch.where(valid, r, torch.zeros_like(r))  # [B, S]


def segment_advantages(
    seg_rewards: Tensor,
    valid: Tensor,
    group_idx: Tensor,
    scale: str = "std",
    eps: float = 1e-6,
) -> Tensor:
    """Group-relative per-segment advantages from redistributed rewards.

    Each segment's raw advantage is its reward-to-go ``G_i = sum_{j >= i} r_j`` over the row's
    valid segments (with :func:`redistribute`'s default, ``G_i = R - V(s_{i-1})``). Our choice
    for the group-relative step: centre (and with ``scale="std"`` divide by the unbiased std)
    over *all valid segments of all samples sharing a* ``group_idx`` -- one mean and one std per
    prompt group -- since segment positions do not align across samples. As in
    ``core.advantages.group_advantages``: a group whose values are all equal gets exact zeros,
    and a group with a single segment has std 0 (never NaN).

    Args:
        seg_rewards: ``[B, S]`` from :func:`redistribute`.
        valid: ``[B, S]`` bool, left-aligned.
        group_idx: ``[B]`` prompt-group id of each row (any integers).
        scale: ``"std"`` or ``"none"`` (centre only, as Dr. GRPO).
        eps: added to the std.

    Returns:
        ``[B, S]`` advantages, 0 where not valid.
    """
    if scale not in SEG_SCALES:
        raise ValueError(f"scale must be one of {SEG_SCALES}, got {scale!r}")
    _check_left_aligned(valid)
    if group_idx.shape != valid.shape[:1]:
        raise ValueError(f"group_idx must be [B], got shape {tuple(group_idx.shape)}")
    r = seg_rewards
    if not r.is_floating_point():
        r = r.to(torch.get_default_dtype())
    r = torch.where(valid, r, torch.zeros_like(r))  # [B, S]
    rtg = r.flip(1).cumsum(dim=1).flip(1)  # [B, S] reward-to-go

    _, inv = torch.unique(group_idx, return_inverse=True)  # [B] groups 0 .. n_groups-1
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    gid = inv.unsqueeze(1).expand_as(valid)[valid]  # [V]
    x = rtg[valid]  # [V]
    count = torch.zeros(n_groups, dtype=x.dtype, device=x.device)  # [n_groups]
    count.index_add_(0, gid, torch.ones_like(x))
    total = torch.zeros_like(count).index_add_(0, gid, x)  # [n_groups]
    mean = total / count.clamp_min(1)  # [n_groups]
    centred = x - mean[gid]  # [V]
    gmax = torch.zeros_like(count).scatter_reduce_(0, gid, x, "amax", include_self=False)
    gmin = torch.zeros_like(count).scatter_reduce_(0, gid, x, "amin", include_self=False)
    constant = (gmax == gmin)[gid]  # [V]
    centred = torch.where(constant, torch.zeros_like(centred), centred)  # [V]
    if scale == "std":
        sq = torch.zeros_like(count).index_add_(0, gid, centred**2)  # [n_groups]
        var = torch.where(count > 1, sq / (count - 1).clamp_min(1), torch.zeros_like(sq))
        centred = centred / (var.sqrt()[gid] + eps)  # [V]
    out = torch.zeros_like(rtg)  # [B, S]
    out[valid] = centred
    return out


def token_advantages_from_segments(seg_adv: Tensor, seg_id: Tensor) -> Tensor:
    """Scatter per-segment advantages ``[B, S]`` to tokens ``[B, L]``; 0 where ``seg_id == -1``."""
    if seg_adv.dim() != 2 or seg_id.dim() != 2 or seg_adv.shape[0] != seg_id.shape[0]:
        raise ValueError(
            f"need seg_adv [B, S] and seg_id [B, L], "
            f"got {tuple(seg_adv.shape)}, {tuple(seg_id.shape)}"
        )
    if seg_adv.shape[1] == 0:
        return torch.zeros(seg_id.shape, dtype=seg_adv.dtype, device=seg_adv.device)
    tok = seg_adv.gather(1, seg_id.clamp_min(0))  # [B, L]
    return torch.where(seg_id >= 0, tok, torch.zeros_like(tok))  # [B, L]


# ---------------------------------------------------------------- value estimators


def answer_prob_values(
    answer_logp_sums: Tensor,
    answer_lengths: Tensor | int | None = None,
    length_normalize: bool = False,
) -> Tensor:
    """Value of a prefix = the model's probability of the verified answer after it.

    Our reading of RREDCoT's "model as its own value estimator" (arXiv:2606.06475): teacher-force
    the verified answer ``a*`` after prefix ``s_i`` (the caller does this; it may append a
    closing such as ``"</think> The answer is "`` first) and take
    ``V(s_i) = p(a* | s_i) = exp(sum_t log p(a*_t | s_i, a*_<t))``. With ``length_normalize`` the
    geometric mean per token, ``exp(sum / len)``, is used instead (less dominated by answer
    length, no longer a probability of the whole answer).

    Args:
        answer_logp_sums: ``[B, S+1]`` summed answer-token log-probs after each prefix
            (column 0: bare prompt).
        answer_lengths: number of answer tokens, ``int`` or a tensor broadcastable to
            ``[B, S+1]`` (e.g. ``[B, 1]``); needed only with ``length_normalize``.
        length_normalize: use the per-token geometric mean.

    Returns:
        ``[B, S+1]`` values in ``[0, 1]``.
    """
    logp = answer_logp_sums
    if not logp.is_floating_point():
        logp = logp.to(torch.get_default_dtype())
    if length_normalize:
        if answer_lengths is None:
            raise ValueError("length_normalize=True needs answer_lengths")
        lengths = torch.as_tensor(answer_lengths, dtype=logp.dtype, device=logp.device)
        if bool((lengths <= 0).any()):
            raise ValueError("answer_lengths must be positive")
        logp = logp / lengths
    return logp.exp()  # [B, S+1]


def importance_values(
    cont_logp: Tensor,
    cont_rewards: Tensor,
    self_normalize: bool = True,
    proposal_logp: Tensor | None = None,
    cont_mask: Tensor | None = None,
) -> Tensor:
    """Importance-sampling values from the group's other completions (our reading of RREDCoT).

    ``V(s_i) = E_{y ~ pi(.|s_i)}[R(y)]``. We have no samples from ``pi(.|s_i)``, but the prompt's
    group holds J completions with known rewards ``R_j``. Let ``c_j`` be completion j's
    continuation (which span -- e.g. its remaining steps or its final answer -- is the caller's
    choice) and ``cont_logp[b, i, j] = log pi(c_j | s_i^b)`` its log-likelihood teacher-forced
    after prefix i of sample b. Importance weights are ``w_ij = pi(c_j | s_i) / q(c_j)`` with
    ``q`` the distribution the continuations were drawn from (``proposal_logp``):

    * ``self_normalize=True``: ``V = sum_j w_ij R_j / sum_j w_ij``, computed as a softmax over j
      of ``cont_logp - proposal_logp``. Without ``proposal_logp`` the proposal is taken as
      uniform over the J drawn continuations, i.e. ``w_ij = exp(cont_logp[b,i,j] - logsumexp_j)``
      -- the estimator we read in the paper. Consistent, biased for finite J.
    * ``self_normalize=False``: ``V = mean_j w_ij R_j`` (unbiased if ``q`` is exact); needs
      ``proposal_logp``.

    Long continuations make log-likelihoods spread widely and the softmax near one-hot; a caller
    may pass per-token mean log-likelihoods instead of sums to soften it.

    Args:
        cont_logp: ``[B, S+1, J]``.
        cont_rewards: ``[B, J]``.
        self_normalize: see above.
        proposal_logp: ``[B, J]`` log q(c_j), or ``None``.
        cont_mask: ``[B, J]`` or ``[B, S+1, J]`` bool; False excludes a continuation (e.g. the
            sample's own, or padding).

    Returns:
        ``[B, S+1]`` values; 0 where no continuation is unmasked.
    """
    if cont_logp.dim() != 3:
        raise ValueError(f"cont_logp must be [B, S+1, J], got shape {tuple(cont_logp.shape)}")
    b, s1, j = cont_logp.shape
    if cont_rewards.shape != (b, j):
        raise ValueError(f"cont_rewards must be [B, J] = {(b, j)}, got {tuple(cont_rewards.shape)}")
    logw = cont_logp if cont_logp.is_floating_point() else cont_logp.to(torch.get_default_dtype())
    if proposal_logp is not None:
        logw = logw - proposal_logp.to(logw.dtype).unsqueeze(1)  # [B, S+1, J]
    elif not self_normalize:
        raise ValueError("self_normalize=False needs proposal_logp")
    if cont_mask is None:
        m = torch.ones_like(logw, dtype=torch.bool)
    else:
        m = cont_mask.bool()
        m = (m.unsqueeze(1) if m.dim() == 2 else m).expand(b, s1, j)  # [B, S+1, J]
    rewards = cont_rewards.to(logw.dtype).unsqueeze(1)  # [B, 1, J]
    rewards = torch.where(m, rewards, torch.zeros_like(logw))  # [B, S+1, J]
    logw = torch.where(m, logw, torch.full_like(logw, float("-inf")))  # [B, S+1, J]
    any_valid = m.any(dim=-1)  # [B, S+1]
    if self_normalize:
        safe = torch.where(any_valid.unsqueeze(-1), logw, torch.zeros_like(logw))
        w = torch.softmax(safe, dim=-1)  # [B, S+1, J]
        w = torch.where(m, w, torch.zeros_like(w))
        v = (w * rewards).sum(dim=-1)  # [B, S+1]
    else:
        n = m.sum(dim=-1).clamp_min(1).to(logw.dtype)  # [B, S+1]
        v = (logw.exp() * rewards).sum(dim=-1) / n  # [B, S+1]
    return torch.where(any_valid, v, torch.zeros_like(v))  # [B, S+1]


def correlation(x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
    """Pearson correlation of all (unmasked) entries of ``x`` and ``y``, e.g. estimated values
    against Monte Carlo values from the K x M tree at the thought boundary.

    Returns:
        0-dim tensor; NaN when fewer than 2 entries or either side is constant.
    """
    if x.shape != y.shape:
        raise ValueError(f"x and y must share a shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    dtype = torch.promote_types(x.dtype, y.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    if mask is not None:
        x, y = x[mask.bool()], y[mask.bool()]
    x = x.reshape(-1).to(dtype)
    y = y.reshape(-1).to(dtype)
    if x.numel() < 2:
        return torch.tensor(float("nan"), dtype=dtype, device=x.device)
    xc = x - x.mean()
    yc = y - y.mean()
    denom = (xc.pow(2).sum() * yc.pow(2).sum()).sqrt()
    nan = torch.tensor(float("nan"), dtype=dtype, device=x.device)
    return torch.where(denom > 0, (xc * yc).sum() / torch.where(denom > 0, denom, 1.0), nan)
