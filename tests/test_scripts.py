"""The scripts run end to end on tiny models: the two studies (--quick, their JSON and PNG), the
step profile, the activation-memory comparison, stop-and-resume through the real CLI, and the GPU
check's refusal without CUDA."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REWARD = "algo.rewards=[analysis.test_advise:length_reward]"  # the random tiny model earns varying rewards


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_variance_study_quick(tmp_path):
    assert _script("variance_study").main(["--quick", "--model", "tiny-llama", "--out", str(tmp_path), REWARD]) == 0
    out = json.loads((tmp_path / "variance_study.json").read_text())
    assert {(r["K"], r["M"]) for r in out["simulation"]} == {(k, m) for k in (2, 4, 8, 16, 32) for m in (1, 2, 4, 8)}
    assert all(r["delta"] > 0 for r in out["simulation"])
    real = out["real"]["bootstrap"]
    assert {(r["K"], r["M"]) for r in real} == {(k, m) for k in (2, 4) for m in (1, 2, 4)}
    unscaled = {r["M"]: r["boot_var_unscaled"] for r in real if r["K"] == 4}
    assert unscaled[1] > unscaled[4] > 0  # continuation noise falls with M
    assert (tmp_path / "variance_study.png").stat().st_size > 0


def test_normalization_study_quick(tmp_path):
    mod = _script("normalization_study")
    assert mod.main(["--quick", "--steps", "1", "--model", "tiny-llama", "--out", str(tmp_path), REWARD, "log.progress=false"]) == 0
    out = json.loads((tmp_path / "normalization_study.json").read_text())
    assert set(out["arms"]) == {"grpo", "reinforce"}
    for arm in out["arms"].values():
        assert arm["step"] == [1] and arm["update_ratio"][0] is not None and arm["reward_std_within"][0] > 0
    assert (tmp_path / "normalization_study.png").stat().st_size > 0
    assert (tmp_path / "grpo" / "metrics.jsonl").exists() and (tmp_path / "reinforce" / "config.yaml").exists()


@pytest.mark.parametrize("workload, model", [("text", "tiny-llama"), ("vlm", "tiny-qwen2-vl")])
def test_profile_step_quick(tmp_path, workload, model):
    out = tmp_path / "profile.json"
    args = ["--workload", workload, "--model", model, "--steps", "1", "--prompts-per-step", "2", "--G", "4", "--tree", "2x2",
            "--max-new-tokens", "8", "--threads", "1", "--top", "5", "--out", str(out)]
    assert _script("profile_step").main(args) == 0
    rep = json.loads(out.read_text())
    assert rep["device"] == "cpu" and [s["shape"] for s in rep["shapes"]] == ["4x1", "2x2"]
    for s in rep["shapes"]:
        assert s["rollout_s"] > 0 and s["update_s"] > 0 and len(s["rollout_top_calls"]) == 5
        assert s["logp_backward_per_segment_s"] > 0 and s["logp_backward_dense_mask_s"] > 0
        assert s["threads_1"]["rollout_s"] > 0
        d = s["dispatch"]
        assert d["forwards"] >= 2 and 0 < d["compute_ops"] < d["ops"] and d["syncs"] > 0
        assert d["compute_ops_per_forward"] == round(d["compute_ops"] / d["forwards"], 1)
        assert sum(n for _, n in d["top_compute_ops"]) <= d["compute_ops"]
        for name in ("per_segment", "dense_mask"):
            assert s[f"dispatch_update_{name}"]["forwards"] >= 1 and s[f"dispatch_update_{name}"]["compute_ops"] > 0


def test_profile_step_gives_a_config_only_directory_random_weights(tmp_path):
    from vlm_treegrpo.models.tiny import build_tiny_llama

    model, tok = build_tiny_llama(seed=0)
    model.config.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _script("profile_step").random_weights_if_missing(str(tmp_path))
    assert list(tmp_path.glob("*.safetensors"))


def test_gpu_check_script_parses_and_refuses_a_machine_without_cuda(tmp_path):
    import subprocess
    import sys

    import torch

    script = ROOT / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if torch.cuda.is_available():
        return  # (it would run the whole check)
    proc = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True,
                          env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, cwd=ROOT)
    assert proc.returncode == 2 and "no CUDA" in proc.stderr


def test_activation_memory_compares_both_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))  # (the workers import the test reward)
    out = tmp_path / "am.json"
    assert _script("activation_memory").main(["--config", str(ROOT / "configs/tiny-llama.yaml"), "--updates", "1", "--out", str(out),
                                               REWARD, "eval.before=false"]) == 0
    res = json.loads(out.read_text())["results"]
    assert [r["gradient_checkpointing"] for r in res] == [False, True]
    for r in res:
        assert len(r["updates"]) == len(r["timed_updates"]) == 1 and r["update_s"] > 0 and r["peak_above_mib"] >= 0
    assert res[0]["updates"][0]["packed_tokens"] == res[1]["updates"][0]["packed_tokens"]  # the same batch both ways


def test_stop_and_resume_sigterms_the_cli_and_the_resumed_run_matches_a_run_never_stopped(tmp_path, records_dir):
    """The real CLI in its own process, stopped from outside with SIGTERM, then resumed."""
    import os
    import shutil
    import subprocess
    import sys

    exe = shutil.which("vlm-treegrpo", path=str(Path(sys.executable).parent))
    cli = exe or f"{sys.executable} -m vlm_treegrpo.cli"
    args = ["optim.steps=30", "eval.before=false", "eval.after=false", "log.samples_every=0", "algo.diag_every=0", REWARD]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "CLI": cli, "PYTHON": sys.executable}
    ref = subprocess.run(cli.split() + ["train", "--config", str(ROOT / "configs/tiny-llama.yaml"), "log.name=ref", "log.progress=false",
                                        *args], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = subprocess.run(["bash", str(ROOT / "scripts/stop_and_resume.sh"), str(ROOT / "configs/tiny-llama.yaml"), "stopped", "2",
                           "runs/ref/metrics.jsonl", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "first session: exit 143" in proc.stdout and "second session: exit 0" in proc.stdout
    assert "steps matching the reference: 30 of 30 (resumed run logged 30)" in proc.stdout
    summary = json.loads((tmp_path / "runs/stopped/summary.json").read_text())
    assert summary["resumed_from_step"] >= 2 and summary["steps"] == 30
    (record,) = [json.loads(p.read_text()) for p in records_dir.glob("*_stop-and-resume-stopped_*.json")]
    assert record["command"].startswith("scripts/stop_and_resume.sh ") and record["command"].endswith(" ".join(args))
    f = record["figures"]
    assert (f["first_exit"], f["second_exit"], f["steps_matching_reference"], f["reference_steps"]) == (143, 0, 30, 30)


def test_update_proxy_counts_one_update_of_each_trainer(tmp_path):
    import importlib.util

    import torch

    out = tmp_path / "up.json"
    only = "ours 4x4" + (",TRL G=16" if importlib.util.find_spec("trl") else "")
    threads = torch.get_num_threads()
    try:
        assert _script("update_proxy").main(["--only", only, "--repeats", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    cases = json.loads(out.read_text())["cases"]
    ours = cases["ours 4x4"]
    assert ours["forwards"] == 1 and ours["trees_updated"] == 4  # one packed forward for the 4 trees
    assert ours["compute_ops"] > 30 * 40  # (30 layers, forward and backward) and the host syncs stay few
    assert 0 < ours["host_syncs"] < 40
    if "TRL G=16" in cases:
        trl = cases["TRL G=16"]
        assert trl["forwards"] >= 1 and trl["compute_ops"] > 30 * 40 and trl["median_ms"] > 0


def test_launch_proxy_counts_ops_inside_and_outside_the_forwards_and_writes_its_record(tmp_path, records_dir):
    import torch

    out = tmp_path / "lp.json"
    threads = torch.get_num_threads()
    argv = ["--only", "hf-generate,ours 16x1 graphs", "--repeats", "1", "--out", str(out)]
    try:
        assert _script("launch_proxy").main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    (path,) = records_dir.glob("*_cpu_launch-proxy-hf-generate+ours-16x1-graphs_*.json")
    record = json.loads(path.read_text())
    assert record["command"] == "python scripts/launch_proxy.py " + " ".join(argv) and record["figures"] == report
    assert len(record["commit"]) == 40 and isinstance(record["dirty"], bool) and record["machine"]["torch"] == torch.__version__
    assert path.name in (records_dir / "INDEX.md").read_text()
    cases = report["cases"]
    hf, graphs = cases["hf-generate"], cases["ours 16x1 graphs"]
    assert hf["forwards"] == 40 and graphs["forwards"] == 41  # (ours: one shared prefill, then 40 decode steps)
    for r in (hf, graphs):
        assert r["compute_ops_in_forwards"] + r["compute_ops_outside_forwards"] == r["compute_ops"] > 0
        assert r["compute_ops_in_forwards"] > 10 * r["compute_ops_outside_forwards"]  # the model's forwards dominate
    assert graphs["graph_eager_steps"] == 40 and graphs["graph_replays"] == 0 and graphs["graph_failures"] == []  # (no CUDA here)
