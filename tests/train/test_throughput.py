"""Throughput metrics: the peak table, the rates' arithmetic, and their place in a real run's files."""
from __future__ import annotations

import json

import torch

from vlm_treegrpo.config import config_from_dict
from vlm_treegrpo.train.loop import train
from vlm_treegrpo.train.throughput import device_peak, peak_for_name, throughput


def test_peak_for_name_picks_the_most_specific_entry():
    assert peak_for_name("NVIDIA H100 80GB HBM3")["peak_tflops"] == 989.0
    assert peak_for_name("NVIDIA H100 PCIe")["peak_tflops"] == 756.0
    assert peak_for_name("NVIDIA H200")["peak_tflops"] == 989.0
    assert peak_for_name("NVIDIA A100-SXM4-80GB")["peak_tflops"] == 312.0
    assert peak_for_name("NVIDIA L40S")["peak_tflops"] == 362.0
    assert peak_for_name("NVIDIA L4")["peak_tflops"] == 121.0
    unknown = peak_for_name("Some Accelerator 9000")
    assert unknown["peak_tflops"] is None and unknown["reason"]
    cpu = device_peak(torch.device("cpu"))
    assert cpu["peak_tflops"] is None and "CPU" in cpu["reason"]


def test_throughput_arithmetic():
    out = throughput(prompt_response_tokens=1000, generated_tokens=300, update_tokens=800, step_s=4.0,
                     rollout_s=3.0, update_s=0.5, params=10**9, peak_tflops=100.0)
    assert out["tokens_per_s"] == 250.0 and out["rollout_tokens_per_s"] == 100.0 and out["update_tokens_per_s"] == 1600.0
    assert out["update_mfu"] == 6 * 10**9 * 800 / 0.5 / 100e12
    none = throughput(1, 1, 0, 1.0, 0.0, 0.0, 10, None)
    assert none["update_mfu"] is None and none["rollout_tokens_per_s"] is None and none["update_tokens_per_s"] is None


def length_reward(completion: str, example) -> float:
    """A reward the random tiny model earns in varying amounts (groups with nonzero std)."""
    return (len(completion) % 7) / 6.0


def test_every_step_logs_the_rates_and_the_run_states_its_peak(tmp_path):
    cfg = config_from_dict(
        {"model": {"name": "tiny-llama"}, "data": {"n_train": 8, "n_test": 2},
         "rollout": {"K": 2, "M": 2, "thought_max_tokens": 4, "answer_max_tokens": 4, "prompts_per_step": 2}},
        ["algo.rewards=[test_throughput:length_reward]", "optim.steps=2", "eval.before=false", "eval.after=false",
         "log.progress=false", f"log.run_dir={tmp_path}", "log.name=t"],
    )
    train(cfg, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["rollout_tokens_per_s"] > 0 and r["update_mfu"] is None  # (CPU: no peak)
        assert r["generated_tokens"] <= 2 * (2 * 4 + 2 * 2 * 4)  # (each thought once, each continuation once)
        if r["update_tokens"]:
            assert r["update_tokens_per_s"] == r["update_tokens"] / r["time_update"]
    assert any(r["update_tokens"] > 0 for r in rows)
    peak = json.loads((tmp_path / "t" / "summary.json").read_text())["throughput_peak"]
    assert peak["device"] == "cpu" and peak["peak_tflops"] is None and peak["params"] > 0
