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

POLICY_LOSSES = ("grpo", "rgra")
AGGREGATIONS = ("token_mean", "seq_mean", "constant")
KL_KINDS = ("k1", "k3")


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


def policy_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    kind: str = "grpo",
    clip_eps: float = 0.2,
    agg: str = "token_mean",
    max_len: int | None = None,
) -> Tensor:
    """Scalar policy-gradient loss, differentiable w.r.t. ``logp``.

    Per token:

    * ``kind="grpo"`` (GRPO, arXiv:2402.03300 / PPO clip): ``ratio = exp(logp - old_logp)``,
      ``loss = -min(ratio * A, clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A)``.
    * ``kind="rgra"`` (arXiv:2603.18756): ``loss = -A * logp``; no ratio, no clipping,
      ``old_logp`` is ignored (may be ``None``). Its gradient equals the grpo gradient at
      ``old_logp == logp.detach()``.

    Aggregation over the batch:

    * ``"token_mean"`` (DAPO): ``sum(loss * w) / sum(w)`` over all tokens.
    * ``"seq_mean"`` (GRPO paper): each row's weighted mean; rows without tokens are dropped;
      mean over the remaining rows.
    * ``"constant"`` (Dr. GRPO): ``sum(loss * w) / (B * max_len)``, ``max_len`` defaulting to L.

    Args:
        logp: ``[B, L]`` token log-probs under the current policy.
        old_logp: ``[B, L]`` token log-probs under the sampling policy (required for grpo).
        advantages: ``[B]`` (broadcast over tokens) or ``[B, L]``.
        mask: ``[B, L]`` bool, or float per-token weights (0 = excluded).
        kind: one of :data:`POLICY_LOSSES`.
        clip_eps: PPO clip range (grpo only).
        agg: one of :data:`AGGREGATIONS`.
        max_len: normaliser length for ``agg="constant"``.

    Returns:
        0-dim loss. Masked positions never affect the value or gradient, even if they hold NaN/inf.
    """
    check_choice("kind", kind, POLICY_LOSSES)
    check_choice("agg", agg, AGGREGATIONS)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, L], got shape {tuple(logp.shape)}")
    if mask.shape != logp.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != logp shape {tuple(logp.shape)}")
    b, length = logp.shape

    valid, weights = _valid_and_weights(mask, logp.dtype)  # [B, L], [B, L]
    adv = _broadcast_advantages(advantages, logp).to(logp.dtype)  # [B, L]
    adv = _zero_where_invalid(adv, valid)  # [B, L]
    logp_v = _zero_where_invalid(logp, valid)  # [B, L]

    if kind == "grpo":
        if old_logp is None:
            raise ValueError("kind='grpo' needs old_logp")
        if old_logp.shape != logp.shape:
            raise ValueError(
                f"old_logp shape {tuple(old_logp.shape)} != logp shape {tuple(logp.shape)}"
            )
        old_v = _zero_where_invalid(old_logp.detach().to(logp.dtype), valid)  # [B, L]
        ratio = torch.exp(logp_v - old_v)  # [B, L]
        clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # [B, L]
        per_token = -torch.minimum(ratio * adv, clipped * adv)  # [B, L]
    else:
        per_token = -adv * logp_v  # [B, L]

    weighted = per_token * weights  # [B, L]
    if agg == "token_mean":
        return weighted.sum() / _safe_denominator(weights.sum())
    if agg == "seq_mean":
        row_w = weights.sum(dim=-1)  # [B]
        row_mean = weighted.sum(dim=-1) / _safe_denominator(row_w)  # [B]
        has_tokens = (row_w > 0).to(logp.dtype)  # [B]
        return (row_mean * has_tokens).sum() / _safe_denominator(has_tokens.sum())
    norm_len = length if max_len is None else max_len
    if norm_len <= 0:
        raise ValueError(f"max_len must be positive, got {norm_len}")
    return weighted.sum() / (b * norm_len)


@torch.no_grad()
def policy_loss_metrics(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
) -> dict[str, Tensor]:
    """Diagnostics of the clipped surrogate, as detached 0-d tensors (weighted masked means; on a
    GPU they stay there until read, so a caller can read them once, after its step).

    Returns:
        ``ratio_mean``: mean of ``exp(logp - old_logp)``;
        ``clip_frac``: fraction of unmasked tokens where clipping is active, i.e. the clipped term
        wins the ``min`` and stops the gradient (``ratio > 1 + eps`` with ``A > 0`` or
        ``ratio < 1 - eps`` with ``A < 0``, as in TRL);
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
    high = (ratio > 1.0 + clip_eps) & (adv > 0)  # [B, L]
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
