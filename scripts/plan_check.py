"""Check the memory plan against a measured peak: one CPU training step of a random-weight preset,
its peak resident memory above the process's baseline, beside what ``vlm-treegrpo plan`` says
for the same run (fp32 activations: no autocast on the CPU). Writes a benchmark record.

    .venv/bin/python scripts/plan_check.py [--model random:smollm2-135m]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

from vlm_treegrpo.analysis.memory_plan import Workload, model_size, plan_rows
from vlm_treegrpo.analysis.records import write_record
from vlm_treegrpo.config import config_from_dict
from vlm_treegrpo.data.sources import task_from_config
from vlm_treegrpo.models.shapes import shape_for
from vlm_treegrpo.policy.factory import make_policy
from vlm_treegrpo.train.loop import train

ROLLOUT = {"K": 2, "M": 2, "thought_max_tokens": 8, "answer_max_tokens": 8, "prompts_per_step": 2}


def _config(model: str, ckpt: bool, run_dir: str):
    return config_from_dict(
        {"model": {"name": model, "gradient_checkpointing": ckpt, "threads": 2}, "data": {"n_train": 16, "n_test": 1},
         "rollout": ROLLOUT},
        ["optim.steps=1", "optim.micro_batch=2", "algo.beta=0.01", "eval.before=false", "eval.after=false",
         "log.progress=false", f"log.run_dir={run_dir}", "log.name=plan-check"],
    )


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024**2


def measure_one(model: str, ckpt: bool) -> dict:
    """In this process: the baseline RSS (everything imported), then the peak over one step."""
    base = _rss_gib()
    with tempfile.TemporaryDirectory() as tmp:
        summary = train(_config(model, ckpt, tmp), quiet=True)
        rows = [json.loads(x) for x in open(f"{tmp}/plan-check/metrics.jsonl")]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB
    return {"baseline_gib": base, "peak_gib": peak, "step_gib": peak - base, "steps": summary["steps"],
            "completion_tokens": rows[0]["completion_tokens"], "trees_updated": rows[0]["trees_updated"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random:smollm2-135m")
    parser.add_argument("--one", choices=("full", "ckpt"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.model, args.one == "ckpt")))
        return
    cfg = _config(args.model, False, "/tmp")
    policy = make_policy(args.model, "cpu", layers=1)
    task = task_from_config(cfg.data)
    prompt_tokens = max(len(policy.encode(ex, task.instruction)) for ex in task.train)
    size = model_size(shape_for(args.model))
    workload = Workload(gpus=1, gpu_memory_gib=24, prompt_tokens=prompt_tokens, prompts_per_step=ROLLOUT["prompts_per_step"],
                        K=ROLLOUT["K"], M=ROLLOUT["M"], thought_tokens=ROLLOUT["thought_max_tokens"],
                        answer_tokens=ROLLOUT["answer_max_tokens"], micro_batch=2, reference=True, act_bytes=4)
    rows = {r["checkpointing"]: r for r in plan_rows(size, workload) if not r["lora"]}
    figures = {"params": size.params, "prompt_tokens": prompt_tokens, "tree_tokens": workload.tree_tokens}
    for setting, ckpt in (("full", False), ("ckpt", True)):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--one", setting],
                             capture_output=True, text=True, check=True)
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        planned = rows[ckpt]
        figures[setting] = {
            "measured_step_gib": round(measured["step_gib"], 3),
            "measured_peak_rss_gib": round(measured["peak_gib"], 3),
            "baseline_rss_gib": round(measured["baseline_gib"], 3),
            "planned_total_gib": round(planned["total"], 3),
            "planned": {k: round(planned[k], 3) for k in ("weights", "gradients", "optimizer", "reference", "activations", "logits", "kv_cache")},
            "planned_over_measured": round(planned["total"] / measured["step_gib"], 3),
            "completion_tokens": measured["completion_tokens"],
        }
        print(setting, json.dumps(figures[setting]))
    path = write_record(f"memory-plan-check-{args.model.replace('random:', '')}", figures,
                        command=[sys.executable, "scripts/plan_check.py", "--model", args.model])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
