"""Compare runs from their logs: curves of step metrics (a PNG) and a table of their summaries.

``vlm-treegrpo plot runs/a runs/b --out curves.png`` draws one panel per metric of
``metrics.jsonl`` (``--metrics``, default :data:`DEFAULT_METRICS`) with one line per run, against
the step or the seconds since the run's process started (``--x elapsed``); against the step,
``eval_accuracy`` also gets the summary's evaluations before (step 0) and after training. It
prints each run's summary: steps, seconds,
held-out accuracy before and after, the best evaluation. Needs matplotlib (the ``plots`` extra).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

DEFAULT_METRICS = ("reward", "eval_accuracy", "entropy", "zero_std_frac", "completion_tokens", "grad_norm")


RATE_KEYS = ("tokens_per_s", "rollout_tokens_per_s", "update_tokens_per_s", "update_mfu")
"""Step metrics divided by wall-clock time (:func:`vlm_treegrpo.train.throughput.throughput`)."""


def timeless(row: dict) -> dict:
    """A step row without its wall-clock fields (``time_*``, ``elapsed``, ``norm/diag_seconds``
    and the rates of :data:`RATE_KEYS`): what two runs making the same steps log alike."""
    return {k: v for k, v in row.items()
            if not k.startswith("time_") and k not in ("elapsed", "norm/diag_seconds", *RATE_KEYS)}


def read_rows(run: Path) -> list[dict]:
    """The step rows of ``run/metrics.jsonl`` (or of ``run`` itself when it is a file); a bad
    line is reported with its number."""
    path = Path(run) if Path(run).is_file() else Path(run) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"plot: {run} has no metrics.jsonl")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"plot: {path} line {i}: {err}") from err
    return rows


def series(rows: list[dict], metric: str, x: str = "step") -> tuple[list[float], list[float]]:
    """``(xs, ys)`` of the rows that hold a finite number for ``metric``."""
    xs, ys = [], []
    for r in rows:
        v = r.get(metric)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r[x])
            ys.append(float(v))
    return xs, ys


def with_summary_evals(run: Path, xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """An ``eval_accuracy`` series against the step, completed by ``summary.json``'s evaluation
    before training (step 0, or the warm start's) and after it (at its last step)."""
    path = Path(run) / "summary.json"
    if not path.exists():
        return xs, ys
    s = json.loads(path.read_text())
    points = dict(zip(xs, ys))
    start = s.get("eval_warm") or s.get("eval_before")
    if isinstance(start, dict):
        points.setdefault(0, start["accuracy"])
    if isinstance(s.get("eval_after"), dict) and "steps" in s:
        points[s["steps"]] = s["eval_after"]["accuracy"]
    keys = sorted(points)
    return keys, [points[k] for k in keys]


def summary_table(runs: list[Path]) -> str:
    """One line per run: steps, training seconds, accuracy before / after, best (``-`` where absent)."""
    def acc(d: dict, key: str) -> str:
        v = d.get(key)
        return f"{v['accuracy']:.3f}" if isinstance(v, dict) and "accuracy" in v else "-"

    head = f"{'run':<28} {'steps':>5} {'train s':>8} {'before':>7} {'after':>7} {'best (step)':>12}"
    lines = [head, "-" * len(head)]
    for run in runs:
        path = Path(run) / "summary.json"
        s = json.loads(path.read_text()) if path.exists() else {}
        best = s.get("best")
        best_s = f"{best['accuracy']:.3f} ({best['step']})" if best else "-"
        lines.append(f"{Path(run).name[:28]:<28} {s.get('steps', '-'):>5} {s.get('train_seconds', '-'):>8} "
                     f"{acc(s, 'eval_before'):>7} {acc(s, 'eval_after'):>7} {best_s:>12}")
    return "\n".join(lines)


def plot_runs(runs: list[Path], out: Path, metrics=DEFAULT_METRICS, x: str = "step") -> list[str]:
    """Draw ``metrics`` of ``runs`` into ``out`` (PNG); returns the metrics no run logged (not drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {Path(r).name: read_rows(Path(r)) for r in runs}
    dirs = {Path(r).name: Path(r) for r in runs}

    def points(name: str, metric: str) -> tuple[list[float], list[float]]:
        xs, ys = series(logs[name], metric, x)
        if metric == "eval_accuracy" and x == "step":
            xs, ys = with_summary_evals(dirs[name], xs, ys)
        return xs, ys

    drawn = [m for m in metrics if any(points(name, m)[0] for name in logs)]
    missing = [m for m in metrics if m not in drawn]
    if not drawn:
        raise ValueError(f"plot: none of {list(metrics)} is in the runs' metrics")
    cols = min(3, len(drawn))
    nrows = -(-len(drawn) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, drawn):
        for name in logs:
            xs, ys = points(name, metric)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, markersize=3, label=name)
        ax.set_title(metric)
        ax.set_xlabel("seconds since the process started" if x == "elapsed" else "step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return missing
