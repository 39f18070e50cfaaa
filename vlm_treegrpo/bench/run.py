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
Each side lives in its own module: :mod:`vlm_treegrpo.bench.ours`, :mod:`vlm_treegrpo.bench.trl`;
both read one :class:`~vlm_treegrpo.bench.spec.BenchSpec` (our training config plus the bench's
own settings, :mod:`vlm_treegrpo.bench.flags`). The report is written as a record with its
provenance (:func:`~vlm_treegrpo.analysis.records.write_record`) unless ``--no-record``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vlm_treegrpo.analysis.records import machine_info, write_record
from vlm_treegrpo.bench import ours
from vlm_treegrpo.bench import trl as trl_side
from vlm_treegrpo.bench.flags import add_arguments, spec_from_args
from vlm_treegrpo.bench.probes import pool_rounds, ratios
from vlm_treegrpo.bench.report import format_table, signal_share
from vlm_treegrpo.bench.spec import BenchSpec, reshaped, spec_from_dict, with_model_dir
from vlm_treegrpo.models import smollm2
from vlm_treegrpo.policy.factory import make_policy
from vlm_treegrpo.train.runtime import disable_sdpa_kernels


def trl_available() -> bool:
    return importlib.util.find_spec("trl") is not None


def prepare_model_dir(model: str, workdir: Path) -> str:
    """A local directory holding ``model``: itself if it is one, the prepared SmolLM2 copy, or a
    built-in (tiny) model saved under ``workdir``."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    if model == "smollm2-135m-instruct":
        return str(smollm2.prepare())
    out = workdir / model
    if not (out / "config.json").exists():
        make_policy(model, "cpu", "float32").save(out)
    return str(out)


def spawn(trainer: str, spec: BenchSpec, workdir: Path, label: str) -> dict:
    """Run one trainer on ``spec`` in a fresh subprocess; its result, or ``{"error": ...}``."""
    spec_path, result_path, log_path = (workdir / f"{label}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec.to_dict()))
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


def compare(base: BenchSpec, modes: list[str], trainers: list[str], workdir: Path, rounds: int = 1) -> list[dict]:
    """One row per mode: ours (flat K=G x 1, or the base's K x M tree) and TRL (G), each in its own process.

    With ``rounds`` > 1 each trainer runs that many times, the order alternating (ours, TRL,
    TRL, ours, ...), so that a slow spell of a shared machine falls on both, and its steps are
    pooled (:func:`~vlm_treegrpo.bench.probes.pool_rounds`); ``round_ratios``: each round's own
    ours/TRL completions per second."""
    out = []
    for mode in modes:
        spec = reshaped(base, base.G, 1) if mode == "flat" else base
        K, M = spec.train.rollout.K, spec.train.rollout.M
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


def scaling(base: BenchSpec, workdir: Path) -> list[dict]:
    """Our step time against K, M, the token budget and (VLM) images per prompt, one factor at a
    time around the base's K x M tree."""
    r = base.train.rollout
    K0, M0 = r.K, r.M
    frac = r.thought_max_tokens / r.max_new_tokens
    points = [("K", dict(K=k, M=M0)) for k in (2, 4, 8)]
    points += [("M", dict(K=K0, M=m)) for m in (1, 2, 4, 8) if K0 * m >= 2]
    for n in (r.max_new_tokens // 2, r.max_new_tokens, r.max_new_tokens * 2):
        points.append(("max_new_tokens", dict(K=K0, M=M0, max_new_tokens=n, thought_tokens=max(1, round(n * frac)))))
    if base.workload == "vlm":
        points += [("images_per_prompt", dict(K=K0, M=M0, images_per_prompt=i)) for i in (1, 2, 4)]
    out, seen = [], {}
    for factor, changes in points:
        spec = reshaped(base, **changes)
        s = spec.train.rollout
        key = json.dumps(spec.to_dict(), sort_keys=True)
        if key not in seen:
            print(f"[bench] scaling {factor}: K={s.K} M={s.M} tokens={s.max_new_tokens} images={spec.images_per_prompt}", flush=True)
            seen[key] = spawn("ours", spec, workdir, f"scaling-{len(seen)}")
        res = seen[key]
        out.append({"factor": factor, "K": s.K, "M": s.M, "G": spec.G, "max_new_tokens": s.max_new_tokens,
                    "images_per_prompt": spec.images_per_prompt,
                    **{k: res.get(k) for k in ("seconds_per_step", "rollout_seconds", "update_seconds", "completions_per_s",
                                               "generated_tokens_per_s", "peak_rss_mib", "error")},
                    "signal": signal_share(res) if "zero_std_frac" in res else None})
    return out


def run(args: argparse.Namespace) -> dict:
    """Build the spec from ``args``, run the comparison or the scaling table, write the record (and
    ``--out``) and return the report."""
    base, modes, trainers = spec_from_args(args)
    suffix = "" if args.workload == "text" else "-vlm"
    out = Path(args.out or f"runs/bench/{'scaling' if args.scaling else 'bench'}{suffix}.json")
    notes = []
    if "trl" in trainers and not trl_available():
        trainers.remove("trl")
        notes.append("trl is not installed (pip install '.[bench]'): TRL skipped")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-", dir=out.parent) as tmp:
        workdir = Path(tmp)
        base = with_model_dir(base, prepare_model_dir(base.model, workdir))
        report: dict = {"workload": args.workload, "model": base.model, "model_dir": base.model_dir, "machine": machine_info(),
                        "spec": base.to_dict(), "notes": notes}
        if args.scaling:
            report["scaling"] = scaling(base, workdir)
        else:
            report["runs"] = compare(base, modes, trainers, workdir, args.rounds)
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
    if not args.no_record:
        name = args.record_name or f"bench-{args.workload}" + ("-scaling" if args.scaling else "") + ("-quick" if args.quick else "")
        figures = {k: v for k, v in report.items() if k != "machine"}
        print(f"wrote {write_record(name, figures, machine=report['machine'])}")
    return report


def _worker(trainer: str, spec_path: str, result_path: str) -> None:
    spec = spec_from_dict(json.loads(Path(spec_path).read_text()))
    disable_sdpa_kernels(spec.sdpa_off)
    result = ours.run_ours(spec) if trainer == "ours" else trl_side.run_trl(spec)
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
