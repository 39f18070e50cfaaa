"""The optimizer and schedules every training loop here uses (GRPO, the SFT warm start, the bench)."""
from __future__ import annotations

import math
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


def clipped_step(optimizer, params: list[torch.nn.Parameter], max_grad_norm: float) -> tuple[float, bool]:
    """Clip the gradients of ``params`` to ``max_grad_norm`` (0 = no clipping) and step
    ``optimizer``; returns the norm before clipping and whether the step was made. A non-finite
    norm (an inf or a NaN in any gradient: an overflow under bf16, a diverging loss) makes no
    step: the gradients are dropped, and the weights and the optimizer's moments stay as they were."""
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf")))
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return norm, False
    optimizer.step()
    return norm, True


def weights_finite(params: list[torch.nn.Parameter]) -> bool:
    """Whether every weight in ``params`` is finite (one norm per tensor, one sync): the check
    after a step, since a finite gradient times a huge rate can still overflow a weight."""
    if not params:
        return True
    norms = torch.stack([torch.linalg.vector_norm(p.detach().float()) for p in params])  # [P]
    return bool(torch.isfinite(norms).all())


SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, kind: str, warmup_steps: int, total_steps: int) -> float:
    """The learning rate's multiplier for optimizer step ``step + 1`` (``step`` counts the steps
    made): a linear warm-up to 1 over ``warmup_steps`` steps, then ``constant`` 1, or a ``linear``
    or ``cosine`` decay that would reach 0 at step ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(optimizer, kind: str = "constant", warmup_steps: int = 0, total_steps: int = 0):
    """The scheduler of :func:`lr_factor` (call ``step()`` after each optimizer step)."""
    if kind not in SCHEDULES:
        raise ValueError(f"lr_schedule: unknown schedule {kind!r} (known: {SCHEDULES})")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, kind, warmup_steps, total_steps))


def warmup_constant(optimizer, warmup_steps: int):
    """Linear warm-up over ``warmup_steps`` optimizer steps, then the constant learning rate."""
    return lr_schedule(optimizer, "constant", warmup_steps)
