"""The benchmark: spec checks, and the real ``vlm-treegrpo bench --quick`` on tiny-llama."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_treegrpo.bench.run import BenchSpec, ratios, tree_shape
from vlm_treegrpo.config import ConfigError

RESULT_KEYS = {"settings", "seconds_per_step", "step_seconds", "completions_per_s", "generated_tokens_per_s",
               "completion_tokens_per_s", "mean_completion_tokens", "peak_rss_mib", "rollout_seconds", "update_seconds",
               "reward", "zero_std_frac", "warmup"}


def varied_reward(completion: str, example) -> float:
    """A reward the random tiny model earns in varying amounts (so updates are not skipped)."""
    return (len(completion) % 7) / 6.0


def _cli() -> list[str]:
    exe = shutil.which("vlm-treegrpo", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "vlm_treegrpo.cli"]


def _bench(tmp_path, *extra) -> dict:
    out = tmp_path / "bench.json"
    cmd = _cli() + ["bench", "--quick", "--threads", "1", "--reward", "test_bench:varied_reward", "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "s/step" in proc.stdout
    return json.loads(out.read_text())


def test_tree_shape_is_the_squarest_split_with_m_at_least_2():
    assert tree_shape(16, None) == (4, 4)
    assert tree_shape(8, None) == (4, 2)
    assert tree_shape(6, "3x2") == (3, 2)
    for G, tree in ((7, None), (16, "4by4")):
        with pytest.raises(ConfigError):
            tree_shape(G, tree)


def test_spec_rejects_a_tree_that_is_not_g_leaves():
    with pytest.raises(ConfigError, match="K\\*M"):
        BenchSpec("text", "m", "/x", G=16, K=4, M=2, max_new_tokens=40, thought_tokens=16, prompts_per_step=4, micro_batch=4, steps=3)
    with pytest.raises(ConfigError, match="micro_batch"):
        BenchSpec("text", "m", "/x", G=8, K=4, M=2, max_new_tokens=40, thought_tokens=16, prompts_per_step=4, micro_batch=3, steps=3)


def test_ratios_are_ours_over_trl():
    q = ratios({"seconds_per_step": 1.0, "completions_per_s": 30.0}, {"seconds_per_step": 2.0, "completions_per_s": 10.0})
    assert q["seconds_per_step"] == 0.5 and q["completions_per_s"] == 3.0 and q["peak_rss_mib"] is None


def _step(seconds: float, completions: int = 8) -> dict:
    return {"seconds": seconds, "rollout_seconds": seconds / 2, "completions": completions, "generated_tokens": 10 * completions,
            "completion_tokens": 10 * completions, "reward": 0.5, "zero_std_frac": 0.0}


def _result(seconds: list[float], peak: float) -> dict:
    from vlm_treegrpo.bench.run import summarize

    rows = [_step(s) for s in seconds]
    return {"settings": {"trainer": "x"}, **summarize(rows, 1), "peak_rss_mib": peak, "peak_cuda_mib": None, "steps": rows}


def test_rounds_pool_their_measured_steps():
    from vlm_treegrpo.bench.run import pool_rounds

    a, b = _result([9.0, 1.0, 2.0, 3.0], 100.0), _result([9.0, 4.0, 5.0, 6.0], 120.0)  # (the first step of each: warm-up)
    pooled = pool_rounds([a, b])
    assert pooled["seconds_per_step"] == 3.5  # the median of 1..6: warm-ups left out
    assert pooled["completions_per_s"] == 6 * 8 / 21  # totals over summed seconds
    assert pooled["peak_rss_mib"] == 120.0 and pooled["peak_cuda_mib"] is None
    assert pooled["step_seconds"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] and pooled["warmup"] == 1
    assert [r["seconds_per_step"] for r in pooled["rounds"]] == [2.0, 5.0]
    assert pool_rounds([a]) is a
    assert "error" in pool_rounds([a, {"error": "boom"}])


def test_slow_steps_are_those_over_twice_the_median_and_the_mean_counts_them():
    from vlm_treegrpo.bench.run import format_table, summarize

    rows = [dict(_step(s), cpu_seconds=s / 4, gc_seconds=0.0) for s in (9.0, 1.0, 1.2, 5.0, 0.9, 2.5)]
    out = summarize(rows, 1)  # measured: 1.0, 1.2, 5.0, 0.9, 2.5; median 1.2
    assert out["seconds_per_step"] == 1.2 and out["mean_seconds_per_step"] == pytest.approx(10.6 / 5)
    assert [x["index"] for x in out["slow_steps"]] == [2, 4]  # 5.0 and 2.5 > 2.4
    assert out["slow_steps"][0] == {"index": 2, "seconds": 5.0, "rollout_seconds": 2.5, "cpu_seconds": 1.25, "gc_seconds": 0.0}
    line = format_table({"runs": [{"mode": "flat", "ours_shape": "4x1", "G": 4, "ours": {**out, "peak_rss_mib": 1.0}}]})
    assert "2 of 5 steps over 2x the median (max 5.00 s), 7.50 s of 10.60 s; 1.88 s CPU; 0.00 s GC" in line


def test_step_probe_counts_cpu_time_and_gc_pauses():
    import gc

    from vlm_treegrpo.bench.run import StepProbe

    with StepProbe("cpu") as probe:
        probe.start()
        junk = [[i] for i in range(200_000)]
        gc.collect()
        got = probe.stop()
    assert set(got) == {"cpu_seconds", "gc_seconds"}  # (no allocator counts on the CPU)
    assert got["cpu_seconds"] > 0 and got["gc_seconds"] > 0
    assert junk and probe._on_gc not in gc.callbacks  # the hook leaves with the context


def test_rounds_alternate_which_trainer_goes_first(monkeypatch, tmp_path):
    import vlm_treegrpo.bench.run as B

    order = []

    def fake_spawn(trainer, spec, workdir, label):
        order.append(label)
        return _result([9.0, 1.0] if trainer == "ours" else [9.0, 3.0 + len(order)], 1.0)

    monkeypatch.setattr(B, "spawn", fake_spawn)
    spec = BenchSpec("text", "m", "/x", G=4, K=4, M=1, max_new_tokens=8, thought_tokens=4, prompts_per_step=1, micro_batch=1, steps=1)
    (row,) = B.compare(spec, ["flat"], ["ours", "trl"], None, tmp_path, rounds=3)
    assert order == ["flat-ours-r1", "flat-trl-r1", "flat-trl-r2", "flat-ours-r2", "flat-ours-r3", "flat-trl-r3"]
    assert row["round_ratios"] == pytest.approx([5.0, 6.0, 9.0])  # TRL's rounds took 5, 6 and 9 s a step, ours 1 s
    assert row["ratios"]["completions_per_s"] == pytest.approx(20 / 3)  # pooled: 20 s of TRL steps against 3 s of ours
    assert "rounds" in B.format_table({"runs": [row]})


def test_quick_bench_ours_writes_the_report(tmp_path):
    report = _bench(tmp_path, "--trainers", "ours", "--modes", "tree")
    assert {"workload", "model", "model_dir", "machine", "spec", "runs", "notes"} <= set(report)
    assert report["model"] == "tiny-llama" and report["spec"]["G"] == 4
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
    assert report["spec"]["reward"] == "test_bench:varied_reward"
    assert min(ours["trees_updated"]) > 0 and ours["update_seconds"] > 0  # varied rewards: the update runs
    assert all(step["cpu_seconds"] > 0 and step["gc_seconds"] >= 0 for step in ours["steps"])  # the step probe's figures
    assert ours["mean_seconds_per_step"] > 0 and isinstance(ours["slow_steps"], list)


def test_bench_reports_what_graph_decoding_and_compiled_decoding_did(tmp_path):
    """--decode-graphs: ours' JSON counts the steps of the graph loop (eager here: no CUDA);
    --compile-decode: what torch.compile did (graphs captured, frames)."""
    (row,) = _bench(tmp_path, "--trainers", "ours", "--modes", "flat", "--decode-graphs")["runs"]
    graphs = row["ours"]["decode_graphs"]
    assert row["ours"]["settings"]["decode_graphs"] is True and graphs["eager_steps"] > 0 and graphs["failures"] == []
    (row,) = _bench(tmp_path, "--trainers", "ours", "--modes", "flat", "--compile-decode")["runs"]
    assert row["ours"]["compile"]["counters"]["stats"]["unique_graphs"] >= 1 and "decode_graphs" not in row["ours"]


def test_both_trainers_hold_the_same_weights_and_attention(tmp_path):
    """fp32 weights (under bf16 autocast) on every device for both sides, and TRL gets the
    attention kernel ours picks (``auto`` would give bf16 weights on a GPU)."""
    pytest.importorskip("trl")
    import torch

    from vlm_treegrpo.bench.ours import ours_config
    from vlm_treegrpo.bench.trl import grpo_args
    from vlm_treegrpo.models.loader import pick_attn_implementation

    spec = BenchSpec(workload="text", model="m", model_dir=str(tmp_path), G=4, K=2, M=2, max_new_tokens=16, thought_tokens=6,
                     prompts_per_step=2, micro_batch=2, steps=1)
    assert ours_config(spec).model.dtype == "float32" and ours_config(spec).model.autocast == "bfloat16"
    args = grpo_args(spec, str(tmp_path))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert args.model_init_kwargs == {"dtype": "float32", "attn_implementation": pick_attn_implementation(device, torch.float32)}
    assert args.bf16 is True


def test_keep_finished_reaches_our_rollout_config(tmp_path):
    import argparse

    from vlm_treegrpo.bench.run import add_arguments
    from vlm_treegrpo.bench.ours import ours_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)

    spec = BenchSpec(workload="text", model="m", model_dir=str(tmp_path), G=4, K=2, M=2, max_new_tokens=16, thought_tokens=6,
                     prompts_per_step=2, micro_batch=2, steps=1)
    assert ours_config(spec).rollout.drop_finished is True
    assert ours_config(dataclasses.replace(spec, drop_finished=False)).rollout.drop_finished is False
    assert parser.parse_args(["--keep-finished"]).keep_finished is True and parser.parse_args([]).keep_finished is False


def test_quick_bench_against_trl(tmp_path):
    pytest.importorskip("trl")
    report = _bench(tmp_path, "--trainers", "trl", "--modes", "flat")
    (row,) = report["runs"]
    assert "ours" not in row and "ratios" not in row
    trl = row["trl"]
    assert RESULT_KEYS <= set(trl), trl.get("error")
    s = trl["settings"]
    assert s["num_generations"] == 4 and s["max_completion_length"] == 16 and s["beta"] == 0.0
    assert s["num_iterations"] == 1 and s["generation_batch_size"] == 2 * 4 and s["gradient_checkpointing"] is False
    assert s["prompt_ids_match_ours"] is True
    assert s["model_init_kwargs"] == {"dtype": "float32", "attn_implementation": "sdpa"}
    assert trl["generated_tokens_per_s"] == trl["completion_tokens_per_s"]  # flat: every leaf token is sampled
    assert max(trl["zero_std_frac"]) < 1.0
    assert all(step["cpu_seconds"] > 0 for step in trl["steps"])  # the step probe runs in TRL's loop too


def test_race_trl_with_lora_trains_the_same_adapters_and_saves_a_plain_model(tmp_path):
    """With ``model.lora_r > 0`` TRL gets our adapters as its ``peft_config`` (it would otherwise
    fully fine-tune) and its result is saved merged, as ours, for the same evaluator."""
    pytest.importorskip("trl")
    import torch

    from vlm_treegrpo.bench.run import prepare_model_dir
    from vlm_treegrpo.bench.trl import race_trl
    from vlm_treegrpo.config import config_from_dict
    from vlm_treegrpo.policy.factory import make_policy

    model_dir = prepare_model_dir("tiny-llama", tmp_path)
    cfg = config_from_dict({}, ["model.name=tiny-llama", "model.lora_r=4", "model.lora_targets=[q_proj,v_proj]", "rollout.K=2",
                                "rollout.M=1", "rollout.thought_max_tokens=8", "rollout.answer_max_tokens=0",
                                "rollout.prompts_per_step=2", "optim.micro_batch=2", "optim.lr=0.05", "data.n_train=8",
                                "algo.rewards=[vlm_treegrpo.bench.run:length_signal_reward]"])
    trained = []
    from trl import GRPOTrainer

    orig = GRPOTrainer.train
    GRPOTrainer.train = lambda self, *a, **k: trained.append(type(self.model).__name__) or orig(self, *a, **k)
    try:
        result = race_trl(cfg, model_dir, str(tmp_path / "out"), budget_s=0.0, max_steps=1)
    finally:
        GRPOTrainer.train = orig
    assert result["steps"] == 1 and trained[0].startswith("PeftModel")
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    loaded = make_policy(str(tmp_path / "out"), "cpu", "float32")
    base = make_policy(model_dir, "cpu", "float32")
    assert not any("lora" in n for n, _ in loaded.model.named_parameters())
    changed = [n for n, p in loaded.model.named_parameters() if not torch.equal(p, base.model.get_parameter(n))]
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)  # only the adapted weights moved


@pytest.mark.parametrize("flag,value", [("--rounds", "0"), ("--steps", "0"), ("--warmup", "-1")])
def test_bench_rejects_counts_out_of_range_before_running(flag, value, tmp_path):
    import argparse

    from vlm_treegrpo.bench.run import add_arguments, run

    p = argparse.ArgumentParser()
    add_arguments(p)
    with pytest.raises(ConfigError, match="--rounds >= 1"):
        run(p.parse_args(["--model", "tiny-llama", "--trainers", "ours", flag, value, "--out", str(tmp_path / "b.json")]))
    assert not (tmp_path / "b.json").exists()


def test_sdpa_off_names_the_kernels_and_reaches_both_workers(tmp_path, monkeypatch):
    import argparse

    import torch

    import vlm_treegrpo.bench.run as B

    p = argparse.ArgumentParser()
    B.add_arguments(p)
    with pytest.raises(ConfigError, match="--sdpa-off takes a comma list of flash, mem_efficient, cudnn, got cudnn,fast"):
        B.run(p.parse_args(["--model", "tiny-llama", "--sdpa-off", "cudnn,fast", "--out", str(tmp_path / "b.json")]))
    spec = BenchSpec("text", "m", "/x", G=4, K=4, M=1, max_new_tokens=8, thought_tokens=4, prompts_per_step=1, micro_batch=1,
                     steps=1, sdpa_off=["cudnn"])
    assert spec.sdpa_off == ("cudnn",) and dataclasses.asdict(spec)["sdpa_off"] == ("cudnn",)
    seen = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", lambda on: seen.append(on))
    import json

    import vlm_treegrpo.bench.ours as O

    monkeypatch.setattr(O, "run_ours", lambda spec: {"sdpa_off": list(spec.sdpa_off)})
    (tmp_path / "spec.json").write_text(json.dumps(dataclasses.asdict(spec)))
    B._worker("ours", str(tmp_path / "spec.json"), str(tmp_path / "result.json"))  # a worker's process, in this one
    assert seen == [False] and json.loads((tmp_path / "result.json").read_text()) == {"sdpa_off": ["cudnn"]}
