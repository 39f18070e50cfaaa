"""End-to-end smoke test through the real console script on the tiny preset."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cli() -> list[str]:
    exe = shutil.which("vlm-treegrpo", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "vlm_treegrpo.cli"]


def test_train_smoke_writes_summary_and_metrics(tmp_path):
    cmd = _cli() + ["train", "--config", str(ROOT / "configs/tiny-llama.yaml"), f"log.run_dir={tmp_path}", "log.progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "tiny-llama"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2
    for key in ("eval_before", "eval_after"):
        assert 0.0 <= summary[key]["accuracy"] <= 1.0 and summary[key]["n"] == 8
    assert summary["wall_seconds"] > 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["packed_tokens"] <= r["unpacked_tokens"]
        assert "reward" in r and "loss" in r and "grad_norm" in r
    assert (run / "config.yaml").exists()


def test_bad_config_exits_with_one_line_naming_the_field(tmp_path):
    cmd = _cli() + ["train", "--config", str(ROOT / "configs/tiny-llama.yaml"), "rollout.K=0", f"log.run_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rollout.K")
    assert not (tmp_path / "tiny-llama").exists()


def test_presets_lists_builtins():
    proc = subprocess.run(_cli() + ["presets"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    assert "smollm2-135m-instruct" in proc.stdout and "tiny-llama" in proc.stdout
