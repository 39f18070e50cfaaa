"""Peak memory and time of our training update with and without activation checkpointing
(``model.gradient_checkpointing``), on the same rollout batches.

Each setting runs in its own processes (so one's freed memory cannot hide the other's peak): each
builds the config's policy, makes a warm-up rollout and update (AdamW allocates its moments
there), then for ``--updates`` rounds samples a batch and measures the update alone. Memory is
the update's peak above what the process held before it: on the CPU the resident set's
high-water mark (reset through ``/proc/self/clear_refs`` before each update; glibc set to unmap
freed blocks, :data:`MALLOC_ENV`), on a GPU
``torch.cuda.max_memory_allocated``. The time is the median update of a second process with the
usual allocator. Prints a table and writes JSON.

    .venv/bin/python scripts/activation_memory.py --config configs/demo-smollm2.yaml optim.micro_batch=8
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch  # (imported here so the record names the GPU, where there is one)

from vlm_treegrpo.analysis.records import script_command, write_record

ROOT = Path(__file__).resolve().parents[1]
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
"""glibc hands every block of 64 KiB or more back to the system when it is freed, so the
resident set follows the live tensors (else freed pages stay resident and a later update's
peak hides in them)."""


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(config: str | None, overrides: list[str], updates: int) -> dict:
    from vlm_treegrpo.config import load_config
    from vlm_treegrpo.data.sources import task_from_config
    from vlm_treegrpo.train.optim import adamw, warmup_constant
    from vlm_treegrpo.rewards.functions import RewardSet
    from vlm_treegrpo.policy.factory import build_policy
    from vlm_treegrpo.train.runtime import resolve_device, setup
    from vlm_treegrpo.train.step import rollout_step, update_step
    from vlm_treegrpo.train.loop import PromptSampler

    cfg = load_config(config, overrides)
    device = resolve_device(cfg.model.device)
    setup(cfg.model, device)
    torch.manual_seed(cfg.optim.seed)
    policy = build_policy(cfg.model, device, cfg.model.training_dtype(device.type), cfg.model.attn_implementation)
    task = task_from_config(cfg.data)
    prompts = [policy.encode(ex, task.instruction) for ex in task.train]
    rewards = RewardSet.from_config(cfg.algo.rewards, cfg.algo.reward_timeout_s)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay)
    scheduler = warmup_constant(optimizer, cfg.optim.warmup_steps)
    sampler = PromptSampler(len(task.train), cfg.optim.seed)
    cuda = device.type == "cuda"
    rows = []
    for i in range(updates + 1):
        idx = sampler.take(cfg.rollout.prompts_per_step)
        data = rollout_step(policy, [task.train[j] for j in idx], [prompts[j] for j in idx], rewards, cfg)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")  # (resets the resident set's high-water mark)
            before = _rss_mib("VmRSS")
        t0 = time.perf_counter()
        stats = update_step(policy, None, optimizer, scheduler, data, cfg, device)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mib("VmHWM")
        if i:  # (the first is the warm-up: AdamW's moments are allocated there)
            rows.append({"update_s": seconds, "peak_above_mib": peak - before, "packed_tokens": int(data.packed.input_ids.numel()),
                         "trees_updated": stats["trees_updated"]})
    return {"gradient_checkpointing": cfg.model.gradient_checkpointing, "device": str(device), "model": cfg.model.name,
            "micro_batch": cfg.optim.micro_batch, "updates": rows,
            "update_s": statistics.median(r["update_s"] for r in rows),
            "peak_above_mib": max(r["peak_above_mib"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML config (default: the built-in defaults)")
    p.add_argument("--updates", type=int, default=3, help="measured updates per setting (after one warm-up)")
    p.add_argument("--out", default="runs/activation_memory.json")
    p.add_argument("--no-record", action="store_true", help="write no record under benchmarks/records/")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.config, args.overrides, args.updates)))
        return 0
    results = []
    for flag in ("false", "true"):
        cmd = [sys.executable, __file__, "--worker", "--updates", str(args.updates)]
        cmd += ["--config", args.config] if args.config else []
        cmd += [*args.overrides, f"model.gradient_checkpointing={flag}", "log.progress=false"]
        runs = {}
        for what, env in (("time", {}), ("memory", MALLOC_ENV)):  # (unmapping every free slows the step: time it apart)
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env})
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            runs[what] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = runs["memory"]
        r.update(update_s=runs["time"]["update_s"], timed_updates=runs["time"]["updates"], update_s_unmapping_frees=r["update_s"])
        results.append(r)
    print(f"{'checkpointing':<14} {'update s':>9} {'peak above MiB':>15} {'packed tokens':>14}")
    for r in results:
        print(f"{str(r['gradient_checkpointing']):<14} {r['update_s']:>9.2f} {r['peak_above_mib']:>15.0f} "
              f"{statistics.median(u['packed_tokens'] for u in r['updates']):>14.0f}")
    off, on = results
    print(f"checkpointing: {on['peak_above_mib'] / max(off['peak_above_mib'], 1e-9):.2f}x the update's peak memory, "
          f"{on['update_s'] / off['update_s']:.2f}x its time ({off['model']} on {off['device']}, micro_batch {off['micro_batch']})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": args.config, "overrides": args.overrides, "results": results}, indent=2))
    print(f"wrote {args.out}")
    if not args.no_record:
        figures = {"config": args.config, "overrides": args.overrides, "results": results}
        record = write_record("activation-memory", figures, command=script_command(__file__, argv))
        print(f"wrote {record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
