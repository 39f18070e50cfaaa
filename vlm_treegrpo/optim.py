"""The optimizer and schedule every training loop here uses (GRPO, the SFT warm start, the bench)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def adamw(params: Iterable[torch.nn.Parameter], lr: float, betas: Sequence[float] = (0.9, 0.999), weight_decay: float = 0.0):
    """AdamW with torch's fused kernel where it has one for the parameters' device and dtype
    (one kernel over all tensors instead of a Python loop of small ops per parameter, as TRL's
    default ``adamw_torch_fused``), else the default implementation. Same update rule."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device / dtype
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def warmup_constant(optimizer, warmup_steps: int):
    """Linear warm-up over ``warmup_steps`` optimizer steps, then the constant learning rate."""
    warm = warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
