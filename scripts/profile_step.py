"""Where our training step's time goes on this machine (CPU or GPU), in one process.

For the flat (G x 1) and the tree (K x M) shape of a bench workload (text or vlm) it prints:

* the median rollout and update seconds over ``--steps`` steps after a warm-up step;
* a cProfile of one rollout (the calls with the most time of their own: on a GPU the host-side
  cost of launching kernels, and any wait for the device, shows up there);
* the packed log-prob forward + backward (the update's core) through the per-segment attention
  and through the dense tree mask, whichever the device uses by default;
* the step with each torch thread count of ``--threads``;
* what one rollout dispatches: the model's forwards, the aten ops, those that compute (not views:
  on a GPU about one kernel launch each, so while decoding is launch-bound its time goes with
  their count, whatever the batch size) and the host syncs (``.item()`` and the like); and
  what one update dispatches, through each attention path.

``--model`` is a built-in name, a model directory, or a directory with only a config and a
tokenizer (SmolLM2's, say), which gets random weights: the same shapes and so the same cost
(completions then run to the token budget). Writes the figures as JSON with ``--out``.

    .venv/bin/python scripts/profile_step.py --model tiny-llama --steps 2
    python3 scripts/profile_step.py --model smollm2-shape/ --threads 4,16 --out profile.json   # on a GPU node
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

from vlm_treegrpo.analysis.records import script_command, write_record
from vlm_treegrpo.bench.probes import sync
from vlm_treegrpo.bench.spec import WORKLOADS, bench_task, make_spec, reshaped


def random_weights_if_missing(model: str) -> None:
    """A directory with a config but no weights gets seeded random fp32 weights, saved there."""
    path = Path(model)
    if not path.is_dir() or any(path.glob("*.safetensors")) or not (path / "config.json").exists():
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32).save_pretrained(path)


class Step:
    """Our trainer's rollout and update (as the bench runs them) on the bench's text prompts."""

    def __init__(self, workload: str, model: str, prompts_per_step: int, G: int, max_new_tokens: int):
        from vlm_treegrpo.train.optim import adamw, warmup_constant
        from vlm_treegrpo.policy.factory import make_policy
        from vlm_treegrpo.rewards.functions import RewardSet
        from vlm_treegrpo.train.runtime import resolve_device, setup

        self.spec = make_spec(workload, model, steps=8, warmup=0, K=G, M=1, max_new_tokens=max_new_tokens, micro_prompts=prompts_per_step,
                              overrides=[f"rollout.prompts_per_step={prompts_per_step}", "optim.lr=1e-12",
                                         "algo.rewards=[vlm_treegrpo.bench.spec:length_signal_reward]"])
        cfg = self.spec.train
        self.device = resolve_device(cfg.model.device)
        setup(cfg.model, self.device)
        self.policy = make_policy(model, self.device, cfg.model.dtype, cfg.model.attn_implementation)
        self.examples, instruction = bench_task(self.spec)
        self.prompts = [self.policy.encode(ex, instruction) for ex in self.examples]
        self.rewards = RewardSet.from_config(cfg.algo.rewards, cfg.algo.reward_timeout_s)
        params = [p for p in self.policy.model.parameters() if p.requires_grad]
        self.optimizer = adamw(params, 1e-12, cfg.optim.betas, 0.0)
        self.scheduler = warmup_constant(self.optimizer, 0)
        self.P, self.n = prompts_per_step, 0

    def config(self, K: int, M: int):
        return reshaped(self.spec, K, M).train

    def _sync(self) -> None:
        sync(self.device)

    def rollout(self, cfg):
        from vlm_treegrpo.train.step import rollout_step

        i = self.n % (len(self.examples) // self.P)
        self.n += 1
        sl = slice(i * self.P, (i + 1) * self.P)
        t0 = time.perf_counter()
        data = rollout_step(self.policy, self.examples[sl], self.prompts[sl], self.rewards, cfg)
        self._sync()
        return data, time.perf_counter() - t0

    def update(self, cfg, data) -> float:
        from vlm_treegrpo.train.step import update_step

        t0 = time.perf_counter()
        update_step(self.policy, None, self.optimizer, self.scheduler, data, cfg, self.device)
        self._sync()
        return time.perf_counter() - t0

    def logp_backward(self, cfg, batch) -> float:
        """Seconds of the packed log-prob forward + backward of ``batch``."""
        from vlm_treegrpo.train.runtime import autocast_ctx

        self.optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with autocast_ctx(self.device, cfg.model.autocast):
            logp = self.policy.logp(batch, cfg.rollout.temperature)
        (logp * batch.target_mask).sum().backward()
        self._sync()
        return time.perf_counter() - t0


class OpCount:
    """Counts the aten ops dispatched inside ``with OpCount() as c:`` (``c.ops``, ``c.compute``:
    all but views, ``c.syncs``: reads of a tensor's value by the host, ``c.kinds``: compute ops by
    name); none while ``c.paused`` is set."""

    VIEWS = ("aten._unsafe_view",)  # (a view that its schema does not mark as one)
    SYNCS = ("aten._local_scalar_dense",)

    def __enter__(self):
        from collections import Counter

        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if counter.paused:
                    return func(*args, **(kwargs or {}))
                name = str(func.overloadpacket)
                counter.ops += 1
                if name in counter.SYNCS:
                    counter.syncs += 1
                elif not func.is_view and name not in counter.VIEWS:
                    counter.kinds[name] += 1
                return func(*args, **(kwargs or {}))

        self.ops, self.syncs, self.kinds, self.paused = 0, 0, Counter(), False
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)

    @property
    def compute(self) -> int:
        return sum(self.kinds.values())


def count_dispatch(step: "Step", cfg, data=None) -> dict:
    """What one rollout of ``cfg``'s shape dispatches (:class:`OpCount`), and its model forwards;
    with ``data``, what the update of that rollout batch dispatches."""
    forwards = []
    hook = step.policy.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        with OpCount() as c:
            step.rollout(cfg) if data is None else step.update(cfg, data)
    finally:
        hook.remove()
    n = max(len(forwards), 1)
    return {"forwards": len(forwards), "ops": c.ops, "compute_ops": c.compute, "syncs": c.syncs,
            "compute_ops_per_forward": round(c.compute / n, 1), "top_compute_ops": c.kinds.most_common(8)}


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 4)


def top_calls(profile: cProfile.Profile, n: int) -> list[str]:
    """The ``n`` calls with the most time of their own, as pstats prints them."""
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(n)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")) + 1
    return lines[start:]


def profile_shape(step: Step, K: int, M: int, steps: int, threads: list[int], top: int) -> dict:
    from vlm_treegrpo.rollout import attention

    cfg = step.config(K, M)
    data, _ = step.rollout(cfg)
    step.update(cfg, data)  # warm-up
    rollout, update = [], []
    for _ in range(steps):
        data, t = step.rollout(cfg)
        rollout.append(t)
        update.append(step.update(cfg, data))
    res = {"shape": f"{K}x{M}", "rollout_s": _median(rollout), "update_s": _median(update),
           "rollout_runs": [round(t, 3) for t in rollout], "update_runs": [round(t, 3) for t in update]}
    prof = cProfile.Profile()
    prof.enable()
    data, res["profiled_rollout_s"] = step.rollout(cfg)
    prof.disable()
    res["rollout_top_calls"] = top_calls(prof, top)
    res["dispatch"] = count_dispatch(step, cfg)

    batch = data.packed.to(step.device)
    saved = attention.PLAN_DEVICES
    for name, devices in (("per_segment", frozenset({step.device.type})), ("dense_mask", frozenset())):
        attention.PLAN_DEVICES = devices
        try:
            step.logp_backward(cfg, batch)  # warm-up of this path
            res[f"logp_backward_{name}_s"] = _median([step.logp_backward(cfg, batch) for _ in range(steps)])
            res[f"dispatch_update_{name}"] = count_dispatch(step, cfg, data)
        finally:
            attention.PLAN_DEVICES = saved

    default = torch.get_num_threads()
    for n in threads:
        torch.set_num_threads(n)
        try:
            r, u = [], []
            for _ in range(steps):
                d, t = step.rollout(cfg)
                r.append(t)
                u.append(step.update(cfg, d))
            res[f"threads_{n}"] = {"rollout_s": _median(r), "update_s": _median(u)}
        finally:
            torch.set_num_threads(default)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=("text", "vlm"), default="text")
    p.add_argument("--model", help="built-in name or directory (config-only: random weights); default: the workload's bench model")
    p.add_argument("--steps", type=int, default=3, help="timed steps per figure")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--G", type=int, default=16)
    p.add_argument("--tree", default="4x4", help="the tree shape K x M (the flat shape is G x 1)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--threads", default="", help="comma list of torch thread counts to time the step with")
    p.add_argument("--top", type=int, default=14, help="cProfile lines shown")
    p.add_argument("--out", help="JSON path")
    p.add_argument("--no-record", action="store_true", help="write no record under benchmarks/records/")
    args = p.parse_args(argv)
    K, M = (int(x) for x in args.tree.lower().split("x"))
    if K * M != args.G:
        p.error(f"--tree {args.tree} must have K*M = G = {args.G}")
    t0 = time.time()
    model = args.model or WORKLOADS[args.workload][0]
    random_weights_if_missing(model)
    step = Step(args.workload, model, args.prompts_per_step, args.G, args.max_new_tokens)
    head = {"workload": args.workload, "model": model, "device": str(step.device), "torch_threads": torch.get_num_threads(),
            "attn_implementation": step.policy.model.config._attn_implementation, "setup_s": round(time.time() - t0, 1)}
    if step.device.type == "cuda":
        head["gpu"] = torch.cuda.get_device_name(step.device)
    print(json.dumps(head), flush=True)
    threads = [int(x) for x in args.threads.split(",") if x]
    shapes = []
    for k, m in ((args.G, 1), (K, M)):
        res = profile_shape(step, k, m, args.steps, threads, args.top)
        print(f"== {res['shape']}: rollout {res['rollout_s']} s {res['rollout_runs']}, update {res['update_s']} s {res['update_runs']}")
        print(f"-- cProfile of one rollout ({res['profiled_rollout_s']:.2f} s under the profiler)")
        print("\n".join(res["rollout_top_calls"]))
        d = res["dispatch"]
        print(f"dispatch of one rollout: {d['forwards']} model forwards, {d['ops']} aten ops, {d['compute_ops']} of them compute "
              f"({d['compute_ops_per_forward']} per forward), {d['syncs']} host syncs; most: {d['top_compute_ops'][:5]}")
        for name in ("per_segment", "dense_mask"):
            u = res[f"dispatch_update_{name}"]
            print(f"dispatch of one update ({name.replace('_', ' ')}): {u['forwards']} model forwards, {u['compute_ops']} compute ops, "
                  f"{u['syncs']} host syncs")
        print(f"packed log-prob forward+backward: per segment {res['logp_backward_per_segment_s']} s, "
              f"dense mask {res['logp_backward_dense_mask_s']} s")
        for n in threads:
            print(f"{n} threads: rollout {res[f'threads_{n}']['rollout_s']} s, update {res[f'threads_{n}']['update_s']} s")
        print(flush=True)
        shapes.append(res)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**head, "shapes": shapes}, indent=2))
        print(f"wrote {args.out}")
    if not args.no_record:
        record = write_record(f"profile-step-{args.workload}", {**head, "shapes": shapes}, command=script_command(__file__, argv))
        print(f"wrote {record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
