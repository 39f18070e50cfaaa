"""``vlm-treegrpo plot``: the series it draws, the summary table, the PNG, and bad logs named."""
from __future__ import annotations

import json

import pytest

from vlm_treegrpo.cli import main as cli_main
from vlm_treegrpo.analysis.plots import plot_runs, read_rows, series, summary_table, with_summary_evals


def _run(tmp_path, name, rows, summary=None):
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_series_keeps_finite_numbers_and_the_summary_completes_the_accuracy(tmp_path):
    rows = [{"step": 1, "elapsed": 3.0, "reward": 0.2, "entropy": None},
            {"step": 2, "elapsed": 6.0, "reward": float("nan"), "eval_accuracy": 0.5},
            {"step": 3, "elapsed": 9.0, "reward": 0.4, "entropy": 0.7}]
    assert series(rows, "reward") == ([1, 3], [0.2, 0.4])
    assert series(rows, "entropy", "elapsed") == ([9.0], [0.7])
    run = _run(tmp_path, "a", rows, {"steps": 3, "eval_before": {"accuracy": 0.1}, "eval_after": {"accuracy": 0.6}})
    assert with_summary_evals(run, *series(rows, "eval_accuracy")) == ([0, 2, 3], [0.1, 0.5, 0.6])
    table = summary_table([run]).splitlines()
    assert table[2].split() == ["a", "3", "-", "0.100", "0.600", "-"]


def test_plot_writes_a_png_and_names_what_no_run_logged(tmp_path, capsys):
    a = _run(tmp_path, "a", [{"step": s, "reward": s / 10, "entropy": 1 / s} for s in (1, 2, 3)],
             {"steps": 3, "train_seconds": 12.5, "best": {"step": 2, "accuracy": 0.75}})
    b = _run(tmp_path, "b", [{"step": s, "reward": s / 20} for s in (1, 2)])
    out = tmp_path / "p.png"
    assert plot_runs([a, b], out, ("reward", "entropy", "kl")) == ["kl"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["plot", str(a), str(b), "--metrics", "reward,kl", "--out", str(tmp_path / "q.png")]) == 0
    printed = capsys.readouterr().out
    assert "0.750 (2)" in printed and "(not logged by any run: kl)" in printed
    with pytest.raises(ValueError, match="none of"):
        plot_runs([b], out, ("kl",))


def test_bad_logs_are_named(tmp_path, capsys):
    bad = _run(tmp_path, "bad", [{"step": 1}])
    with (bad / "metrics.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2"):
        read_rows(bad)
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2"):
        read_rows(bad / "metrics.jsonl")  # (a file is read as it is)
    assert cli_main(["plot", str(tmp_path / "missing")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
