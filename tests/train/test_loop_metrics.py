"""The normalization diagnostics and RREDCoT reach metrics.jsonl from a real (tiny) training step."""
from __future__ import annotations

import json
import math

import pytest

from vlm_treegrpo.config import config_from_dict
from vlm_treegrpo.train.loop import train


def length_reward(completion: str, example) -> float:
    """A reward the random tiny model can earn in varying amounts (so groups have nonzero std)."""
    return (len(completion) % 7) / 6.0


def _run(tmp_path, *overrides):
    cfg = config_from_dict(
        {"model": {"name": "tiny-llama"}, "data": {"n_train": 16, "n_test": 2},
         "rollout": {"K": 2, "M": 2, "thought_max_tokens": 6, "answer_max_tokens": 6, "prompts_per_step": 3}},
        ["algo.rewards=[test_loop_metrics:length_reward]", "algo.diag_every=1", "optim.steps=1",
         "eval.before=false", "eval.after=false", "log.progress=false", f"log.run_dir={tmp_path}", "log.name=m", *overrides],
    )
    train(cfg, quiet=True)
    return [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]


def test_one_step_writes_the_normalization_diagnostics(tmp_path):
    (row,) = _run(tmp_path)
    for key in ("reward_std_within", "reward_std_spread", "zero_std_frac", "norm/update_with_std",
                "norm/update_without_std", "norm/update_ratio", "norm/grad_cosine"):
        assert key in row, key
    assert row["reward_std_within"] > 0 and row["zero_std_frac"] < 1
    assert row["norm/update_without_std"] > 0 and math.isfinite(row["norm/update_ratio"])
    assert -1.0 <= row["norm/grad_cosine"] <= 1.0


@pytest.mark.parametrize("values", ["answer_prob", "importance"])
def test_one_rredcot_step_writes_its_metrics(tmp_path, values):
    (row,) = _run(tmp_path, "algo.credit=rredcot", f"algo.rredcot_values={values}", "algo.diag_every=0")
    assert row["rredcot/segments_per_leaf"] >= 1 and row["rredcot/probe_tokens"] > 0
    assert "norm/update_ratio" not in row and math.isfinite(row["loss"])


def test_time_budget_stops_the_loop_and_reports_the_steps_that_ran(tmp_path):
    rows = _run(tmp_path, "optim.steps=5", "optim.time_budget_s=1e-9", "algo.diag_every=0")
    assert [r["step"] for r in rows] == [1]  # the budget is spent during step 1
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["steps"] == 1
    rows = _run(tmp_path, "optim.steps=2", "optim.time_budget_s=0", "algo.diag_every=0")
    assert [r["step"] for r in rows] == [1, 2]  # 0 = no limit


def test_set_threads_all_cores_on_the_cpu_few_on_a_gpu_host_or_as_configured():
    import torch

    from vlm_treegrpo.train.runtime import GPU_HOST_THREADS, set_threads

    before = torch.get_num_threads()
    try:
        set_threads(0, torch.device("cpu"))
        assert torch.get_num_threads() == before  # torch's default: left alone
        set_threads(0, torch.device("cuda"))  # no GPU needed: only the count is set
        assert torch.get_num_threads() == min(GPU_HOST_THREADS, before)
        set_threads(1, torch.device("cuda"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_setup_keeps_sdpa_off_cudnn_on_a_gpu_unless_asked():
    import torch

    from vlm_treegrpo.config import ModelConfig
    from vlm_treegrpo.train.runtime import setup

    threads, cudnn = torch.get_num_threads(), torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        setup(ModelConfig(threads=threads), torch.device("cpu"))
        assert torch.backends.cuda.cudnn_sdp_enabled()  # the CPU: nothing to choose
        setup(ModelConfig(threads=threads, cudnn_attention=True), torch.device("cuda"))  # (only the flag is set: no GPU needed)
        assert torch.backends.cuda.cudnn_sdp_enabled()  # asked for: torch's choice left alone
        setup(ModelConfig(threads=threads), torch.device("cuda"))
        assert not torch.backends.cuda.cudnn_sdp_enabled()  # the default
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()  # the others stay
        setup(ModelConfig(threads=threads, cudnn_attention=True), torch.device("cuda"))
        assert not torch.backends.cuda.cudnn_sdp_enabled()  # True never turns it on where something turned it off (bench --sdpa-off)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        torch.set_num_threads(threads)
