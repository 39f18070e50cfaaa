"""The bench's command line: its flags, and the :class:`~vlm_treegrpo.bench.spec.BenchSpec` they give.

Flags that name a training setting are overrides of one config (``--config FILE``, else the
bench's :data:`~vlm_treegrpo.bench.spec.BENCH_BASE`), as are the positional
``section.field=value`` arguments: ``--lr 1e-5`` is ``optim.lr=1e-5``. A flag left out leaves
the config's value.
"""
from __future__ import annotations

import argparse
import math

from vlm_treegrpo.bench.spec import (
    SDPA_KERNELS,
    WORKLOADS,
    BenchSpec,
    bench_train_config,
    dotted,
    shaped,
)
from vlm_treegrpo.config import ConfigError

QUICK = {"steps": 2, "prompts_per_step": 2, "G": 4, "max_new_tokens": 16}
"""``--quick``: a smoke run (on tiny-llama, or the tiny VLM)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="text", help="text: arithmetic; vlm: synthetic visual task")
    p.add_argument("--config", help="our training config (YAML) both trainers run; default: the bench's own base config")
    p.add_argument("--model", help="model name or local directory (default: the config's, else smollm2-135m-instruct / tiny-qwen2-vl)")
    p.add_argument("--modes", default="flat,tree", help="comma list of flat (ours G x 1) and tree (ours K x M)")
    p.add_argument("--trainers", default="ours,trl", help="comma list of ours and trl")
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    p.add_argument("--rounds", type=int, default=1,
                   help="run each trainer this many times, alternating which goes first, and pool the measured steps")
    p.add_argument("--prompts-per-step", type=int, help="rollout.prompts_per_step (bench default 4)")
    p.add_argument("--micro-batch", type=int, default=0,
                   help="prompts per forward/backward (0 = the config's optim.micro_batch, else all of a step's)")
    p.add_argument("--G", type=int, help="completions per prompt (bench default 16; with --config: its K*M)")
    p.add_argument("--tree", help="our tree shape KxM for mode tree (default: the config's tree, else the squarest split of G)")
    p.add_argument("--max-new-tokens", type=int, help="completion budget, ours: thought + continuation (bench default 40)")
    p.add_argument("--thought-tokens", type=int, default=0, help="our thought budget in trees (0 = the config's, or 2/5 of the budget)")
    p.add_argument("--lr", type=float, help="optim.lr (bench default 2e-5)")
    p.add_argument("--autocast", choices=("none", "bfloat16"), help="model.autocast for both (TRL bf16=True; bench default bfloat16)")
    p.add_argument("--threads", type=int, help="model.threads: torch threads in each worker (0 = torch default)")
    p.add_argument("--seed", type=int, help="optim.seed and data.seed (bench default 0)")
    p.add_argument("--reward", help="algo.rewards, the one reward for both trainers: built-in name or pkg.module:fn (default correctness)")
    p.add_argument("--compile-decode", action="store_true", help="ours: compiled decoding (rollout.compile_decode; TRL unchanged)")
    p.add_argument("--decode-graphs", nargs="?", const="on", choices=("auto", "on", "off"),
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
    p.add_argument("--out", help="also write the report to this JSON path (default runs/bench/bench[-vlm].json, or scaling[-vlm].json)")
    p.add_argument("--record-name", help="the record's workload name (default bench-<workload>[-scaling][-quick])")
    p.add_argument("--no-record", action="store_true", help="write no record under benchmarks/records/")
    p.add_argument("overrides", nargs="*", help="more config overrides for both trainers, section.field=value (e.g. rollout.top_p=0.9)")


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


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The flags that name a training setting, as config overrides (only those given)."""
    out = {"rollout.prompts_per_step": args.prompts_per_step, "optim.lr": args.lr, "model.autocast": args.autocast,
           "model.threads": args.threads, "optim.seed": args.seed, "data.seed": args.seed,
           "algo.rewards": None if args.reward is None else [args.reward],
           "rollout.decode_graphs": {"on": True, "off": False, "auto": "auto", None: None}[args.decode_graphs],
           "rollout.compile_decode": True if args.compile_decode else None,
           "model.cudnn_attention": True if args.cudnn_attention else None,
           "rollout.drop_finished": False if args.keep_finished else None}
    return [dotted(k, v) for k, v in out.items() if v is not None]


def spec_from_args(args: argparse.Namespace) -> tuple[BenchSpec, list[str], list[str]]:
    """``(spec, modes, trainers)`` from the parsed flags; the spec's config is a tree (the
    flat mode is its :func:`~vlm_treegrpo.bench.spec.reshaped` K*M x 1). Raises
    :class:`~vlm_treegrpo.config.ConfigError` on a bad flag or setting before anything runs."""
    if args.quick:
        args.model = args.model or ("tiny-llama" if args.workload == "text" else WORKLOADS["vlm"][0])
        for key, value in QUICK.items():
            setattr(args, key, value)
    trainers = [t for t in args.trainers.split(",") if t]
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"flat", "tree"} or not trainers or set(trainers) - {"ours", "trl"}:
        raise ConfigError(f"bench: --modes takes flat,tree and --trainers ours,trl; got {args.modes!r} and {args.trainers!r}")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        raise ConfigError(f"bench: need --steps >= 1, --warmup >= 0 and --rounds >= 1, got {args.steps}, {args.warmup} and {args.rounds}")
    model = args.model or (None if args.config else WORKLOADS[args.workload][0])
    cfg = bench_train_config(args.workload, model, args.steps, args.warmup, args.config, [*flag_overrides(args), *args.overrides])
    r = cfg.rollout
    G = args.G or r.G
    K, M = tree_shape(G, args.tree) if args.G or args.tree or r.M == 1 else (r.K, r.M)
    micro = args.micro_batch or (None if args.config else r.prompts_per_step)
    cfg = shaped(cfg, args.workload, K, M, args.max_new_tokens, args.thought_tokens or None, micro)
    spec = BenchSpec(workload=args.workload, model=model or cfg.model.name, model_dir="", train=cfg, steps=args.steps,
                     warmup=args.warmup, sdpa_off=tuple(k for k in args.sdpa_off.split(",") if k), sample_stacks_ms=args.sample_stacks)
    return spec, modes, trainers
