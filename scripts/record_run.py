"""Run a training config through the real CLI and write its outcome as a record.

    python scripts/record_run.py configs/demo-smollm2.yaml [--workload NAME] [OVERRIDES ...]

Runs ``vlm-treegrpo train --config FILE OVERRIDES`` in a subprocess, times it, reads the run's
``summary.json`` and writes ``benchmarks/records/<date>_<device>_<workload>_<commit>.json``
(:func:`vlm_treegrpo.analysis.records.write_record`): held-out accuracy before (or after the warm
start) and after, the gain, steps, the trainer's own seconds and the wall clock of the whole
command. The workload defaults to the config file's name. Exits with the training's status.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from vlm_treegrpo.analysis.records import git_state, write_record
from vlm_treegrpo.config import load_config

EVAL_KEYS = ("accuracy", "format_rate", "mean_completion_tokens", "n", "pass_at_k", "maj_at_n")


def figures_of(summary: dict, wall_s: float) -> dict:
    """The recorded figures of a run's ``summary.json``."""
    out: dict = {"wall_clock_s": round(wall_s, 1)}
    for key in ("model", "K", "M", "steps", "train_seconds", "wall_seconds", "accuracy_gain", "data_skipped",
                "reward_failures"):
        if key in summary:
            out[key] = summary[key]
    for key in ("eval_before", "eval_warm", "eval_after"):
        if isinstance(summary.get(key), dict):
            out[key] = {k: v for k, v in summary[key].items() if k in EVAL_KEYS}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="training config (YAML)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, as for `vlm-treegrpo train`")
    p.add_argument("--workload", help="the record's workload name (default: the config file's stem)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    cmd = [sys.executable, "-m", "vlm_treegrpo.cli", "train", "--config", args.config, *args.overrides]
    git = git_state()  # (the code that runs: later commits do not change it)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    wall = time.perf_counter() - t0
    summary_path = cfg.log.path / "summary.json"
    if proc.returncode != 0 or not summary_path.exists():
        print(f"record_run: training exited with {proc.returncode}; no record written ({summary_path})", file=sys.stderr)
        return proc.returncode or 1
    command = "vlm-treegrpo train --config " + " ".join(shlex.quote(a) for a in [args.config, *args.overrides])
    path = write_record(args.workload or Path(args.config).stem, figures_of(json.loads(summary_path.read_text()), wall),
                        command=command, extra={"config": cfg.to_dict()}, git=git)
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
