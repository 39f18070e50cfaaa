"""Our trainer on a :class:`~vlm_treegrpo.bench.run.BenchSpec`: one side of the benchmark.

The loop is :func:`vlm_treegrpo.train.loop.train`'s step without its extras (no evaluation, no
gradient diagnostics, no metrics or sample files): :func:`rollout_step` then :func:`update_step`,
each step on the next ``prompts_per_step`` bench prompts, with the same AdamW and constant
schedule. The config is ours at the bench's shared settings (one reward, correctness by
default; no KL; temperature 1, top-p 1, no top-k); a flat run is the K x 1 tree with the whole
budget as its thought, a tree splits the budget into ``thought_tokens`` + the rest.
"""
from __future__ import annotations

import contextlib
import time

from vlm_treegrpo.bench.run import WORKLOADS, BenchSpec, StepProbe, bench_task, measure, sync
from vlm_treegrpo.bench.compile_watch import CompileWatch
from vlm_treegrpo.rollout.graphs import STATS
from vlm_treegrpo.rollout.tree import SamplingParams


def ours_config(spec: BenchSpec):
    """Our :class:`~vlm_treegrpo.config.TrainConfig` for the spec."""
    from vlm_treegrpo.config import config_from_dict

    flat = spec.M == 1
    return config_from_dict({
        "model": {"name": spec.model_dir, "dtype": "float32", "autocast": spec.autocast, "threads": spec.threads,
                  "cudnn_attention": spec.cudnn_attention},
        "data": {"source": WORKLOADS[spec.workload][1], "difficulty": spec.difficulty, "seed": spec.seed},
        "rollout": {"K": spec.K, "M": spec.M, "thought_max_tokens": spec.max_new_tokens if flat else spec.thought_tokens,
                    "answer_max_tokens": 0 if flat else spec.max_new_tokens - spec.thought_tokens,
                    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "prompts_per_step": spec.prompts_per_step,
                    "compile_decode": spec.compile_decode, "drop_finished": spec.drop_finished,
                    "decode_graphs": spec.decode_graphs},
        "algo": {"rewards": [spec.reward], "loss": "grpo", "beta": 0.0, "updates_per_batch": 1, "diag_every": 0},
        "optim": {"steps": spec.warmup + spec.steps, "lr": spec.lr, "betas": [0.9, 0.99], "warmup_steps": 0,
                  "max_grad_norm": 1.0, "micro_batch": spec.micro_batch if spec.workload == "text" else spec.micro_batch * spec.G,
                  "seed": spec.seed},
        "eval": {"before": False, "after": False},
        "log": {"progress": False, "samples_every": 0},
    })


def run_ours(spec: BenchSpec) -> dict:
    """Our trainer's step (:func:`rollout_step` + :func:`update_step`, as :func:`train` runs them)."""
    import torch

    from vlm_treegrpo.train.optim import adamw, warmup_constant
    from vlm_treegrpo.policy.factory import make_policy
    from vlm_treegrpo.rewards.functions import RewardSet
    from vlm_treegrpo.train.runtime import resolve_device, setup
    from vlm_treegrpo.train.step import rollout_step, update_step

    cfg = ours_config(spec)
    torch.manual_seed(spec.seed)
    device = resolve_device(cfg.model.device)
    setup(cfg.model, device)
    policy = make_policy(spec.model_dir, device, cfg.model.dtype, cfg.model.attn_implementation)
    examples, instruction = bench_task(spec)
    prompts = [policy.encode(ex, instruction) for ex in examples]
    reward_set = RewardSet.from_config(cfg.algo.rewards, cfg.algo.reward_timeout_s)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay)
    scheduler = warmup_constant(optimizer, cfg.optim.warmup_steps)
    P, K, M = spec.prompts_per_step, spec.K, spec.M
    rows = []
    watch = CompileWatch() if spec.compile_decode else contextlib.nullcontext()
    probe = StepProbe(device, spec.sample_stacks_ms)
    with watch, probe:
        for step in range(spec.warmup + spec.steps):
            sl = slice(step * P, (step + 1) * P)
            probe.start()
            t0 = time.perf_counter()
            data = rollout_step(policy, examples[sl], prompts[sl], reward_set, cfg)
            sync(device)
            t1 = time.perf_counter()
            stats = update_step(policy, None, optimizer, scheduler, data, cfg, device)
            sync(device)
            t2 = time.perf_counter()
            rows.append({
                "seconds": t2 - t0,
                "rollout_seconds": t1 - t0,
                "completions": P * K * M,
                "completion_tokens": sum(len(t.leaf_ids(k, m)) for t in data.trees for k in range(K) for m in range(M)),
                "generated_tokens": sum(len(th) for t in data.trees for th in t.thoughts)
                + sum(len(a) for t in data.trees for conts in t.answers for a in conts),
                "reward": data.rewards.mean().item(),
                "zero_std_frac": data.metrics["zero_std_frac"],
                "trees_updated": stats["trees_updated"],
                **probe.stop(),
            })
    settings = {
        "trainer": "vlm_treegrpo", "K": K, "M": M, "thought_max_tokens": cfg.rollout.thought_max_tokens,
        "answer_max_tokens": cfg.rollout.answer_max_tokens, "branch_delimiters": cfg.rollout.branch_delimiters,
        "compile_decode": cfg.rollout.compile_decode, "decode_graphs": cfg.rollout.decode_graphs, "drop_finished": cfg.rollout.drop_finished, "loss": cfg.algo.loss, "agg": cfg.algo.agg, "scale": cfg.algo.scale, "autocast": cfg.model.autocast,
        "dtype": str(next(policy.model.parameters()).dtype), "attn_implementation": policy.model.config._attn_implementation, "micro_batch_rows": cfg.optim.micro_batch,
        "micro_batch_unit": "packed trees" if spec.workload == "text" else "rows (packed trees; leaves for Gemma3)", "device": str(device),
        "torch_threads": torch.get_num_threads(), "cudnn_attention": cfg.model.cudnn_attention,
        "cudnn_sdp_enabled": torch.backends.cuda.cudnn_sdp_enabled() if device.type == "cuda" else None,
    }
    out = {"settings": settings, **measure(rows, spec.warmup), "trees_updated": [r["trees_updated"] for r in rows]}
    if spec.compile_decode:
        out["compile"] = watch.report()  # (graphs, recompiles, CUDA-graph skips and why)
    if SamplingParams.of(cfg.rollout).graphs is not False:  # (auto steps aside under compiled decoding)
        out["decode_graphs"] = STATS.as_dict()  # (captures, replays, eager steps, failed captures and why)
    return out
