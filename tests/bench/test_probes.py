"""What a bench step measures: the step probe, summaries, pooled rounds, ours/TRL ratios."""
from __future__ import annotations

import gc

import pytest

from vlm_treegrpo.bench.probes import StepProbe, pool_rounds, ratios, summarize


def step_row(seconds: float, completions: int = 8) -> dict:
    return {"seconds": seconds, "rollout_seconds": seconds / 2, "completions": completions, "generated_tokens": 10 * completions,
            "completion_tokens": 10 * completions, "reward": 0.5, "zero_std_frac": 0.0}


def result(seconds: list[float], peak: float) -> dict:
    rows = [step_row(s) for s in seconds]
    return {"settings": {"trainer": "x"}, **summarize(rows, 1), "peak_rss_mib": peak, "peak_cuda_mib": None, "steps": rows}


def test_ratios_are_ours_over_trl():
    q = ratios({"seconds_per_step": 1.0, "completions_per_s": 30.0}, {"seconds_per_step": 2.0, "completions_per_s": 10.0})
    assert q["seconds_per_step"] == 0.5 and q["completions_per_s"] == 3.0 and q["peak_rss_mib"] is None


def test_rounds_pool_their_measured_steps():
    a, b = result([9.0, 1.0, 2.0, 3.0], 100.0), result([9.0, 4.0, 5.0, 6.0], 120.0)  # (the first step of each: warm-up)
    pooled = pool_rounds([a, b])
    assert pooled["seconds_per_step"] == 3.5  # the median of 1..6: warm-ups left out
    assert pooled["completions_per_s"] == 6 * 8 / 21  # totals over summed seconds
    assert pooled["peak_rss_mib"] == 120.0 and pooled["peak_cuda_mib"] is None
    assert pooled["step_seconds"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] and pooled["warmup"] == 1
    assert [r["seconds_per_step"] for r in pooled["rounds"]] == [2.0, 5.0]
    assert pool_rounds([a]) is a
    assert "error" in pool_rounds([a, {"error": "boom"}])


def test_slow_steps_are_those_over_twice_the_median_and_the_mean_counts_them():
    rows = [dict(step_row(s), cpu_seconds=s / 4, gc_seconds=0.0) for s in (9.0, 1.0, 1.2, 5.0, 0.9, 2.5)]
    out = summarize(rows, 1)  # measured: 1.0, 1.2, 5.0, 0.9, 2.5; median 1.2
    assert out["seconds_per_step"] == 1.2 and out["mean_seconds_per_step"] == pytest.approx(10.6 / 5)
    assert [x["index"] for x in out["slow_steps"]] == [2, 4]  # 5.0 and 2.5 > 2.4
    assert out["slow_steps"][0] == {"index": 2, "seconds": 5.0, "rollout_seconds": 2.5, "cpu_seconds": 1.25, "gc_seconds": 0.0}


def test_step_probe_counts_cpu_time_and_gc_pauses():
    with StepProbe("cpu") as probe:
        probe.start()
        junk = [[i] for i in range(200_000)]
        gc.collect()
        got = probe.stop()
    assert set(got) == {"cpu_seconds", "gc_seconds"}  # (no allocator counts on the CPU)
    assert got["cpu_seconds"] > 0 and got["gc_seconds"] > 0
    assert junk and probe._on_gc not in gc.callbacks  # the hook leaves with the context
