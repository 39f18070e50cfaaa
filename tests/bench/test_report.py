"""The bench's text table: a slow-step line says how many, their share and what the probe saw."""
from __future__ import annotations

from bench.test_probes import step_row

from vlm_treegrpo.bench.probes import summarize
from vlm_treegrpo.bench.report import format_table, signal_share


def test_the_table_lists_slow_steps_with_their_probe_figures():
    rows = [dict(step_row(s), cpu_seconds=s / 4, gc_seconds=0.0) for s in (9.0, 1.0, 1.2, 5.0, 0.9, 2.5)]
    out = summarize(rows, 1)
    line = format_table({"runs": [{"mode": "flat", "ours_shape": "4x1", "G": 4, "ours": {**out, "peak_rss_mib": 1.0}}]})
    assert "2 of 5 steps over 2x the median (max 5.00 s), 7.50 s of 10.60 s; 1.88 s CPU; 0.00 s GC" in line


def test_signal_is_the_share_of_measured_prompts_with_differing_rewards():
    assert signal_share({"warmup": 1, "zero_std_frac": [1.0, 0.25, 0.75]}) == 0.5
