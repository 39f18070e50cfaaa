"""Write the benchmark record of the VLM job from its files.

Reads ``runs/demo-vlm/summary.json`` (the GRPO run) and the cached model's ``alignment.json``
(the alignment stage), and writes ``benchmarks/records/<date>_<device>_demo-vlm_<commit>.json``
with the held-out accuracy before and after GRPO and the minutes of each stage. ``--wall-minutes``
is the whole ``make demo-vlm`` as timed from outside (alignment, loading, GRPO, evaluations).

    /usr/bin/time -f %e make demo-vlm            # note the seconds
    .venv/bin/python scripts/demo_vlm_record.py --wall-minutes 17.5
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vlm_treegrpo.analysis.records import write_record
from vlm_treegrpo.models import smolvlm_smollm2


def branching(samples: list[dict], K: int, M: int) -> dict:
    """How much the saved trees branch: the share of thoughts whose M continuations are not all
    the same text, and the mean number of distinct thoughts per tree (a thought: the longest
    common prefix of its M leaves, so two thoughts that differ only after the cut count as one)."""
    siblings_differ, distinct = [], []
    for row in samples:
        leaves = row["completions"]  # K*M texts, thought-major
        thoughts = []
        for k in range(K):
            group = leaves[k * M : (k + 1) * M]
            siblings_differ.append(len(set(group)) > 1)
            thoughts.append(os.path.commonprefix(group))
        distinct.append(len(set(thoughts)))
    return {"trees_saved": len(samples), "siblings_differ_frac": round(sum(siblings_differ) / max(1, len(siblings_differ)), 3),
            "distinct_thoughts_per_tree": round(sum(distinct) / max(1, len(distinct)), 2)}


def figures(summary: dict, alignment: dict, wall_minutes: float | None) -> dict:
    """The record's figures from the run's summary and the alignment's summary."""
    warm, after = summary["eval_warm"], summary["eval_after"]
    out = {
        "eval_warm_accuracy": warm["accuracy"],
        "eval_after_accuracy": after["accuracy"],
        "gain_points": round(100 * (after["accuracy"] - warm["accuracy"]), 1),
        "n": after["n"],
        "eval_warm_format_rate": warm.get("format_rate"),
        "eval_after_format_rate": after.get("format_rate"),
        "grpo_steps": summary["steps"],
        "align_minutes": round(alignment["prepare_seconds"] / 60, 2),
        "align_describe_exact": alignment["describe_exact"],
        "align_describe_exact_by_kind": alignment["describe_exact_by_kind"],
        "grpo_minutes": round(summary["train_seconds"] / 60, 2),
        "train_job_minutes": round(summary["wall_seconds"] / 60, 2),
        "total_minutes": round(alignment["prepare_seconds"] / 60 + summary["wall_seconds"] / 60, 2),
    }
    if wall_minutes is not None:
        out["make_demo_vlm_wall_minutes"] = wall_minutes
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/demo-vlm", help="the run directory of configs/demo-vlm.yaml")
    p.add_argument("--wall-minutes", type=float, help="the whole make demo-vlm, timed from outside")
    args = p.parse_args(argv)
    summary = json.loads((Path(args.run) / "summary.json").read_text())
    alignment = json.loads((smolvlm_smollm2.model_dir() / "alignment.json").read_text())
    samples = [json.loads(line) for line in (Path(args.run) / "samples.jsonl").read_text().splitlines() if line.strip()]
    measured = {**figures(summary, alignment, args.wall_minutes), **branching(samples, summary["K"], summary["M"])}
    path = write_record("demo-vlm", measured,
                        command="make demo-vlm (an uncached alignment, then configs/demo-vlm.yaml)",
                        extra={"alignment_settings": alignment.get("settings")})
    print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
