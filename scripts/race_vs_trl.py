"""Held-out accuracy after the same wall-clock time: our trainer against TRL's GRPOTrainer.

Both trainers start from the same local weights, train on the same task with the same rewards
(and weights), prompts per step, token budget, sampling settings, learning rate and AdamW
settings, taken from one of our configs (default ``configs/demo-smollm2.yaml``): ours as the
config says (a K x M tree), TRL with flat groups of G = K*M (TRL has no trees), loss ``dapo`` with
group std scaling and no KL. Each trains for ``--budget`` seconds of its training loop (checked
after every step: ours ``optim.time_budget_s``, TRL a callback), in its own subprocess, one after
the other so they never share the CPU. Then the same evaluator (``vlm-treegrpo eval``: greedy,
the config's held-out set) scores the start model and both results.

Writes ``runs/race/race.json`` (or ``--out``) and prints a table.

    .venv/bin/python scripts/race_vs_trl.py --budget 300                       # SmolLM2, ~15 min
    .venv/bin/python scripts/race_vs_trl.py --quick                            # tiny-llama smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from vlm_treegrpo.config import load_config
from vlm_treegrpo.analysis.records import machine_info, script_command, write_record

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["model.name=tiny-llama", "data.n_train=32", "data.n_test=4", "rollout.prompts_per_step=2", "rollout.K=2", "rollout.M=2",
         "rollout.thought_max_tokens=4", "rollout.answer_max_tokens=4", "optim.micro_batch=2", "eval.batch_size=4"]
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


def _run(cmd: list[str], log: Path) -> str:
    """Run ``cmd``, teeing nothing: output goes to ``log``; returns stdout+stderr, raises on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited with {proc.returncode}; see {log}:\n{proc.stderr[-2000:]}")
    return proc.stdout


def _eval(config: str, overrides: list[str], model_dir: str, log: Path) -> dict:
    out = _run([sys.executable, "-m", "vlm_treegrpo.cli", "eval", "--config", config, "--model", model_dir, *overrides], log)
    res = json.loads(out[out.index("{"):])
    return {k: res[k] for k in ("accuracy", "format_rate", "mean_completion_tokens", "n", "seconds")}


def race(config: str, overrides: list[str], budget: float, workdir: Path, skip_start: bool) -> dict:
    from vlm_treegrpo.bench.run import prepare_model_dir

    cfg = load_config(config, overrides)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model_dir(cfg.model.name, workdir)
    shared = [*overrides, f"model.name={model_dir}"]
    report: dict = {"config": config, "overrides": overrides, "model": cfg.model.name, "model_dir": model_dir, "budget_s": budget,
                    "machine": machine_info(), "ours_shape": f"{cfg.rollout.K}x{cfg.rollout.M}", "trl_G": cfg.rollout.K * cfg.rollout.M}
    if not skip_start:
        report["start"] = _eval(config, shared, model_dir, workdir / "eval-start.log")
        print(f"[race] start model: {report['start']['accuracy']:.3f}", flush=True)

    t0 = time.time()
    _run([sys.executable, "-m", "vlm_treegrpo.cli", "train", "--config", config, *shared, "optim.steps=100000",
          f"optim.time_budget_s={budget}", "eval.before=false", "eval.after=false", "eval.every=0", "log.save_model=true",
          "log.progress=false", "log.samples_every=0", f"log.run_dir={workdir}", "log.name=ours"], workdir / "train-ours.log")
    summary = json.loads((workdir / "ours" / "summary.json").read_text())
    metrics = [json.loads(line) for line in (workdir / "ours" / "metrics.jsonl").read_text().splitlines()]
    report["ours"] = {"steps": summary["steps"], "train_seconds": summary["train_seconds"], "process_seconds": round(time.time() - t0, 1),
                      "mean_reward_per_step": [round(m["reward"], 4) for m in metrics]}
    report["ours"]["eval"] = _eval(config, shared, str(workdir / "ours" / "model"), workdir / "eval-ours.log")
    print(f"[race] ours: {summary['steps']} steps in {summary['train_seconds']:.0f} s -> {report['ours']['eval']['accuracy']:.3f}", flush=True)

    t0 = time.time()
    out = _run([sys.executable, str(Path(__file__).resolve()), "_trl", config, model_dir, str(workdir / "trl-model"), str(budget), *shared],
               workdir / "train-trl.log")
    report["trl"] = {**json.loads(out.strip().splitlines()[-1]), "process_seconds": round(time.time() - t0, 1)}
    report["trl"]["eval"] = _eval(config, shared, str(workdir / "trl-model"), workdir / "eval-trl.log")
    print(f"[race] trl: {report['trl']['steps']} steps in {report['trl']['train_seconds']:.0f} s -> {report['trl']['eval']['accuracy']:.3f}",
          flush=True)
    report["accuracy_difference"] = report["ours"]["eval"]["accuracy"] - report["trl"]["eval"]["accuracy"]
    return report


def format_table(report: dict) -> str:
    rows = ["| trainer | steps | train s | held-out accuracy | format rate |", "|---|---|---|---|---|"]
    if "start" in report:
        rows.append(f"| start model | 0 | 0 | {report['start']['accuracy']:.1%} | {report['start']['format_rate']:.1%} |")
    for key, name in (("ours", f"ours {report['ours_shape']}"), ("trl", f"TRL G={report['trl_G']}")):
        r = report[key]
        rows.append(f"| {name} | {r['steps']} | {r['train_seconds']:.0f} | {r['eval']['accuracy']:.1%} | {r['eval']['format_rate']:.1%} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_trl"]:  # the TRL side, in its own process
        config, model_dir, out_dir, budget, *overrides = argv[1:]
        from vlm_treegrpo.bench.trl import race_trl

        print(json.dumps(race_trl(load_config(config, overrides), model_dir, out_dir, float(budget))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo-smollm2.yaml"))
    p.add_argument("--budget", type=float, default=300.0, help="training seconds per trainer")
    p.add_argument("--quick", action="store_true", help="tiny-llama, 20 s each: a smoke run")
    p.add_argument("--skip-start", action="store_true", help="do not evaluate the start model")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "race"))
    p.add_argument("--out", help="JSON path (default <workdir>/race.json)")
    p.add_argument("--no-record", action="store_true", help="write no record under benchmarks/records/")
    p.add_argument("overrides", nargs="*", help="config overrides for both trainers, e.g. optim.lr=1e-5")
    args = p.parse_args(argv)
    overrides = [*(QUICK if args.quick else []), *args.overrides]
    budget = 20.0 if args.quick and args.budget == 300.0 else args.budget
    report = race(args.config, overrides, budget, Path(args.workdir), args.skip_start)
    out = Path(args.out or Path(args.workdir) / "race.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    print(f"wrote {out}")
    if not args.no_record:
        name = "race-vs-trl" + ("-quick" if args.quick else "")
        record = write_record(name, report, command=script_command(__file__, argv))
        print(f"wrote {record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
