"""The update where each op costs about its dispatch: ours against TRL's ``GRPOTrainer``.

The companion of ``launch_proxy.py`` for the other half of a step. On the H200 a small model's
update is bound by the host issuing kernels as well: SmolLM2's took 0.23-0.33 s for a few
TFLOP of arithmetic, and once decode graphs had shrunk the sampling it was the larger half of
our step. This script puts ``launch_proxy.py``'s model (SmolLM2's 30 layers and head layout at
width 48, with the local 768-token tokenizer) in a directory and runs the text bench's work
through both trainers on one CPU thread (4 prompts, G = 16, 40 new tokens, the length reward,
one on-policy update under bf16 autocast, the bench's settings for both), and counts what one
update dispatches (on a GPU about one kernel launch per compute op) and its host syncs:

- ``ours 16x1`` / ``ours 4x4``: :func:`~vlm_treegrpo.train.step.update_step` on a rollout of that
  shape as on a GPU (through the dense tree mask, in log-prob steps of the rows a GPU gives
  SmolLM2's vocabulary), after a warm-up update;
- ``TRL G=16``: the second training step of ``GRPOTrainer`` without its sampling and scoring
  (``_generate_and_score_completions``): the loss, the backward, clipping and the optimizer step.

With ``--model DIR`` it runs the same cases on that model instead (SmolLM2 as ``prepare`` caches
it, say) and on the default device: on a GPU node the updates are the bench's own. With
``--kernels N`` each case's update also runs once under ``torch.profiler``: the device time its
kernels took (on a GPU: is the update bound by the device or by the host?) and the ``N`` ops
with the most time of their own (device time on a GPU, CPU time elsewhere).

    python scripts/update_proxy.py [--out docs/results/update-proxy-cpu.json]
    python3 scripts/update_proxy.py --model ~/.cache/vlm-treegrpo/models/smollm2-135m-instruct --kernels 12   # on a GPU node
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from launch_proxy import build, write_report  # noqa: E402
from profile_step import OpCount, Step  # noqa: E402

from vlm_treegrpo.bench.probes import sync  # noqa: E402
from vlm_treegrpo.analysis.records import script_command, write_record  # noqa: E402
from vlm_treegrpo.bench.spec import make_spec  # noqa: E402

REWARD = "vlm_treegrpo.bench.spec:length_signal_reward"


class KernelProfile:
    """``torch.profiler`` between :meth:`start` and :meth:`stop` (CUDA activity where there is a
    GPU): the kernels' summed device time and the ``top`` ops by their own time."""

    def __init__(self, top: int):
        self.top, self.cuda = top, torch.cuda.is_available()
        self.prof = None

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.prof = profile(activities=activities)
        self.prof.start()
        self.t0 = time.perf_counter()

    def stop(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.stop()
        rows = self.prof.key_averages()
        own = (lambda e: e.self_device_time_total) if self.cuda else (lambda e: e.self_cpu_time_total)
        out = {"wall_ms": round(wall * 1000, 1), "by": "self device time" if self.cuda else "self CPU time",
               "top": [[e.key[:90], e.count, round(own(e) / 1000, 2)] for e in sorted(rows, key=own, reverse=True)[:self.top]]}
        if self.cuda:
            out["device_ms"] = round(sum(e.self_device_time_total for e in rows) / 1000, 1)
        return out


def ours(step: Step, K: int, M: int, repeats: int, kernels: int = 0) -> dict:
    """Our update of one rollout batch: ``repeats`` timed runs after a warm-up, then one counted."""
    from vlm_treegrpo.rollout import attention
    from vlm_treegrpo.rollout.logprobs import TokenLogp
    from vlm_treegrpo.train.step import update_step

    cfg = step.config(K, M)
    torch.manual_seed(0)
    data, _ = step.rollout(cfg)
    saved = attention.PLAN_DEVICES, TokenLogp.CHUNK
    attention.PLAN_DEVICES = frozenset()  # the dense tree mask, as on a GPU
    TokenLogp.CHUNK = TokenLogp.chunk_rows(49_152, torch.device("cuda"))  # SmolLM2's log-prob steps on a GPU
    try:
        step.update(cfg, data)
        times = [step.update(cfg, data) for _ in range(repeats)]
        forwards = []
        hook = step.policy.model.register_forward_pre_hook(lambda *_: forwards.append(1))
        with OpCount() as count:
            stats = update_step(step.policy, None, step.optimizer, step.scheduler, data, cfg, step.device)
        hook.remove()
        profiled = None
        if kernels:
            prof = KernelProfile(kernels)
            prof.start()
            update_step(step.policy, None, step.optimizer, step.scheduler, data, cfg, step.device)
            profiled = prof.stop()
    finally:
        attention.PLAN_DEVICES, TokenLogp.CHUNK = saved
    return {"median_ms": round(statistics.median(times) * 1000, 1), "compute_ops": count.compute, "host_syncs": count.syncs,
            "forwards": len(forwards), "trees_updated": stats["trees_updated"], "packed_tokens": int(data.packed.input_ids.numel()),
            "top_ops": count.kinds.most_common(8), **({"kernels": profiled} if profiled else {})}


def trl(model_dir: str, kernels: int = 0) -> dict:
    """TRL's second training step, less its sampling and scoring."""
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from vlm_treegrpo.bench.trl import grpo_args, reward_for_trl, trl_dataset

    spec = make_spec("text", model_dir, steps=2 if kernels else 1, warmup=1, K=16, M=1, max_new_tokens=40, micro_prompts=4,
                     overrides=["rollout.prompts_per_step=4", "optim.lr=1e-12", "model.threads=1", f"algo.rewards=[{REWARD}]"])
    dataset, _, _ = trl_dataset(spec)
    count = OpCount()
    seen: dict = {"forwards": 0}
    prof = KernelProfile(kernels) if kernels else None

    class Count(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                count.__enter__()
                count.paused = False
                seen["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                sync(args.device)
                seen["ms"] = round((time.perf_counter() - seen["t0"]) * 1000, 1)
                count.__exit__(None, None, None)
            if state.global_step == 3 and prof is not None:  # (the third step's update, profiled)
                seen["kernels"] = prof.stop()

    with tempfile.TemporaryDirectory(prefix="update-proxy-trl-") as out:
        trainer = GRPOTrainer(model=model_dir, reward_funcs=[reward_for_trl(REWARD, [], spec.G)], args=grpo_args(spec, out),
                              train_dataset=dataset, callbacks=[Count()])
        generate = trainer._generate_and_score_completions

        def paused(*a, **kw):
            was = getattr(count, "paused", False)
            count.paused = True
            t = time.perf_counter()
            try:
                return generate(*a, **kw)
            finally:
                count.paused = was
                if trainer.state.global_step == 1:
                    seen["generate_ms"] = round((time.perf_counter() - t) * 1000, 1)
                if trainer.state.global_step == 2 and prof is not None:
                    prof.start()

        trainer._generate_and_score_completions = paused
        trainer.model.register_forward_pre_hook(lambda *_: seen.__setitem__("forwards", seen["forwards"] + (not count.paused)))
        trainer.train()
    return {"median_ms": round(seen["ms"] - seen["generate_ms"], 1), "compute_ops": count.compute, "host_syncs": count.syncs,
            "forwards": seen["forwards"], "top_ops": count.kinds.most_common(8),
            "note": "one step's time less its generate-and-score call (one measurement, not a median)",
            **({"kernels": seen["kernels"]} if "kernels" in seen else {})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default="", help="comma list of case names (default: all)")
    p.add_argument("--model", help="a model directory to run the cases on (default: the proxy model, on the CPU)")
    p.add_argument("--kernels", type=int, default=0, metavar="N", help="profile each case's update once: device time and the top N ops")
    p.add_argument("--out", help="JSON path")
    p.add_argument("--no-record", action="store_true", help="write no record under benchmarks/records/")
    args = p.parse_args(argv)
    if args.model is None:
        torch.set_num_threads(1)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="update-proxy-") as tmp:
        if args.model is None:
            model, tok = build("cpu")
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            del model
        where = args.model or tmp
        print(f"{'case':12s} {'ms':>8s} {'compute ops':>12s} {'syncs':>6s} {'forwards':>9s}")
        step: list[Step] = []  # (our trainer on the model, made for the first of ours' cases)

        def ours_case(K: int, M: int) -> dict:
            if not step:
                step.append(Step("text", where, 4, 16, 40))  # (the bench's settings; on the proxy, threads left at 1)
            return ours(step[0], K, M, args.repeats, args.kernels)

        todo = {"ours 16x1": lambda: ours_case(16, 1), "ours 4x4": lambda: ours_case(4, 4), "TRL G=16": lambda: trl(where, args.kernels)}
        for name in [n for n in args.only.split(",") if n] or list(todo):
            fn = todo[name]
            rows[name] = r = fn()
            print(f"{name:12s} {r['median_ms']:8.1f} {r['compute_ops']:12d} {r['host_syncs']:6d} {r['forwards']:9d}", flush=True)
            if "kernels" in r:
                k = r["kernels"]
                print(f"  profiled update: {k['wall_ms']} ms wall" + (f", {k['device_ms']} ms of kernels" if "device_ms" in k else "")
                      + f"; top by {k['by']} (ms):", flush=True)
                for key, n, ms in k["top"]:
                    print(f"    {ms:9.2f} {n:6d}x {key}", flush=True)
    report = {"threads": torch.get_num_threads(), "torch": torch.__version__, "model": args.model or "proxy (30 layers, width 48)",
              "device": "cuda" if args.model and torch.cuda.is_available() else "cpu", "prompts": 4, "G": 16, "new_tokens": 40, "cases": rows}
    write_report(report, args.out)
    if not args.no_record:
        name = "update-proxy" + ("-" + args.only.replace(",", "+") if args.only else "")  # (a subset of the cases: its own record)
        record = write_record(name, report, command=script_command(__file__, argv))
        print(f"wrote {record}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
