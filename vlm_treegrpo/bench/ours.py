"""Our trainer on a :class:`~vlm_treegrpo.bench.spec.BenchSpec`: one side of the benchmark.

The loop is :func:`vlm_treegrpo.train.loop.train`'s step without its extras (no evaluation, no
gradient diagnostics, no metrics or sample files): :func:`rollout_step` then :func:`update_step`,
each step on the next ``prompts_per_step`` bench prompts, with the same AdamW and constant
schedule. The config is the spec's ``train`` as it is (a flat run is the K x 1 tree with the
whole budget as its thought; :func:`~vlm_treegrpo.bench.spec.reshaped`).
"""
from __future__ import annotations

import contextlib
import time

import torch

from vlm_treegrpo.bench.compile_watch import CompileWatch
from vlm_treegrpo.bench.probes import StepProbe, measure, sync
from vlm_treegrpo.bench.spec import BenchSpec, bench_task
from vlm_treegrpo.policy.factory import make_policy
from vlm_treegrpo.rewards.functions import RewardSet
from vlm_treegrpo.rollout.graphs import STATS
from vlm_treegrpo.rollout.tree import SamplingParams
from vlm_treegrpo.train.optim import adamw, warmup_constant
from vlm_treegrpo.train.runtime import resolve_device, setup
from vlm_treegrpo.train.step import rollout_step, update_step


def run_ours(spec: BenchSpec) -> dict:
    """Our trainer's step (:func:`rollout_step` + :func:`update_step`, as :func:`train` runs them)."""
    cfg = spec.train
    torch.manual_seed(cfg.optim.seed)
    device = resolve_device(cfg.model.device)
    setup(cfg.model, device)
    policy = make_policy(spec.model_dir, device, cfg.model.dtype, cfg.model.attn_implementation)
    examples, instruction = bench_task(spec)
    prompts = [policy.encode(ex, instruction) for ex in examples]
    reward_set = RewardSet.from_config(cfg.algo.rewards, cfg.algo.reward_timeout_s)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay)
    scheduler = warmup_constant(optimizer, cfg.optim.warmup_steps)
    P, K, M = spec.prompts_per_step, cfg.rollout.K, cfg.rollout.M
    rows = []
    watch = CompileWatch() if cfg.rollout.compile_decode else contextlib.nullcontext()
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
    if cfg.rollout.compile_decode:
        out["compile"] = watch.report()  # (graphs, recompiles, CUDA-graph skips and why)
    if SamplingParams.of(cfg.rollout).graphs is not False:  # (auto steps aside under compiled decoding)
        out["decode_graphs"] = STATS.as_dict()  # (captures, replays, eager steps, failed captures and why)
    return out
