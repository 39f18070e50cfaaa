"""The shared optimizer: fused AdamW where torch has it, the same update as the default AdamW;
the learning-rate schedules, and the rate the trainer logs."""
from __future__ import annotations

import json
import math

import pytest
import torch

from vlm_treegrpo.config import ConfigError, load_config
from vlm_treegrpo.train.optim import adamw, clipped_step, lr_schedule, warmup_constant


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


def _lrs(kind: str, warmup: int, total: int, n: int) -> list[float]:
    opt = adamw(_params(), 1.0)
    sched = lr_schedule(opt, kind, warmup, total)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_linear_and_cosine_decay_after_the_warm_up():
    assert _lrs("linear", 2, 6, 6) == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    got = _lrs("cosine", 0, 4, 4)
    want = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert got == pytest.approx(want, abs=1e-15) and got[0] == 1.0
    assert _lrs("constant", 1, 3, 3) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_schedule(adamw(_params(), 1.0), "step")
    with pytest.raises(ConfigError, match=r"^optim\.schedule: "):
        load_config(None, ["optim.schedule=exp"])


def test_the_trainer_logs_the_rate_each_step_used(tmp_path):
    from vlm_treegrpo.train.loop import train

    cfg = load_config(None, [f"log.run_dir={tmp_path}", "log.name=run", "log.progress=false", "optim.steps=3", "optim.lr=0.3", "optim.schedule=linear",
                             "eval.before=false", "eval.after=false", "rollout.thought_max_tokens=3", "rollout.answer_max_tokens=3"])
    train(cfg, quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([0.3, 0.2, 0.1], abs=1e-15)


def test_clipped_step_clips_and_steps_on_a_finite_gradient_and_makes_no_step_on_a_non_finite_one():
    ours, ref = _params(), _params()
    opt, ref_opt = adamw(ours, 1e-2), adamw(ref, 1e-2)
    for a, b in zip(ours, ref):
        a.grad = torch.full_like(a, 2.0)
        b.grad = a.grad.clone()
    norm, stepped = clipped_step(opt, ours, 1.0)
    assert stepped and norm == pytest.approx(2.0 * math.sqrt(15 + 7))
    expected = float(torch.nn.utils.clip_grad_norm_(ref, 1.0))
    ref_opt.step()
    assert norm == expected
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    before = [p.detach().clone() for p in ours]
    moments = {k: v.clone() for k, v in opt.state[ours[0]].items()}
    for bad in (float("nan"), float("inf")):
        for p in ours:
            p.grad = torch.ones_like(p)
        ours[1].grad[3] = bad
        norm, stepped = clipped_step(opt, ours, 1.0)
        assert not stepped and not math.isfinite(norm)
        assert all(p.grad is None for p in ours)  # (dropped: the next step starts from zero)
        for p, b in zip(ours, before):
            assert torch.equal(p, b)
        for k, v in opt.state[ours[0]].items():
            assert torch.equal(v, moments[k]), k
