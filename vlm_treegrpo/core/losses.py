"""Token-level policy-gradient losses, their aggregation, and KL estimators.

Pure tensor functions; no config objects, no I/O.

References
----------
* GRPO -- Shao et al., arXiv:2402.03300: PPO's clipped surrogate (Schulman et al.,
  arXiv:1707.06347) with group-relative advantages, averaged per sequence then over sequences
  (our ``agg="seq_mean"``).
* DAPO -- Yu et al., arXiv:2503.14476: token-level averaging over the whole batch
  (our ``agg="token_mean"``).
* Dr. GRPO -- Liu et al., arXiv:2503.20783: divide by a constant ``B * max_len`` instead of the
  token count (our ``agg="constant"``).
* RGRA -- arXiv:2603.18756: REINFORCE with group-relative advantages; no importance ratio and no
  clipping (our ``kind="rgra"``). The loss is ``-A * logp`` per token.
* DAPO clip-higher -- arXiv:2503.14476: separate clip ranges ``[1 - eps_low, 1 + eps_high]``
  (``clip_eps`` and ``clip_eps_high``), for every ratio-based kind.
* GSPO -- Zheng et al., arXiv:2507.18071: one importance ratio per sequence, the geometric mean
  ``s = exp(mean_t (logp - old_logp))``, clipped like PPO's (our ``kind="gspo"``). Implemented as
  the paper's GSPO-token form ``s_t = sg(s) * exp(logp_t - sg(logp_t))`` (equal value, and equal
  gradient whenever a sequence's tokens share one advantage), so per-token advantages (a tree's
  thought and continuation advantages) still apply.
* CISPO -- MiniMax-M1, arXiv:2506.13585: ``loss = -sg(clip(ratio, 1 - eps_low, 1 + eps_high)) * A
  * logp``; the importance weight is clipped and detached, so every token keeps its gradient
  (our ``kind="cispo"``).
* Truncated importance sampling (TIS) -- Yao et al., "Your efficient RL framework secretly brings
  you off-policy RL training" (2025): each token's loss is multiplied by
  ``sg(min(pi_prox / pi_behav, C))``, correcting for samples drawn by a policy (``behav_logp``)
  other than the one the loss's ratio is taken against (``old_logp``; the current policy for
  rgra, which has no ratio).
* KL estimators -- J. Schulman, "Approximating KL Divergence" (2020): k1 = log(p/q),
  k3 = q/p - log(q/p) - 1 >= 0, as used by GRPO for the reference-model penalty.

Departures
----------
* Masked positions are zeroed with ``torch.where`` on the *inputs* (not only by multiplying with
  the mask), so NaN/inf left in padding can never reach the loss or its gradient.
* Float masks are per-token weights; the normaliser is the sum of the weights. An all-zero mask
  gives a loss of exactly 0 that still carries a graph (``backward()`` gives zero grads).
* ``k3`` is computed as ``expm1(d) - d`` (more accurate near 0) and clamped at 0 so rounding can
  never make it negative.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vlm_treegrpo.core._checks import check_choice

POLICY_LOSSES = ("grpo", "rgra", "gspo", "cispo")
AGGREGATIONS = ("token_mean", "seq_mean", "constant", "seq_mean_token_sum")
AGG_ALIASES = {
    # TRL GRPOConfig.loss_type
    "grpo": "seq_mean",
    "dapo": "token_mean",
    "dr_grpo": "constant",
    # verl actor.loss_agg_mode
    "token-mean": "token_mean",
    "seq-mean-token-mean": "seq_mean",
    "seq-mean-token-sum": "seq_mean_token_sum",
    "seq-mean-token-sum-norm": "constant",
}
"""Aggregation names of TRL (``loss_type``) and verl (``loss_agg_mode``) -> ours (:func:`resolve_agg`)."""
KL_KINDS = ("k1", "k3")


def resolve_agg(agg: str) -> str:
    """One of :data:`AGGREGATIONS`, for ours or a TRL / verl name (:data:`AGG_ALIASES`)."""
    check_choice("agg", agg, AGGREGATIONS + tuple(AGG_ALIASES))
    return AGG_ALIASES.get(agg, agg)


def _valid_and_weights(mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Boolean validity and float weights (0 where invalid) from a bool or float mask."""
    if mask.dtype == torch.bool:
        valid = mask
        weights = mask.to(dtype)
    else:
        valid = mask != 0
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        weights = torch.where(valid, mask.to(dtype), zero)
    return valid, weights


def _zero_where_invalid(x: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _safe_denominator(d: Tensor) -> Tensor:
    """``d`` where positive, else 1 (the numerator is then 0, so the result is 0)."""
    return torch.where(d > 0, d, torch.ones_like(d))


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Weighted mean of ``x`` over positions where ``mask`` is nonzero.

    ``mask`` may be bool or float (float = per-position weights). Masked positions of ``x`` are
    replaced with 0 before the product, so NaN/inf there are ignored. Where the total weight is 0
    the result is 0.

    Args:
        x: any shape.
        mask: same shape as ``x`` (or broadcastable to it).
        dim: reduce over this dim; ``None`` reduces over everything (0-dim result).
    """
    valid, weights = _valid_and_weights(mask, x.dtype)
    x, valid, weights = torch.broadcast_tensors(x, valid, weights)
    num = _zero_where_invalid(x, valid) * weights
    if dim is None:
        return num.sum() / _safe_denominator(weights.sum())
    return num.sum(dim=dim) / _safe_denominator(weights.sum(dim=dim))


def _broadcast_advantages(advantages: Tensor, logp: Tensor) -> Tensor:
    if advantages.dim() == 1 and advantages.shape[0] == logp.shape[0]:
        return advantages.unsqueeze(-1).expand_as(logp)  # [B, L]
    if advantages.shape == logp.shape:
        return advantages  # [B, L]
    raise ValueError(
        f"advantages must be [B] or [B, L] with logp {tuple(logp.shape)}, "
        f"got {tuple(advantages.shape)}"
    )


def sequence_log_ratio(log_ratio: Tensor, weights: Tensor, seq_ids: Tensor | None = None) -> Tensor:
    """Each token's sequence mean of ``log_ratio`` (GSPO's ``log s``), broadcast back to its tokens.

    Args:
        log_ratio: ``[B, L]`` ``logp - old_logp``, 0 at masked positions.
        weights: ``[B, L]`` token weights (0 = excluded).
        seq_ids: ``[B, L]`` non-negative ints: tokens of a row with the same id form one sequence;
            ``None``: each row is one sequence.

    Returns:
        ``[B, L]``; 0 for a sequence without weight.
    """
    if seq_ids is None:
        row_w = weights.sum(-1, keepdim=True)  # [B, 1]
        return ((log_ratio * weights).sum(-1, keepdim=True) / _safe_denominator(row_w)).expand_as(log_ratio)  # [B, L]
    if seq_ids.shape != log_ratio.shape:
        raise ValueError(f"seq_ids shape {tuple(seq_ids.shape)} != logp shape {tuple(log_ratio.shape)}")
    b, _ = log_ratio.shape
    n_ids = int(seq_ids.max()) + 1 if seq_ids.numel() else 1
    key = (torch.arange(b, device=seq_ids.device)[:, None] * n_ids + seq_ids.long()).flatten()  # [B*L]
    num = torch.zeros(b * n_ids, dtype=log_ratio.dtype, device=log_ratio.device)
    den = torch.zeros_like(num)
    num = num.index_add(0, key, (log_ratio * weights).flatten())  # [B*n_ids]
    den = den.index_add(0, key, weights.flatten())  # [B*n_ids]
    return (num / _safe_denominator(den))[key].view_as(log_ratio)  # [B, L]


def _ppo_clip(ratio: Tensor, adv: Tensor, low: float, high: float) -> Tensor:
    """``-min(ratio * A, clamp(ratio, 1 - low, 1 + high) * A)`` per token."""
    return -torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - low, 1.0 + high) * adv)  # [B, L]


def _aggregate(weighted: Tensor, weights: Tensor, agg: str, max_len: int | None) -> Tensor:
    """Scalar from per-token weighted losses ``[B, L]`` (see :func:`policy_loss`)."""
    b, length = weighted.shape
    if agg == "token_mean":
        return weighted.sum() / _safe_denominator(weights.sum())
    if agg in ("seq_mean", "seq_mean_token_sum"):
        row_w = weights.sum(dim=-1)  # [B]
        row = weighted.sum(dim=-1)  # [B]
        if agg == "seq_mean":
            row = row / _safe_denominator(row_w)  # [B]
        has_tokens = (row_w > 0).to(weighted.dtype)  # [B]
        return (row * has_tokens).sum() / _safe_denominator(has_tokens.sum())
    norm_len = length if max_len is None else max_len
    if norm_len <= 0:
        raise ValueError(f"max_len must be positive, got {norm_len}")
    return weighted.sum() / (b * norm_len)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    kind: str = "grpo",
    clip_eps: float = 0.2,
    agg: str = "token_mean",
    max_len: int | None = None,
    clip_eps_high: float | None = None,
    behav_logp: Tensor | None = None,
    tis_cap: float = 0.0,
    seq_ids: Tensor | None = None,
) -> Tensor:
    """Scalar policy-gradient loss, differentiable w.r.t. ``logp``.

    Per token, with ``ratio = exp(logp - old_logp)`` and the clip range ``[1 - clip_eps, 1 +
    clip_eps_high]`` (``clip_eps_high=None``: ``clip_eps``, i.e. symmetric):

    * ``kind="grpo"`` (GRPO, arXiv:2402.03300 / PPO clip):
      ``loss = -min(ratio * A, clip(ratio) * A)``.
    * ``kind="gspo"`` (arXiv:2507.18071): the same with the sequence ratio
      ``s = exp(mean over the sequence of (logp - old_logp))`` in GSPO-token form (see the module
      docstring); the sequences are ``seq_ids``' (rows when ``None``).
    * ``kind="cispo"`` (arXiv:2506.13585): ``loss = -sg(clip(ratio)) * A * logp``.
    * ``kind="rgra"`` (arXiv:2603.18756): ``loss = -A * logp``; no ratio, no clipping,
      ``old_logp`` is ignored (may be ``None``).

    On-policy (``old_logp == logp.detach()``) all four have the same gradient, ``-A * grad logp``.
    With ``tis_cap > 0`` and ``behav_logp`` given, each token's loss is multiplied by
    ``sg(min(exp(prox - behav_logp), tis_cap))`` (truncated importance sampling), ``prox`` being
    ``old_logp`` (``logp`` for rgra).

    Aggregation over the batch (``agg``, or a TRL / verl name of :data:`AGG_ALIASES`):

    * ``"token_mean"`` (DAPO): ``sum(loss * w) / sum(w)`` over all tokens.
    * ``"seq_mean"`` (GRPO paper): each row's weighted mean; rows without tokens are dropped;
      mean over the remaining rows.
    * ``"seq_mean_token_sum"`` (verl): each row's weighted sum, mean over rows with tokens.
    * ``"constant"`` (Dr. GRPO): ``sum(loss * w) / (B * max_len)``, ``max_len`` defaulting to L.

    Args:
        logp: ``[B, L]`` token log-probs under the current policy.
        old_logp: ``[B, L]`` token log-probs under the policy the ratio is taken against (required
            for grpo, gspo, cispo).
        advantages: ``[B]`` (broadcast over tokens) or ``[B, L]``.
        mask: ``[B, L]`` bool, or float per-token weights (0 = excluded).
        kind: one of :data:`POLICY_LOSSES`.
        clip_eps: lower clip range (and upper when ``clip_eps_high`` is None).
        agg: one of :data:`AGGREGATIONS` or :data:`AGG_ALIASES`.
        max_len: normaliser length for ``agg="constant"``.
        clip_eps_high: upper clip range (DAPO's clip-higher).
        behav_logp: ``[B, L]`` log-probs under the policy that sampled the tokens (for TIS).
        tis_cap: TIS truncation ``C``; 0 = off.
        seq_ids: ``[B, L]`` sequence of each token within its row (gspo only).

    Returns:
        0-dim loss. Masked positions never affect the value or gradient, even if they hold NaN/inf.
    """
    check_choice("kind", kind, POLICY_LOSSES)
    agg = resolve_agg(agg)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, L], got shape {tuple(logp.shape)}")
    if mask.shape != logp.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != logp shape {tuple(logp.shape)}")
    low = clip_eps
    high = clip_eps if clip_eps_high is None else clip_eps_high

    valid, weights = _valid_and_weights(mask, logp.dtype)  # [B, L], [B, L]
    adv = _broadcast_advantages(advantages, logp).to(logp.dtype)  # [B, L]
    adv = _zero_where_invalid(adv, valid)  # [B, L]
    logp_v = _zero_where_invalid(logp, valid)  # [B, L]

    if kind == "rgra":
        prox = logp_v.detach()  # [B, L]
        per_token = -adv * logp_v  # [B, L]
    else:
        if old_logp is None:
            raise ValueError(f"kind={kind!r} needs old_logp")
        if old_logp.shape != logp.shape:
            raise ValueError(f"old_logp shape {tuple(old_logp.shape)} != logp shape {tuple(logp.shape)}")
        prox = _zero_where_invalid(old_logp.detach().to(logp.dtype), valid)  # [B, L]
        log_ratio = logp_v - prox  # [B, L]
        if kind == "grpo":
            per_token = _ppo_clip(torch.exp(log_ratio), adv, low, high)  # [B, L]
        elif kind == "gspo":
            log_s = sequence_log_ratio(log_ratio.detach(), weights, seq_ids)  # [B, L]
            s_tok = torch.exp(log_s + logp_v - logp_v.detach())  # [B, L] value s, gradient s * grad logp
            per_token = _ppo_clip(s_tok, adv, low, high)  # [B, L]
        else:  # cispo
            w = torch.clamp(torch.exp(log_ratio.detach()), 1.0 - low, 1.0 + high)  # [B, L]
            per_token = -w * adv * logp_v  # [B, L]

    if tis_cap > 0 and behav_logp is not None:
        if behav_logp.shape != logp.shape:
            raise ValueError(f"behav_logp shape {tuple(behav_logp.shape)} != logp shape {tuple(logp.shape)}")
        behav = _zero_where_invalid(behav_logp.detach().to(logp.dtype), valid)  # [B, L]
        tis = torch.clamp(torch.exp(prox - behav), max=tis_cap)  # [B, L]
        per_token = per_token * tis  # [B, L]

    return _aggregate(per_token * weights, weights, agg, max_len)


@torch.no_grad()
def policy_loss_metrics(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> dict[str, Tensor]:
    """Diagnostics of the clipped surrogate, as detached 0-d tensors (weighted masked means; on a
    GPU they stay there until read, so a caller can read them once, after its step).

    Returns:
        ``ratio_mean``: mean of ``exp(logp - old_logp)``;
        ``clip_frac``: fraction of unmasked tokens where clipping is active, i.e. the clipped term
        wins the ``min`` and stops the gradient (``ratio > 1 + clip_eps_high`` with ``A > 0`` or
        ``ratio < 1 - clip_eps`` with ``A < 0``, as in TRL; ``clip_eps_high=None``: ``clip_eps``);
        ``approx_kl``: mean of ``old_logp - logp`` (k1 estimate of KL(old || new)).
        ``old_logp=None`` is read as ``logp`` (ratio 1).
    """
    if old_logp is None:
        old_logp = logp
    valid, _ = _valid_and_weights(mask, logp.dtype)
    adv = _broadcast_advantages(advantages, logp).to(logp.dtype)  # [B, L]
    adv = _zero_where_invalid(adv, valid)  # [B, L]
    log_ratio = _zero_where_invalid(logp - old_logp, valid)  # [B, L]
    ratio = torch.exp(log_ratio)  # [B, L]
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    high = (ratio > 1.0 + eps_high) & (adv > 0)  # [B, L]
    low = (ratio < 1.0 - clip_eps) & (adv < 0)  # [B, L]
    clipped = high | low  # [B, L]
    return {
        "ratio_mean": masked_mean(ratio, mask).detach(),
        "clip_frac": masked_mean(clipped.to(logp.dtype), mask).detach(),
        "approx_kl": masked_mean(-log_ratio, mask).detach(),
    }


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs (Schulman 2020).

    * ``"k1"``: ``logp - ref_logp`` (unbiased, can be negative).
    * ``"k3"``: ``exp(ref_logp - logp) - (ref_logp - logp) - 1`` (unbiased, always >= 0; the
      GRPO paper's penalty). Computed as ``expm1(d) - d`` and clamped at 0.

    Args:
        logp, ref_logp: ``[B, L]``.

    Returns:
        ``[B, L]``; apply the mask yourself (e.g. with :func:`masked_mean`).
    """
    check_choice("kind", kind, KL_KINDS)
    if kind == "k1":
        return logp - ref_logp  # [B, L]
    d = ref_logp - logp  # [B, L]
    return torch.clamp(torch.expm1(d) - d, min=0.0)  # [B, L]
