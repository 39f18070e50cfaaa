"""Throughput benchmark: our trainer against TRL's ``GRPOTrainer`` on identical work.

Both trainers load the same weights from the same local directory, see the same prompts in the
same order (chat template applied by each from the same ``{"role": "user"}`` message), sample G
completions per prompt at temperature 1 (top-p 1, no top-k) within the same token budget, score
them with the same reward (our correctness reward by default), and take one on-policy optimizer
step per batch (AdamW, same learning rate and betas, no KL, no reference model, no evaluation,
no logging). Ours samples
a K x M tree (K*M = G; flat GRPO is K=G, M=1); TRL samples G independent completions. Each
trainer runs in its own subprocess so its peak RSS is its own.

Measured per trainer: the median seconds of an optimizer step (rollout + update) over ``steps``
steps after ``warmup`` unmeasured ones, completions/s, generated tokens/s (tokens actually sampled,
padding excluded: a tree samples each thought once) and completion tokens/s (the length of every
leaf, thought included: the token count a flat sampler would have generated for the same
completions), the peak RSS, and the ratios ours/TRL.

``--scaling`` times our step alone against K, M, the token budget and (VLM) images per prompt.
Each side lives in its own module: :mod:`vlm_treegrpo.bench.ours`, :mod:`vlm_treegrpo.bench.trl`.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vlm_treegrpo.config import ConfigError
from vlm_treegrpo.bench.stacks import StackSampler

SDPA_KERNELS = ("flash", "mem_efficient", "cudnn")
"""The sdpa kernels ``--sdpa-off`` may name (:func:`~vlm_treegrpo.train.runtime.disable_sdpa_kernels`)."""

WORKLOADS = {"text": ("smollm2-135m-instruct", "arithmetic"), "vlm": ("tiny-qwen2-vl", "visual")}
"""Workload -> (default model, synthetic task)."""


@dataclass
class BenchSpec:
    """One measured configuration; both trainers read the same spec."""

    workload: str
    """text (arithmetic word problems) or vlm (the synthetic visual task)."""
    model: str
    """The model's name, for the report."""
    model_dir: str
    """Local directory both trainers load weights and tokenizer/processor from."""
    G: int
    """Completions per prompt (TRL num_generations)."""
    K: int
    """Our thoughts per prompt."""
    M: int
    """Our continuations per thought (K*M = G)."""
    max_new_tokens: int
    """Completion budget: TRL max_completion_length; ours thought + continuation."""
    thought_tokens: int
    """Our thought budget when M > 1 (the continuation gets the rest of max_new_tokens)."""
    prompts_per_step: int
    """Prompts per optimizer step."""
    micro_batch: int
    """Prompts per forward/backward (ours: packed trees or their leaves; TRL: micro_batch*G rows)."""
    steps: int
    """Measured steps."""
    warmup: int = 1
    """Unmeasured steps before them."""
    lr: float = 2e-5
    """AdamW learning rate (constant)."""
    autocast: str = "bfloat16"
    """none, or bfloat16 autocast for generation and training (TRL: bf16=True)."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    seed: int = 0
    """Task generator and sampling seed."""
    difficulty: int = 1
    """Synthetic task level."""
    images_per_prompt: int = 1
    """VLM: the question's image plus images_per_prompt - 1 distractors from other questions."""
    reward: str = "correctness"
    """The one reward both trainers use: a built-in name or 'pkg.module:fn' (``fn(text, example)``)."""
    compile_decode: bool = False
    """Ours: decode through a static cache with the forward compiled (``rollout.compile_decode``)."""
    drop_finished: bool = True
    """Ours: finished rows leave the decode batch (``rollout.drop_finished``)."""
    decode_graphs: bool | str = "auto"
    """Ours: ``rollout.decode_graphs`` (``"auto"``, the trainer's default: CUDA graphs on a GPU)."""
    sdpa_off: tuple[str, ...] = ()
    """Both trainers: sdpa kernels torch may not pick on a GPU (of :data:`SDPA_KERNELS`), to test
    whether one of them makes a step slow (say cuDNN's, which plans each new shape)."""
    cudnn_attention: bool = False
    """Ours: ``model.cudnn_attention`` (off, the trainer's default: sdpa never picks cuDNN's kernel)."""
    sample_stacks_ms: float = 0.0
    """Both trainers: sample the stepping thread's Python stack every this many milliseconds
    (0: off) and report where each slow step's time went (:class:`StepProbe`)."""

    def __post_init__(self) -> None:
        if self.K * self.M != self.G:
            raise ConfigError(f"bench: K*M must equal G, got {self.K}x{self.M} for G={self.G}")
        if self.prompts_per_step % self.micro_batch:
            raise ConfigError(f"bench: micro_batch ({self.micro_batch}) must divide prompts_per_step ({self.prompts_per_step})")
        if self.M > 1 and not 1 <= self.thought_tokens < self.max_new_tokens:
            raise ConfigError(f"bench: thought_tokens must be in [1, max_new_tokens), got {self.thought_tokens}")
        if self.images_per_prompt < 1 or (self.images_per_prompt > 1 and self.workload != "vlm"):
            raise ConfigError(f"bench: images_per_prompt > 1 needs the vlm workload, got {self.images_per_prompt}")
        self.sdpa_off = tuple(self.sdpa_off)
        if set(self.sdpa_off) - set(SDPA_KERNELS):
            raise ConfigError(f"bench: --sdpa-off takes a comma list of {', '.join(SDPA_KERNELS)}, got {','.join(self.sdpa_off)}")

    @property
    def n_prompts(self) -> int:
        return self.prompts_per_step * (self.warmup + self.steps)


# ----------------------------------------------------------------------------- shared work


def length_signal_reward(completion: str, example) -> float:
    """A benchmarking-only reward that varies with the completion's length (in [0, 1]).

    A random-init tiny model never earns the correctness reward, so every group would have
    zero std and our trainer would skip every update, which flatters it. With this reward both
    trainers run their full update: ``--reward vlm_treegrpo.bench.run:length_signal_reward``.
    """
    return (len(completion) % 7) / 6.0


def bench_task(spec: BenchSpec):
    """``(examples in step order, instruction)``: step s uses ``examples[s*P:(s+1)*P]``."""
    from vlm_treegrpo.data.sources import load_task
    from vlm_treegrpo.data.types import Example

    source = WORKLOADS[spec.workload][1]
    task = load_task(source, "gsm8k", spec.n_prompts + spec.images_per_prompt, 1, spec.difficulty, spec.seed)
    examples = task.train[: spec.n_prompts]
    if spec.images_per_prompt > 1:
        pool = [im for ex in task.train for im in ex.images]
        examples = [
            Example(ex.prompt, ex.answer, ex.images + tuple(pool[(i + j + 1) % len(pool)] for j in range(spec.images_per_prompt - 1)), ex.meta)
            for i, ex in enumerate(examples)
        ]
    return examples, task.instruction


def sync(device) -> None:
    """Wait for the device's queued work, so a step's time includes it (a no-op on the CPU)."""
    import torch

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
        import torch

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
            import torch

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
    import torch

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


# ----------------------------------------------------------------------------- orchestration


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def prepare_model_dir(model: str, workdir: Path) -> str:
    """A local directory holding ``model``: itself if it is one, the prepared SmolLM2 copy, or a
    built-in (tiny) model saved under ``workdir``."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    if model == "smollm2-135m-instruct":
        from vlm_treegrpo.models import smollm2

        return str(smollm2.prepare())
    from vlm_treegrpo.policy.factory import make_policy

    out = workdir / model
    if not (out / "config.json").exists():
        make_policy(model, "cpu", "float32").save(out)
    return str(out)


def spawn(trainer: str, spec: BenchSpec, workdir: Path, label: str) -> dict:
    """Run one trainer on ``spec`` in a fresh subprocess; its result, or ``{"error": ...}``."""
    spec_path, result_path, log_path = (workdir / f"{label}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(dataclasses.asdict(spec)))
    result_path.unlink(missing_ok=True)
    t0 = time.time()
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, "-m", "vlm_treegrpo.bench.run", "_worker", trainer, str(spec_path), str(result_path)],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0 or not result_path.exists():
        tail = log_path.read_text()[-1500:]
        return {"error": f"{trainer} worker exited with {proc.returncode}; log {log_path}:\n{tail}"}
    result = json.loads(result_path.read_text())
    result["process_seconds"] = round(time.time() - t0, 1)
    return result


RATIO_KEYS = ("seconds_per_step", "rollout_seconds", "update_seconds", "completions_per_s", "generated_tokens_per_s", "completion_tokens_per_s",
              "peak_rss_mib", "peak_cuda_mib")


def ratios(ours: dict, trl: dict) -> dict:
    """ours / TRL for each measured quantity (None where either side is missing)."""
    return {k: (ours[k] / trl[k] if ours.get(k) is not None and trl.get(k) else None) for k in RATIO_KEYS}


def tree_shape(G: int, tree: str | None) -> tuple[int, int]:
    """K x M from ``"4x4"``, else the most square split of G with K >= M and M >= 2."""
    if tree:
        parts = tree.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise ConfigError(f"bench: --tree must look like 4x4, got {tree!r}")
        return int(parts[0]), int(parts[1])
    M = max((m for m in range(2, math.isqrt(G) + 1) if G % m == 0), default=None)
    if M is None:
        raise ConfigError(f"bench: G={G} has no K x M split with M >= 2; pass --tree or another --G")
    return G // M, M


def machine_info() -> dict:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "platform": platform.platform()}
    if trl_available():
        import trl

        info["trl"] = trl.__version__
    if info["cuda"]:  # the card, its driver's CUDA, and which sdpa kernels torch may pick (both trainers use sdpa)
        b = torch.backends.cuda
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda_runtime"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["sdpa_enabled"] = {name: getattr(b, f"{name}_sdp_enabled")() for name in (*SDPA_KERNELS, "math")
                                if hasattr(b, f"{name}_sdp_enabled")}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        info["cpu"] = names[0] if names else None
        flags = next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), "")
        info["cpu_bf16"] = any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))
    return info


def compare(base: BenchSpec, modes: list[str], trainers: list[str], tree: str | None, workdir: Path, rounds: int = 1) -> list[dict]:
    """One row per mode: ours (flat K=G x 1, or a K x M tree) and TRL (G), each in its own process.

    With ``rounds`` > 1 each trainer runs that many times, the order alternating (ours, TRL,
    TRL, ours, ...), so that a slow spell of a shared machine falls on both, and its steps are
    pooled (:func:`pool_rounds`); ``round_ratios``: each round's own ours/TRL completions per second."""
    out = []
    for mode in modes:
        K, M = (base.G, 1) if mode == "flat" else tree_shape(base.G, tree)
        spec = dataclasses.replace(base, K=K, M=M)
        row: dict = {"mode": mode, "ours_shape": f"{K}x{M}", "G": base.G}
        results: dict[str, list[dict]] = {t: [] for t in trainers}
        for r in range(rounds):
            for trainer in (trainers if r % 2 == 0 else trainers[::-1]):
                what = f" round {r + 1}/{rounds}" if rounds > 1 else ""
                print(f"[bench] {spec.workload} {mode}: {trainer} ({K}x{M} vs G={base.G}){what} ...", flush=True)
                results[trainer].append(spawn(trainer, spec, workdir, f"{mode}-{trainer}" + (f"-r{r + 1}" if rounds > 1 else "")))
        for trainer in trainers:
            row[trainer] = pool_rounds(results[trainer])
        if "ours" in row and "trl" in row and "error" not in row["ours"] and "error" not in row["trl"]:
            row["ratios"] = ratios(row["ours"], row["trl"])
            if rounds > 1:
                row["round_ratios"] = [o["completions_per_s"] / t["completions_per_s"] for o, t in zip(results["ours"], results["trl"])]
        out.append(row)
    return out


def scaling(base: BenchSpec, tree: str | None, workdir: Path) -> list[dict]:
    """Our step time against K, M, the token budget and (VLM) images per prompt, one factor at a time."""
    K0, M0 = tree_shape(base.G, tree)
    frac = base.thought_tokens / base.max_new_tokens
    points = [("K", dict(K=k, M=M0, G=k * M0)) for k in (2, 4, 8)]
    points += [("M", dict(K=K0, M=m, G=K0 * m)) for m in (1, 2, 4, 8) if K0 * m >= 2]
    for n in (base.max_new_tokens // 2, base.max_new_tokens, base.max_new_tokens * 2):
        points.append(("max_new_tokens", dict(K=K0, M=M0, G=K0 * M0, max_new_tokens=n, thought_tokens=max(1, round(n * frac)))))
    if base.workload == "vlm":
        points += [("images_per_prompt", dict(K=K0, M=M0, G=K0 * M0, images_per_prompt=i)) for i in (1, 2, 4)]
    out, seen = [], {}
    for factor, changes in points:
        spec = dataclasses.replace(base, **changes)
        key = json.dumps(dataclasses.asdict(spec), sort_keys=True)
        if key not in seen:
            print(f"[bench] scaling {factor}: K={spec.K} M={spec.M} tokens={spec.max_new_tokens} images={spec.images_per_prompt}", flush=True)
            seen[key] = spawn("ours", spec, workdir, f"scaling-{len(seen)}")
        res = seen[key]
        out.append({"factor": factor, "K": spec.K, "M": spec.M, "G": spec.G, "max_new_tokens": spec.max_new_tokens,
                    "images_per_prompt": spec.images_per_prompt,
                    **{k: res.get(k) for k in ("seconds_per_step", "rollout_seconds", "update_seconds", "completions_per_s",
                                               "generated_tokens_per_s", "peak_rss_mib", "error")},
                    "signal": _signal(res) if "zero_std_frac" in res else None})
    return out


def _signal(result: dict) -> float:
    """Share of measured prompts whose G rewards are not all equal (the ones with a gradient)."""
    zero = result["zero_std_frac"][result["warmup"]:] or result["zero_std_frac"]
    return 1 - statistics.mean(zero)


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _slow_line(r: dict) -> str:
    """One line on a run's steps over twice the median: how many, their share of the time, and
    what the probe saw in them (summed)."""
    slow = r["slow_steps"]
    n = len(r["step_seconds"]) - r["warmup"]
    spent = sum(x["seconds"] for x in slow)
    parts = [f"{len(slow)} of {n} steps over 2x the median (max {max(x['seconds'] for x in slow):.2f} s), "
             f"{spent:.2f} s of {r['mean_seconds_per_step'] * n:.2f} s"]
    for key, unit in (("cpu_seconds", " s CPU"), ("gc_seconds", " s GC"), ("cuda_mallocs", " cudaMalloc"), ("alloc_retries", " alloc retries")):
        if all(key in x for x in slow):
            total = sum(x[key] for x in slow)
            parts.append(f"{total:.2f}{unit}" if isinstance(total, float) else f"{total}{unit}")
    return "; ".join(parts)


def _stack_lines(r: dict, top: int = 3) -> list[str]:
    """Where each slow step's time went, where its stack was sampled: its ``top`` places."""
    return [f"step {x['index']} ({x['seconds']:.2f} s, {x['stacks']['samples']} samples): "
            + "; ".join(f"{share:.0%} {place}" for place, share in x["stacks"]["top"][:top])
            for x in r["slow_steps"] if x.get("stacks", {}).get("top")]


def format_table(report: dict) -> str:
    """The comparison (or scaling) rows as an aligned text table."""
    lines = []
    if "runs" in report:
        head = (f"{'mode':<5} {'trainer':<8} {'shape':<6} {'s/step':>8} {'rollout':>8} {'update':>8} {'compl/s':>8} "
                f"{'gen tok/s':>10} {'leaf tok/s':>10} {'RSS MiB':>8} {'GPU MiB':>8} {'signal':>6}")
        lines += [head, "-" * len(head)]
        for row in report["runs"]:
            for trainer in ("ours", "trl"):
                r = row.get(trainer)
                if r is None:
                    continue
                shape = row["ours_shape"] if trainer == "ours" else f"G={row['G']}"
                if "error" in r:
                    lines.append(f"{row['mode']:<5} {trainer:<8} {shape:<6} failed: {r['error'].splitlines()[0]}")
                    continue
                lines.append(f"{row['mode']:<5} {trainer:<8} {shape:<6} {_fmt(r['seconds_per_step']):>8} {_fmt(r.get('rollout_seconds')):>8} "
                             f"{_fmt(r.get('update_seconds')):>8} {_fmt(r['completions_per_s']):>8} {_fmt(r['generated_tokens_per_s'], '.1f'):>10} "
                             f"{_fmt(r['completion_tokens_per_s'], '.1f'):>10} {_fmt(r['peak_rss_mib'], '.0f'):>8} {_fmt(r.get('peak_cuda_mib'), '.0f'):>8} {_fmt(_signal(r)):>6}")
            if "ratios" in row:
                q = row["ratios"]
                lines.append(f"{row['mode']:<5} {'ours/trl':<8} {'':<6} {_fmt(q['seconds_per_step']):>8} {_fmt(q['rollout_seconds']):>8} "
                             f"{_fmt(q['update_seconds']):>8} {_fmt(q['completions_per_s']):>8} {_fmt(q['generated_tokens_per_s']):>10} "
                             f"{_fmt(q['completion_tokens_per_s']):>10} {_fmt(q['peak_rss_mib']):>8} {_fmt(q.get('peak_cuda_mib')):>8}")
            for trainer in ("ours", "trl"):
                r = row.get(trainer)
                if r and r.get("slow_steps"):
                    lines.append(f"{row['mode']:<5} {trainer:<8} slow   {_slow_line(r)}")
                    lines += [f"{row['mode']:<5} {trainer:<8} stacks {line}" for line in _stack_lines(r)]
            if "round_ratios" in row:
                lines.append(f"{row['mode']:<5} {'rounds':<8} {'':<6} compl/s ours/trl per round: " + ", ".join(_fmt(x) for x in row["round_ratios"]))
    if "scaling" in report:
        head = (f"{'factor':<18} {'K':>3} {'M':>3} {'tokens':>6} {'images':>6} {'s/step':>8} {'rollout':>8} {'update':>8} "
                f"{'compl/s':>8} {'gen tok/s':>10} {'RSS MiB':>8} {'signal':>6}")
        lines += [head, "-" * len(head)]
        for r in report["scaling"]:
            lines.append(f"{r['factor']:<18} {r['K']:>3} {r['M']:>3} {r['max_new_tokens']:>6} {r['images_per_prompt']:>6} "
                         f"{_fmt(r['seconds_per_step']):>8} {_fmt(r['rollout_seconds']):>8} {_fmt(r['update_seconds']):>8} {_fmt(r['completions_per_s']):>8} "
                         f"{_fmt(r['generated_tokens_per_s'], '.1f'):>10} {_fmt(r['peak_rss_mib'], '.0f'):>8} {_fmt(r['signal']):>6}")
    if "runs" in report:
        lines.append("rollout/update: median seconds of sampling+scoring / of the optimizer update; gen tok/s: tokens sampled "
                     "(a tree samples each thought once); leaf tok/s: completion lengths summed over the G leaves; signal: "
                     "share of prompts whose G rewards differ (ours skips the update of the others, TRL computes it)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="text", help="text: arithmetic; vlm: synthetic visual task")
    p.add_argument("--model", help="model name or local directory (default: smollm2-135m-instruct / tiny-qwen2-vl)")
    p.add_argument("--modes", default="flat,tree", help="comma list of flat (ours G x 1) and tree (ours K x M)")
    p.add_argument("--trainers", default="ours,trl", help="comma list of ours and trl")
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    p.add_argument("--rounds", type=int, default=1,
                   help="run each trainer this many times, alternating which goes first, and pool the measured steps")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=0, help="prompts per forward/backward (0 = all of a step's)")
    p.add_argument("--G", type=int, default=16, help="completions per prompt")
    p.add_argument("--tree", help="our tree shape KxM for mode tree (default: the squarest split of G)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="completion budget (ours: thought + continuation)")
    p.add_argument("--thought-tokens", type=int, default=0, help="our thought budget in trees (0 = 2/5 of --max-new-tokens)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--autocast", choices=("none", "bfloat16"), default="bfloat16", help="both: bf16 autocast (TRL bf16=True)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0 = torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward", default="correctness", help="reward for both trainers: built-in name or pkg.module:fn")
    p.add_argument("--compile-decode", action="store_true", help="ours: compiled decoding (rollout.compile_decode; TRL unchanged)")
    p.add_argument("--decode-graphs", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                   help="ours: rollout.decode_graphs, decode steps replayed from CUDA graphs (auto, the default: on a GPU; "
                        "on, the bare flag: the same loop eagerly on the CPU too; off: generate). TRL unchanged")
    p.add_argument("--sdpa-off", default="", help=f"both trainers: sdpa kernels not to use on a GPU, a comma list of {', '.join(SDPA_KERNELS)}")
    p.add_argument("--cudnn-attention", action="store_true",
                   help="ours: model.cudnn_attention=true, sdpa may pick cuDNN's kernel as torch would (TRL unchanged)")
    p.add_argument("--sample-stacks", type=float, default=0.0, metavar="MS",
                   help="both trainers: sample the Python stack every MS milliseconds and list where each slow step's time went (0: off)")
    p.add_argument("--keep-finished", action="store_true", help="ours: finished rows stay in the decode batch (rollout.drop_finished=false)")
    p.add_argument("--quick", action="store_true", help="tiny-llama (or tiny VLM), 2 steps, small batches: a smoke run")
    p.add_argument("--scaling", action="store_true", help="time our step against K, M, tokens (and images): ours only")
    p.add_argument("--out", help="JSON path (default runs/bench/bench[-vlm].json, or scaling[-vlm].json)")


def run(args: argparse.Namespace) -> dict:
    """Build the spec from ``args``, run the comparison or the scaling table, write and return the report."""
    if args.quick:
        args.model = args.model or ("tiny-llama" if args.workload == "text" else WORKLOADS["vlm"][0])
        args.steps, args.prompts_per_step, args.G, args.max_new_tokens = 2, 2, 4, 16
    model = args.model or WORKLOADS[args.workload][0]
    suffix = "" if args.workload == "text" else "-vlm"
    out = Path(args.out or f"runs/bench/{'scaling' if args.scaling else 'bench'}{suffix}.json")
    trainers = [t for t in args.trainers.split(",") if t]
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"flat", "tree"} or not trainers or set(trainers) - {"ours", "trl"}:
        raise ConfigError(f"bench: --modes takes flat,tree and --trainers ours,trl; got {args.modes!r} and {args.trainers!r}")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        raise ConfigError(f"bench: need --steps >= 1, --warmup >= 0 and --rounds >= 1, got {args.steps}, {args.warmup} and {args.rounds}")
    notes = []
    if "trl" in trainers and not trl_available():
        trainers.remove("trl")
        notes.append("trl is not installed (pip install '.[bench]'): TRL skipped")
    K, M = tree_shape(args.G, args.tree)
    base = BenchSpec(
        workload=args.workload, model=model, model_dir="", G=args.G, K=K, M=M,
        max_new_tokens=args.max_new_tokens, thought_tokens=args.thought_tokens or max(1, args.max_new_tokens * 2 // 5),
        prompts_per_step=args.prompts_per_step, micro_batch=args.micro_batch or args.prompts_per_step,
        steps=args.steps, warmup=args.warmup, lr=args.lr, autocast=args.autocast, threads=args.threads, seed=args.seed,
        reward=args.reward, compile_decode=args.compile_decode, drop_finished=not args.keep_finished,
        decode_graphs={"on": True, "off": False}.get(args.decode_graphs, "auto"),
        sdpa_off=tuple(k for k in args.sdpa_off.split(",") if k), sample_stacks_ms=args.sample_stacks,
        cudnn_attention=args.cudnn_attention,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-", dir=out.parent) as tmp:
        workdir = Path(tmp)
        model_dir = prepare_model_dir(model, workdir)
        base = dataclasses.replace(base, model_dir=model_dir)
        report: dict = {"workload": args.workload, "model": model, "model_dir": model_dir, "machine": machine_info(),
                        "spec": dataclasses.asdict(base), "notes": notes}
        if args.scaling:
            report["scaling"] = scaling(base, args.tree, workdir)
        else:
            report["runs"] = compare(base, modes, trainers, args.tree, workdir, args.rounds)
            report["rounds"] = args.rounds
        logs = out.parent / f"{out.stem}-logs"
        logs.mkdir(exist_ok=True)
        for log in workdir.glob("*.log"):
            log.replace(logs / log.name)
    out.write_text(json.dumps(report, indent=2))
    for note in notes:
        print(f"[bench] {note}")
    print(format_table(report))
    print(f"wrote {out}")
    return report


def _worker(trainer: str, spec_path: str, result_path: str) -> None:
    from vlm_treegrpo.train.runtime import disable_sdpa_kernels

    spec = BenchSpec(**json.loads(Path(spec_path).read_text()))
    disable_sdpa_kernels(spec.sdpa_off)
    if trainer == "ours":
        from vlm_treegrpo.bench.ours import run_ours

        result = run_ours(spec)
    else:
        from vlm_treegrpo.bench.trl import run_trl

        result = run_trl(spec)
    Path(result_path).write_text(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        _worker(*argv[1:4])
        return 0
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
