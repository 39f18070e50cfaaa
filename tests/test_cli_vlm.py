"""End-to-end smoke test of the vision-language path through the real console script."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from vlm_treegrpo.vlm.registry import FAMILIES, get_adapter

ROOT = Path(__file__).resolve().parents[1]


def _cli() -> list[str]:
    exe = shutil.which("vlm-treegrpo", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "vlm_treegrpo.cli"]


def test_train_tiny_vlm_smoke_writes_summary(tmp_path):
    # beta > 0 keeps every tree in the update (a random model's rewards are all 0, which would skip
    # them), so the run also exercises the reference-policy copy, the KL term and the backward.
    cmd = _cli() + ["train", "--config", str(ROOT / "configs/tiny-qwen2-vl.yaml"), f"log.run_dir={tmp_path}",
                    "log.progress=false", "algo.beta=0.01", "log.save_model=true", "eval.samples=2", "model.gradient_checkpointing=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "tiny-qwen2-vl"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["model"] == "tiny-qwen2-vl"
    for key in ("eval_before", "eval_after"):
        assert 0.0 <= summary[key]["accuracy"] <= 1.0 and summary[key]["n"] == 8
        assert 0.0 <= summary[key]["pass@1"] <= summary[key]["pass@2"] <= 1.0  # (sampled completions, flat)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["trees_updated"] >= 2  # rows: leaves of both prompts (finished thoughts are one row)
        assert r["grad_norm"] >= 0 and "kl" in r and "reward" in r and r["entropy"] > 0  # (through checkpointed layers)
    saved = {f.name for f in (run / "model").iterdir()}
    assert {"config.json", "tokenizer.json"} <= saved and saved & {"processor_config.json", "preprocessor_config.json"}


def test_presets_lists_every_vlm_builtin_and_preset():
    proc = subprocess.run(_cli() + ["presets"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    for family in FAMILIES:
        assert any(line.split()[:2] == [f"tiny-{family}", family] for line in lines)
        for p in get_adapter(family).presets:
            row = next(line for line in lines if line.split()[0] == p.name)
            assert row.split()[1:3] == [family, p.params] and p.hub_id in row
