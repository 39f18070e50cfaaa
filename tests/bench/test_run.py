"""The bench's orchestration: rounds, the worker, and the real ``vlm-treegrpo bench --quick`` on
tiny-llama, whose report is written as a record with its provenance."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench.test_probes import result

import vlm_treegrpo.bench.ours as O
import vlm_treegrpo.bench.run as B
from vlm_treegrpo.bench.spec import make_spec

RESULT_KEYS = {"settings", "seconds_per_step", "step_seconds", "completions_per_s", "generated_tokens_per_s",
               "completion_tokens_per_s", "mean_completion_tokens", "peak_rss_mib", "rollout_seconds", "update_seconds",
               "reward", "zero_std_frac", "warmup"}
REWARD = "vlm_treegrpo.bench.spec:length_signal_reward"  # (the random tiny model earns varying rewards: updates run)


def _cli() -> list[str]:
    exe = shutil.which("vlm-treegrpo", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "vlm_treegrpo.cli"]


def bench(tmp_path, *extra) -> dict:
    out = tmp_path / "bench.json"
    cmd = _cli() + ["bench", "--quick", "--threads", "1", "--reward", REWARD, "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "s/step" in proc.stdout
    return json.loads(out.read_text())


def test_rounds_alternate_which_trainer_goes_first(monkeypatch, tmp_path):
    order = []

    def fake_spawn(trainer, spec, workdir, label):
        order.append(label)
        return result([9.0, 1.0] if trainer == "ours" else [9.0, 3.0 + len(order)], 1.0)

    monkeypatch.setattr(B, "spawn", fake_spawn)
    spec = make_spec("text", "tiny-llama", steps=1, warmup=1, K=2, M=2, max_new_tokens=8, micro_prompts=1)
    (row,) = B.compare(spec, ["flat"], ["ours", "trl"], tmp_path, rounds=3)
    assert row["ours_shape"] == "4x1" and row["G"] == 4
    assert order == ["flat-ours-r1", "flat-trl-r1", "flat-trl-r2", "flat-ours-r2", "flat-ours-r3", "flat-trl-r3"]
    assert row["round_ratios"] == pytest.approx([5.0, 6.0, 9.0])  # TRL's rounds took 5, 6 and 9 s a step, ours 1 s
    assert row["ratios"]["completions_per_s"] == pytest.approx(20 / 3)  # pooled: 20 s of TRL steps against 3 s of ours
    assert "rounds" in B.format_table({"runs": [row]})


def test_a_worker_reads_the_spec_and_turns_the_sdpa_kernels_off(tmp_path, monkeypatch):
    spec = make_spec("text", "tiny-llama", steps=1, warmup=1, K=2, M=2, max_new_tokens=8, micro_prompts=1, sdpa_off=["cudnn"])
    seen = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", lambda on: seen.append(on))
    monkeypatch.setattr(O, "run_ours", lambda spec: {"sdpa_off": list(spec.sdpa_off), "lr": spec.train.optim.lr})
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_dict()))
    B._worker("ours", str(tmp_path / "spec.json"), str(tmp_path / "result.json"))  # a worker's process, in this one
    assert seen == [False] and json.loads((tmp_path / "result.json").read_text()) == {"sdpa_off": ["cudnn"], "lr": 2e-5}


def test_quick_bench_ours_writes_the_report_and_its_record(tmp_path, records_dir):
    report = bench(tmp_path, "--trainers", "ours", "--modes", "tree")
    assert {"workload", "model", "model_dir", "machine", "spec", "runs", "notes"} <= set(report)
    assert report["model"] == "tiny-llama" and report["spec"]["train"]["rollout"]["K"] * report["spec"]["train"]["rollout"]["M"] == 4
    (row,) = report["runs"]
    assert row["mode"] == "tree" and row["ours_shape"] == "2x2" and "trl" not in row
    ours = row["ours"]
    assert RESULT_KEYS <= set(ours), ours.get("error")
    assert len(ours["step_seconds"]) == 3  # 1 warm-up + 2 measured
    assert ours["settings"]["K"] * ours["settings"]["M"] == 4
    assert ours["settings"]["thought_max_tokens"] + ours["settings"]["answer_max_tokens"] == 16
    assert 0 < ours["mean_completion_tokens"] <= 16
    # a tree samples each thought once: fewer sampled tokens than leaf tokens (or equal if every thought hit EOS)
    assert ours["generated_tokens_per_s"] <= ours["completion_tokens_per_s"]
    assert ours["peak_rss_mib"] > 0
    assert ours["settings"]["drop_finished"] is True and ours["settings"]["compile_decode"] is False
    assert report["spec"]["train"]["algo"]["rewards"] == [REWARD]
    assert min(ours["trees_updated"]) > 0 and ours["update_seconds"] > 0  # varied rewards: the update runs
    assert all(step["cpu_seconds"] > 0 and step["gc_seconds"] >= 0 for step in ours["steps"])  # the step probe's figures
    assert ours["mean_seconds_per_step"] > 0 and isinstance(ours["slow_steps"], list)
    (path,) = records_dir.glob("*_cpu_bench-text-quick_*.json")
    record = json.loads(path.read_text())
    assert record["command"].startswith("vlm-treegrpo bench --quick --threads 1") and "--modes tree" in record["command"]
    assert len(record["commit"]) == 40 and isinstance(record["dirty"], bool) and path.name.endswith(f"_{record['commit'][:8]}.json")
    assert record["machine"] == report["machine"] and record["machine"]["torch"] == torch.__version__
    assert record["figures"] == {k: v for k, v in report.items() if k != "machine"}
    assert path.name in (records_dir / "INDEX.md").read_text()


def test_bench_reports_what_graph_decoding_and_compiled_decoding_did(tmp_path, records_dir):
    """--decode-graphs: ours' JSON counts the steps of the graph loop (eager here: no CUDA);
    --compile-decode: what torch.compile did (graphs captured, frames); --no-record: no record."""
    (row,) = bench(tmp_path, "--trainers", "ours", "--modes", "flat", "--decode-graphs", "--no-record")["runs"]
    graphs = row["ours"]["decode_graphs"]
    assert row["ours"]["settings"]["decode_graphs"] is True and graphs["eager_steps"] > 0 and graphs["failures"] == []
    (row,) = bench(tmp_path, "--trainers", "ours", "--modes", "flat", "--compile-decode", "--no-record")["runs"]
    assert row["ours"]["compile"]["counters"]["stats"]["unique_graphs"] >= 1 and "decode_graphs" not in row["ours"]
    assert not list(records_dir.iterdir())
