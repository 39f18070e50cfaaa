"""Every tiny smoke preset trains: its groups have a reward spread (the 'printable' shaping
reward), its gradient is not zero and one step changes the weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlm_treegrpo.config import load_config
from vlm_treegrpo.policy.factory import make_policy
from vlm_treegrpo.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
TINY = sorted(p.name for p in (ROOT / "configs").glob("tiny-*.yaml"))


@pytest.mark.parametrize("name", TINY)
def test_one_step_of_a_tiny_preset_changes_the_weights(name, tmp_path):
    cfg = load_config(ROOT / "configs" / name, [f"log.run_dir={tmp_path}", "log.progress=false", "optim.steps=1",
                                               "eval.before=false", "eval.after=false", "log.checkpoint_every=1"])
    summary = train(cfg, quiet=True)
    assert summary["steps"] == 1 and summary["updates_skipped"] == 0
    row = json.loads((cfg.log.path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["zero_std_frac"] < 1.0 and row["reward_std_within"] > 0 and row["grad_norm"] > 0
    trained = torch.load(cfg.log.path / "checkpoint" / "model.pt", map_location="cpu", weights_only=True)
    initial = dict(make_policy(cfg.model.name, "cpu", "float32").model.named_parameters())
    changed = [n for n, p in trained.items() if not torch.equal(p, initial[n].detach())]
    assert len(changed) > len(trained) // 2, f"{len(changed)} of {len(trained)} tensors changed"
