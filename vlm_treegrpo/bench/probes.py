"""What a bench step measures and how steps become figures: both trainers' loops use these.

:class:`StepProbe` records what a step's wall time held besides its work (CPU seconds, GC
pauses, GPU allocations, sampled stacks); :func:`measure` turns a trainer's per-step rows into
its result (median step, rates over the measured steps, slow steps, peak memory);
:func:`pool_rounds` pools several processes' results; :func:`ratios` divides ours by TRL's.
"""
from __future__ import annotations

import gc
import resource
import statistics
import time

import torch

from vlm_treegrpo.bench.stacks import StackSampler


def sync(device) -> None:
    """Wait for the device's queued work, so a step's time includes it (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StepProbe:
    """What a step's wall time held besides its work, to tell why a step was slow: the process's
    CPU seconds (``cpu_seconds``, all its threads; far below the wall time, the host waited, on
    the device or for a CPU), Python's garbage-collection pauses (``gc_seconds``) and, on a GPU,
    the caching allocator's new device allocations (``cuda_mallocs``, each a ``cudaMalloc``) and
    retries (``alloc_retries``: a failed allocation frees the cache, which synchronizes).

    With ``stacks_ms`` it also samples the stepping thread's Python stack that often
    (:class:`~vlm_treegrpo.bench.stacks.StackSampler`): a row's ``stacks`` says where the step's wall
    time went, by line.

    ``with probe:`` hooks the collector; ``start()`` then ``stop()`` around a step give its row."""

    KEYS = ("cpu_seconds", "gc_seconds", "cuda_mallocs", "alloc_retries")

    def __init__(self, device=None, stacks_ms: float = 0.0):
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self._gc, self._gc_t0, self._mark = 0.0, 0.0, {}
        self.sampler = StackSampler(stacks_ms / 1000) if stacks_ms > 0 else None

    def __enter__(self) -> "StepProbe":
        gc.callbacks.append(self._on_gc)
        if self.sampler is not None:
            self.sampler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._on_gc)
        if self.sampler is not None:
            self.sampler.__exit__(*exc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self._gc += time.perf_counter() - self._gc_t0

    def _now(self) -> dict:
        out = {"cpu_seconds": time.process_time(), "gc_seconds": self._gc}
        if self.cuda:
            stats = torch.cuda.memory_stats()
            out["cuda_mallocs"] = stats.get("num_device_alloc", 0)
            out["alloc_retries"] = stats.get("num_alloc_retries", 0)
        return out

    def start(self) -> None:
        self._mark = self._now()
        if self.sampler is not None:
            self.sampler.take()

    def stop(self) -> dict:
        """This step's figures since :meth:`start`."""
        now = self._now()
        out = {k: round(v - self._mark[k], 4) if isinstance(v, float) else v - self._mark[k] for k, v in now.items()}
        if self.sampler is not None:
            out["stacks"] = self.sampler.take()
        return out


def slow_steps(rows: list[dict], factor: float = 2.0) -> list[dict]:
    """The measured rows that took over ``factor`` times the median step, each with its index among
    them and its probe figures (:class:`StepProbe`, its ``stacks`` too) where recorded."""
    med = statistics.median(r["seconds"] for r in rows)
    keep = ("seconds", "rollout_seconds", *StepProbe.KEYS, "stacks")
    return [{"index": i, **{k: round(r[k], 4) if isinstance(r[k], float) else r[k] for k in keep if k in r}}
            for i, r in enumerate(rows) if r["seconds"] > factor * med]


def peak_cuda_mib() -> float | None:
    """Peak GPU memory held by tensors in this process (None without CUDA in use)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def summarize(rows: list[dict], warmup: int) -> dict:
    """Median step time and rates over the measured rows (those after ``warmup``). A row is one
    step: ``seconds``, ``rollout_seconds``, ``completions``, ``generated_tokens``,
    ``completion_tokens``, ``reward`` (mean) and ``zero_std_frac`` (and :class:`StepProbe`'s
    figures, where recorded). Rates are totals over the measured steps divided by their summed
    seconds, so a slow step weighs fully: ``mean_seconds_per_step`` beside the median, and the
    steps over twice the median under ``slow_steps`` (:func:`slow_steps`)."""
    timed = rows[warmup:]
    med = statistics.median(r["seconds"] for r in timed)
    total = sum(r["seconds"] for r in timed)
    out = {
        "seconds_per_step": med,
        "step_seconds": [round(r["seconds"], 3) for r in rows],
        "completions_per_s": sum(r["completions"] for r in timed) / total,
        "generated_tokens_per_s": sum(r["generated_tokens"] for r in timed) / total,
        "completion_tokens_per_s": sum(r["completion_tokens"] for r in timed) / total,
        "mean_completion_tokens": sum(r["completion_tokens"] for r in timed) / sum(r["completions"] for r in timed),
        "rollout_seconds": statistics.median(r["rollout_seconds"] for r in timed),
        "update_seconds": statistics.median(r["seconds"] - r["rollout_seconds"] for r in timed),
        "warmup": warmup,
        "reward": [round(r["reward"], 4) for r in rows],
        "zero_std_frac": [round(r["zero_std_frac"], 4) for r in rows],
        "mean_seconds_per_step": total / len(timed),
        "slow_steps": slow_steps(timed),
    }
    return out


STEP_KEYS = ("seconds", "rollout_seconds", "completions", "generated_tokens", "completion_tokens", "reward", "zero_std_frac")


def measure(rows: list[dict], warmup: int) -> dict:
    """:func:`summarize`, this process's peak RSS and, on a GPU, the peak memory its tensors held
    (``peak_cuda_mib``; None on the CPU); ``steps`` keeps the rows (for :func:`pool_rounds`)."""
    return {**summarize(rows, warmup), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_cuda_mib": peak_cuda_mib(), "steps": [{k: r[k] for k in (*STEP_KEYS, *StepProbe.KEYS, "stacks") if k in r} for r in rows]}


def pool_rounds(results: list[dict]) -> dict:
    """One trainer's results from several rounds (processes) as one: medians and rates over the
    measured steps of every round together, the highest peak memory, and each round's own
    ``seconds_per_step`` and ``completions_per_s`` under ``rounds``. A failed round fails it."""
    failed = next((r for r in results if "error" in r), None)
    if failed is not None or len(results) == 1:
        return failed or results[0]
    measured = [row for r in results for row in r["steps"][r["warmup"]:]]
    peaks = {k: max((r[k] for r in results if r.get(k) is not None), default=None) for k in ("peak_rss_mib", "peak_cuda_mib")}
    pooled = {**results[0], **summarize(measured, 0), **peaks, "warmup": results[0]["warmup"], "steps": measured}
    pooled["step_seconds"] = [round(row["seconds"], 3) for row in measured]
    pooled["rounds"] = [{k: r[k] for k in ("seconds_per_step", "completions_per_s", "step_seconds", "process_seconds") if k in r}
                        for r in results]
    return pooled


RATIO_KEYS = ("seconds_per_step", "rollout_seconds", "update_seconds", "completions_per_s", "generated_tokens_per_s", "completion_tokens_per_s",
              "peak_rss_mib", "peak_cuda_mib")


def ratios(ours: dict, trl: dict) -> dict:
    """ours / TRL for each measured quantity (None where either side is missing)."""
    return {k: (ours[k] / trl[k] if ours.get(k) is not None and trl.get(k) else None) for k in RATIO_KEYS}
