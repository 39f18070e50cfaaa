"""Diagnostics for std normalization read as an adaptive per-prompt step size.

Pure tensor functions returning Python floats for logging; no model, no config, no I/O.

Reference
---------
* arXiv:2601.23135, GRPO's std normalization read as an adaptive gradient (our notes:
  docs/algorithms.md section 2). GRPO divides prompt p's centred rewards by its reward
  std ``sigma_p``; read as optimisation, that is a per-prompt step size ``1 / sigma_p``. The
  claimed gain over unnormalized REINFORCE is governed by the average within-prompt std, and it
  fades late in training when per-prompt gradient directions stop being nearly orthogonal.

What is ours
------------
The paper suggests *what* to watch; the exact statistics are our choice: the unbiased std
within a prompt (as ``core.advantages``), the unbiased std across prompts for the spread, exact
equality for "zero-std" groups, and per-prompt gradients of the *centred, unscaled* loss so
that the two update norms differ only by the ``1 / (sigma_p + eps)`` weights.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def reward_std_stats(rewards: Tensor) -> dict[str, float]:
    """Per-prompt reward-std statistics of one batch.

    Args:
        rewards: ``[N, G]`` (N prompts, G samples each).

    Returns:
        ``mean_std``: mean over prompts of the within-prompt unbiased std (0 for G == 1), zero-std
        prompts included; ``spread``: unbiased std across prompts of those stds (0 for N == 1);
        ``zero_std_frac``: fraction of prompts whose rewards are all exactly equal.
    """
    if rewards.dim() != 2 or rewards.shape[0] == 0:
        raise ValueError(f"rewards must be [N, G] with N >= 1, got shape {tuple(rewards.shape)}")
    r = _float(rewards)  # [N, G]
    n, g = r.shape
    std = r.std(dim=1) if g > 1 else r.new_zeros(n)  # [N]
    constant = (r == r[:, :1]).all(dim=1)  # [N]
    std = torch.where(constant, torch.zeros_like(std), std)  # exact 0 for constant groups
    spread = std.std() if n > 1 else r.new_zeros(())
    return {
        "mean_std": float(std.mean()),
        "spread": float(spread),
        "zero_std_frac": float(constant.to(r.dtype).mean()),
    }


def update_norm_ratio(
    per_prompt_grads: Tensor,
    sigma: Tensor,
    eps: float = 1e-6,
) -> dict[str, float]:
    """Norm of the update with and without GRPO's per-prompt ``1 / sigma_p`` step size.

    ``g_p`` is the gradient of prompt p's *centred, unscaled* loss (Dr. GRPO-style advantages
    ``R - mean``). GRPO's update is ``sum_p g_p / (sigma_p + eps)``, the unnormalized one
    ``sum_p g_p``. A zero-std prompt has ``g_p = 0`` and adds nothing to either.

    Args:
        per_prompt_grads: ``[N, D]`` (full or projected gradients).
        sigma: ``[N]`` per-prompt reward std (the one the advantages divide by).
        eps: as in the advantage.

    Returns:
        ``norm_with_std``, ``norm_without_std``, ``ratio = with / without`` (NaN when the
        unnormalized update is 0).
    """
    if per_prompt_grads.dim() != 2 or sigma.shape != per_prompt_grads.shape[:1]:
        raise ValueError(
            f"need per_prompt_grads [N, D] and sigma [N], got {tuple(per_prompt_grads.shape)}, "
            f"{tuple(sigma.shape)}"
        )
    g = _float(per_prompt_grads)  # [N, D]
    scaled = g / (sigma.to(g.dtype) + eps).unsqueeze(1)  # [N, D]
    with_std = float(scaled.sum(dim=0).norm())
    without = float(g.sum(dim=0).norm())
    ratio = with_std / without if without > 0 else float("nan")
    return {"norm_with_std": with_std, "norm_without_std": without, "ratio": ratio}


def update_norms(scaled_grads: Tensor, unscaled_grads: Tensor) -> dict[str, float]:
    """Norm of the summed update from per-prompt gradients computed both ways.

    The general form of :func:`update_norm_ratio` when the std scaling is not one scalar per
    prompt (a K x M tree divides thought advantages by the std of the K thought values and
    continuation advantages by the std of the K*M leaves): ``scaled_grads[p]`` is prompt p's
    gradient with GRPO's std-scaled advantages, ``unscaled_grads[p]`` with the centred, unscaled
    ones. With ``scaled = unscaled / (sigma + eps)`` row by row it equals
    :func:`update_norm_ratio`.

    Args:
        scaled_grads: ``[N, D]``.
        unscaled_grads: ``[N, D]``.

    Returns:
        ``norm_with_std``, ``norm_without_std``, ``ratio`` (NaN when the unscaled update is 0).
    """
    if scaled_grads.dim() != 2 or scaled_grads.shape != unscaled_grads.shape:
        raise ValueError(
            f"need two [N, D] tensors of one shape, got {tuple(scaled_grads.shape)}, {tuple(unscaled_grads.shape)}"
        )
    with_std = float(_float(scaled_grads).sum(dim=0).norm())
    without = float(_float(unscaled_grads).sum(dim=0).norm())
    ratio = with_std / without if without > 0 else float("nan")
    return {"norm_with_std": with_std, "norm_without_std": without, "ratio": ratio}


def mean_pairwise_cosine(per_prompt_grads: Tensor) -> float:
    """Mean off-diagonal cosine similarity between per-prompt gradients.

    Rows that are exactly zero (e.g. zero-std prompts) are ignored. Near 0: the nearly
    orthogonal regime where normalization helps most (arXiv:2601.23135).

    Args:
        per_prompt_grads: ``[N, D]``.

    Returns:
        The mean over ordered pairs ``p != q`` of nonzero rows; NaN with fewer than 2 such rows.
    """
    if per_prompt_grads.dim() != 2:
        raise ValueError(f"per_prompt_grads must be [N, D], got {tuple(per_prompt_grads.shape)}")
    g = _float(per_prompt_grads)  # [N, D]
    norm = g.norm(dim=1)  # [N]
    g = g[norm > 0] / norm[norm > 0].unsqueeze(1)  # [N', D] unit rows
    k = g.shape[0]
    if k < 2:
        return float("nan")
    gram = g @ g.T  # [N', N']
    off = gram.sum() - gram.diagonal().sum()
    return float(off / (k * (k - 1)))


def random_projection(
    dim_in: int,
    dim_out: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Gaussian random projection ``[dim_in, dim_out]`` for cheap projected gradients.

    Entries are ``N(0, 1 / dim_out)``, so ``E ||x @ P||^2 = ||x||^2`` and inner products (hence
    cosines) are preserved up to ``O(1 / sqrt(dim_out))`` (Johnson-Lindenstrauss). Generated on
    the CPU from its own ``torch.Generator``: the same seed gives the same matrix, and the
    global RNG is untouched. Use as ``grads @ P`` (``[N, dim_in] -> [N, dim_out]``).
    """
    if dim_in <= 0 or dim_out <= 0:
        raise ValueError(f"dims must be positive, got {dim_in}, {dim_out}")
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(dim_in, dim_out, generator=gen, dtype=dtype)  # [dim_in, dim_out]
    return p / dim_out**0.5
