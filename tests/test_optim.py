"""The shared optimizer: fused AdamW where torch has it, the same update as the default AdamW."""
from __future__ import annotations

import torch

from vlm_treegrpo.optim import adamw, warmup_constant


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]


def test_fused_adamw_takes_the_default_adamw_steps():
    ours, ref = _params(), _params()
    opt = adamw(ours, 1e-2, (0.9, 0.99), 0.01)
    assert opt.defaults["fused"] is True  # fp32 CPU tensors have a fused kernel in this torch
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_warmup_then_constant():
    opt = adamw(_params(), 1.0)
    sched = warmup_constant(opt, 4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_constant(adamw(_params(), 0.5), 0).get_last_lr() == [0.5]
