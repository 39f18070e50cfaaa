"""A non-finite gradient (NaN or inf) makes no update and is counted; too many in a row stop the
run with a checkpoint of the last good weights and exit status 1."""
from __future__ import annotations

import json
import math

import pytest
import torch

import vlm_treegrpo.train.step as step
import vlm_treegrpo.train.loop as trainer
from vlm_treegrpo.train import checkpoint
from vlm_treegrpo.cli import main as cli_main
from vlm_treegrpo.config import load_config
from vlm_treegrpo.policy.factory import make_policy

ARGS = ["log.progress=false", "data.n_test=2", "eval.before=false", "rollout.thought_max_tokens=3", "rollout.answer_max_tokens=3",
        "algo.rewards=[test_nonfinite:length_reward]"]


def length_reward(completion: str, example) -> float:
    return (len(completion) % 7) / 6.0


def _nan_loss_at(monkeypatch, steps: set[int] | None):
    """Multiply the policy loss by NaN in the given steps (1-based; None: every step)."""
    real, calls = trainer.update_step, {"step": 0}

    def update_step(*args, **kwargs):
        calls["step"] += 1
        if steps is None or calls["step"] in steps:
            monkeypatch.setattr(step, "policy_loss", lambda *a, **k: policy_loss(*a, **k) * float("nan"))
        else:
            monkeypatch.setattr(step, "policy_loss", policy_loss)
        return real(*args, **kwargs)

    policy_loss = step.policy_loss
    monkeypatch.setattr(trainer, "update_step", update_step)


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_step_with_a_nan_gradient_makes_no_update_and_the_run_goes_on(tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, {2})
    overrides = [f"log.run_dir={tmp_path}", "log.name=run", "optim.steps=3", "optim.lr=3e-4", "optim.schedule=linear", "eval.after=false", *ARGS]
    summary = trainer.train(load_config(None, overrides), quiet=True)
    rows = _rows(tmp_path / "run")
    assert [r["skipped_updates"] for r in rows] == [0, 1, 0]
    assert [r["lr"] for r in rows] == pytest.approx([3e-4, 2e-4, 2e-4], abs=1e-15)  # (the schedule counts updates made)
    assert math.isnan(rows[1]["grad_norm"]) and all(math.isfinite(rows[i]["grad_norm"]) for i in (0, 2))
    assert summary["steps"] == 3 and summary["updates_skipped"] == 1 and "stopped_by" not in summary


def test_nan_gradients_in_a_row_stop_the_run_with_the_last_good_weights_checkpointed(tmp_path, monkeypatch, capsys):
    _nan_loss_at(monkeypatch, None)
    code = cli_main(["train", *[f"log.run_dir={tmp_path}", "log.name=run", "optim.steps=5", "optim.max_nonfinite_steps=2", *ARGS]])
    assert code == 1
    err = capsys.readouterr().err
    assert "step 2: the gradient was not finite (NaN or inf) in 2 steps in a row, so the weights are those after step 0" in err
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == trainer.NONFINITE and summary["steps"] == 2 and summary["updates_skipped"] == 2
    assert "eval_after" not in summary and checkpoint.read_meta(run / "checkpoint")["step"] == 2
    saved = torch.load(run / "checkpoint" / "model.pt")
    start = checkpoint.trainable(make_policy("tiny-llama", "cpu", "float32").model)
    assert saved.keys() == start.keys() and all(torch.equal(saved[k], start[k]) for k in saved)


def test_a_weight_left_non_finite_by_an_update_stops_the_run_without_checkpointing_it(tmp_path, monkeypatch, capsys):
    """A finite gradient can still overflow a weight: the run stops at once (status 1), the
    checkpoint keeps the step before, and the broken weights are written nowhere."""
    real, calls = step.clipped_step, {"n": 0}

    def overflowing_step(optimizer, params, max_grad_norm):
        out = real(optimizer, params, max_grad_norm)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                params[0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(step, "clipped_step", overflowing_step)
    code = cli_main(["train", *[f"log.run_dir={tmp_path}", "log.name=run", "optim.steps=4", "log.checkpoint_every=1", "log.save_model=true", *ARGS]])
    assert code == 1
    err = capsys.readouterr().err
    assert "step 2: a weight was not finite (NaN or inf) after the update; stopped without checkpointing it" in err
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == trainer.NONFINITE_WEIGHTS and summary["steps"] == 2 and "eval_after" not in summary
    assert checkpoint.read_meta(run / "checkpoint")["step"] == 1 and not (run / "model").exists()
    assert [r["nonfinite_weights"] for r in _rows(run)] == [0, 1]
    assert all(torch.isfinite(t).all() for t in torch.load(run / "checkpoint" / "model.pt").values())


def test_weights_finite_sees_one_nan_or_inf():
    from vlm_treegrpo.train.optim import weights_finite

    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    assert weights_finite(params) and weights_finite([])
    for bad in (float("nan"), float("inf"), -float("inf")):
        with torch.no_grad():
            params[1][1, 0] = bad
        assert not weights_finite(params)
