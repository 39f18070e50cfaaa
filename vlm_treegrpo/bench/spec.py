"""What the benchmark measures: our training config plus the few settings only the bench has.

:class:`BenchSpec` holds a :class:`~vlm_treegrpo.config.TrainConfig` (``train``): our trainer
runs it as it is, and TRL's ``GRPOConfig`` is derived from it
(:func:`vlm_treegrpo.bench.trl.trl_args`: learning rate, betas, token budget, prompts per step,
micro-batch, sampling settings, seed ...). Beside it the spec keeps only what a training run
has no use for: the workload, the measured and warm-up steps, the distractor images, the sdpa
kernels to turn off, the stack sampler's period and the local model directory.

The config comes from a YAML file (``bench --config``) or, without one, from
:data:`BENCH_BASE`; the bench's flags are dotted overrides on top
(:func:`bench_train_config`), and :data:`RUN_SETTINGS` (no evaluation, no logging, no
diagnostics) come last. Settings TRL cannot mirror are checked (:data:`COMPARED`), not rewritten.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass

from vlm_treegrpo.config import ConfigError, TrainConfig, config_from_dict, load_config
from vlm_treegrpo.data.sources import load_task
from vlm_treegrpo.data.types import Example

SDPA_KERNELS = ("flash", "mem_efficient", "cudnn")
"""The sdpa kernels ``--sdpa-off`` may name (:func:`~vlm_treegrpo.train.runtime.disable_sdpa_kernels`)."""

WORKLOADS = {"text": ("smollm2-135m-instruct", "arithmetic"), "vlm": ("tiny-qwen2-vl", "visual")}
"""Workload -> (default model, synthetic task)."""

BENCH_BASE = {
    "model.dtype": "float32", "model.autocast": "bfloat16", "data.difficulty": 1, "data.seed": 0,
    "rollout.K": 4, "rollout.M": 4, "rollout.thought_max_tokens": 16, "rollout.answer_max_tokens": 24,
    "rollout.temperature": 1.0, "rollout.top_p": 1.0, "rollout.top_k": 0, "rollout.prompts_per_step": 4,
    "algo.rewards": ["correctness"], "algo.loss": "grpo", "algo.beta": 0.0, "algo.updates_per_batch": 1,
    "optim.lr": 2e-5, "optim.betas": [0.9, 0.99], "optim.warmup_steps": 0, "optim.max_grad_norm": 1.0, "optim.seed": 0,
}
"""The config the bench starts from without ``--config``: fp32 weights under bf16 autocast,
G = 16 as a 4 x 4 tree in a 40-token budget, temperature 1 (top-p 1, no top-k), 4 prompts a
step, AdamW at 2e-5 with betas (0.9, 0.99), one on-policy update, no KL."""

RUN_SETTINGS = {"algo.diag_every": 0, "eval.before": False, "eval.after": False, "log.progress": False,
                "log.samples_every": 0}
"""What a bench run never does, whatever the config says: gradient diagnostics, evaluation,
progress output, sample files (neither trainer's measured step includes them)."""

COMPARED = {
    "algo.loss": "grpo", "algo.agg": "token_mean", "algo.scale": "std", "algo.baseline": "mean",
    "algo.credit": "outcome", "algo.clip_eps": 0.2, "algo.beta": 0.0, "algo.updates_per_batch": 1,
    "rollout.refill_rounds": 0, "model.lora_r": 0, "model.gradient_checkpointing": False, "sft.steps": 0,
}
"""Settings whose value TRL's side runs as fixed (loss ``dapo`` = our GRPO token mean with group
std scaling, clip 0.2, no KL, one update a batch, no resampling, all weights, no activation
checkpointing, no warm start): a config that sets them otherwise is refused, naming the field."""


def dotted(key: str, value) -> str:
    """``key=value`` as a config override (the value written as JSON, which YAML reads back)."""
    return f"{key}={json.dumps(value)}"


def config_value(cfg: TrainConfig, key: str):
    """The value of a dotted field, ``config_value(cfg, "rollout.K")``."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


@dataclass
class BenchSpec:
    """One measured configuration: our training config and what only the bench sets. Both
    trainers read it (TRL through :func:`~vlm_treegrpo.bench.trl.trl_args` of ``train``)."""

    workload: str
    """text (arithmetic word problems) or vlm (the synthetic visual task)."""
    model: str
    """The model's name, for the report."""
    model_dir: str
    """Local directory both trainers load weights and tokenizer/processor from (``train.model.name``
    once it is prepared)."""
    train: TrainConfig
    """Our config: tree shape (K x M = G), token budgets, prompts per step, micro-batch, learning
    rate and betas, autocast, threads, seeds, the one reward, decoding options."""
    steps: int
    """Measured steps."""
    warmup: int = 1
    """Unmeasured steps before them."""
    images_per_prompt: int = 1
    """VLM: the question's image plus images_per_prompt - 1 distractors from other questions."""
    sdpa_off: tuple[str, ...] = ()
    """Both trainers: sdpa kernels torch may not pick on a GPU (of :data:`SDPA_KERNELS`), to test
    whether one of them makes a step slow (say cuDNN's, which plans each new shape)."""
    sample_stacks_ms: float = 0.0
    """Both trainers: sample the stepping thread's Python stack every this many milliseconds
    (0: off) and report where each slow step's time went (:class:`~vlm_treegrpo.bench.probes.StepProbe`)."""

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ConfigError(f"bench: workload must be one of {', '.join(sorted(WORKLOADS))}, got {self.workload!r}")
        if self.steps < 1 or self.warmup < 0:
            raise ConfigError(f"bench: need --steps >= 1 and --warmup >= 0, got {self.steps} and {self.warmup}")
        for key, value in COMPARED.items():
            if config_value(self.train, key) != value:
                raise ConfigError(f"{key}: the bench compares with TRL, which runs {value!r} here; "
                                  f"got {config_value(self.train, key)!r}")
        if len(self.train.algo.rewards) != 1:
            raise ConfigError(f"algo.rewards: the bench scores both trainers with one reward, got {self.train.algo.rewards}")
        if self.train.optim.steps != self.warmup + self.steps:
            raise ConfigError(f"optim.steps: must be warmup + steps = {self.warmup + self.steps}, got {self.train.optim.steps}")
        if self.train.data.source != WORKLOADS[self.workload][1]:
            raise ConfigError(f"data.source: the {self.workload} workload samples {WORKLOADS[self.workload][1]!r}, "
                              f"got {self.train.data.source!r}")
        rows = self.train.optim.micro_batch
        if self.workload == "vlm" and rows % self.G:
            raise ConfigError(f"optim.micro_batch: the vlm bench counts rows, a multiple of G={self.G}; got {rows}")
        if self.prompts_per_step % self.micro_prompts:
            raise ConfigError(f"optim.micro_batch: {self.micro_prompts} prompts per forward must divide "
                              f"rollout.prompts_per_step ({self.prompts_per_step})")
        if self.images_per_prompt < 1 or (self.images_per_prompt > 1 and self.workload != "vlm"):
            raise ConfigError(f"bench: images_per_prompt > 1 needs the vlm workload, got {self.images_per_prompt}")
        self.sdpa_off = tuple(self.sdpa_off)
        if set(self.sdpa_off) - set(SDPA_KERNELS):
            raise ConfigError(f"bench: --sdpa-off takes a comma list of {', '.join(SDPA_KERNELS)}, got {','.join(self.sdpa_off)}")

    @property
    def G(self) -> int:
        """Completions per prompt: our K*M leaves, TRL's ``num_generations``."""
        return self.train.rollout.G

    @property
    def prompts_per_step(self) -> int:
        return self.train.rollout.prompts_per_step

    @property
    def micro_prompts(self) -> int:
        """Prompts per forward/backward (``optim.micro_batch`` counts packed trees in the text
        workload, rows, G a prompt, in the vlm one; TRL: micro_prompts * G rows)."""
        rows = self.train.optim.micro_batch
        return rows if self.workload == "text" else max(1, rows // self.G)

    @property
    def n_prompts(self) -> int:
        return self.prompts_per_step * (self.warmup + self.steps)

    def to_dict(self) -> dict:
        """A JSON-able form (:func:`spec_from_dict` reads it back)."""
        return dataclasses.asdict(self)


def spec_from_dict(d: dict) -> BenchSpec:
    """The spec :meth:`BenchSpec.to_dict` wrote."""
    return BenchSpec(**{**d, "train": config_from_dict(d["train"])})


def bench_train_config(workload: str, model: str | None, steps: int, warmup: int, config: str | None = None,
                       overrides: Sequence[str] = ()) -> TrainConfig:
    """Our config for a bench run: ``config`` (a YAML file) or :data:`BENCH_BASE`, then
    ``overrides`` (``section.field=value``, the bench's flags among them), then the run's own
    settings: the model (where given), the workload's task, ``warmup + steps`` optimizer steps and
    :data:`RUN_SETTINGS`."""
    base = [] if config else [dotted(k, v) for k, v in BENCH_BASE.items()]
    run = {**({"model.name": model} if model else {}), "data.source": WORKLOADS[workload][1], "optim.steps": warmup + steps,
           **RUN_SETTINGS}
    return load_config(config, [*base, *overrides, *(dotted(k, v) for k, v in run.items())])


def shaped(cfg: TrainConfig, workload: str, K: int, M: int, max_new_tokens: int | None = None,
           thought_tokens: int | None = None, micro_prompts: int | None = None) -> TrainConfig:
    """``cfg`` with the tree at K x M (flat when M = 1: the whole budget is the thought),
    ``max_new_tokens`` the completion budget (default: cfg's), of which a tree's thought gets
    ``thought_tokens`` (default: cfg's where cfg is a tree and keeps its budget, else 2/5 of the
    budget), and ``micro_prompts`` prompts per forward (default: cfg's ``optim.micro_batch`` as
    it is; the vlm workload counts G rows a prompt)."""
    r = cfg.rollout
    total = max_new_tokens or r.max_new_tokens
    if M == 1:
        thought, answer = total, 0
    else:
        thought = thought_tokens or (r.thought_max_tokens if r.M > 1 and max_new_tokens is None else max(1, total * 2 // 5))
        answer = total - thought
    rows = cfg.optim.micro_batch if micro_prompts is None else micro_prompts * (1 if workload == "text" else K * M)
    return dataclasses.replace(cfg, rollout=dataclasses.replace(r, K=K, M=M, thought_max_tokens=thought, answer_max_tokens=answer),
                               optim=dataclasses.replace(cfg.optim, micro_batch=rows))


def reshaped(spec: BenchSpec, K: int, M: int, max_new_tokens: int | None = None, thought_tokens: int | None = None,
             **bench) -> BenchSpec:
    """``spec`` with its config :func:`shaped` to K x M at the same prompts per forward, and any
    bench field in ``bench`` (``images_per_prompt=2``)."""
    train = shaped(spec.train, spec.workload, K, M, max_new_tokens, thought_tokens, spec.micro_prompts)
    return dataclasses.replace(spec, train=train, **bench)


def make_spec(workload: str, model: str, steps: int, warmup: int, K: int, M: int, max_new_tokens: int | None = None,
              thought_tokens: int | None = None, micro_prompts: int | None = None, config: str | None = None,
              overrides: Sequence[str] = (), **bench) -> BenchSpec:
    """A spec from its parts: :func:`bench_train_config` (``model`` as ``model.name``: a name or a
    local directory, which is then also ``model_dir``) :func:`shaped` to K x M, and the bench's
    own fields in ``bench`` (``images_per_prompt``, ``sdpa_off``, ``sample_stacks_ms``)."""
    cfg = shaped(bench_train_config(workload, model, steps, warmup, config, overrides), workload, K, M, max_new_tokens,
                 thought_tokens, micro_prompts)
    return BenchSpec(workload=workload, model=model, model_dir=model, train=cfg, steps=steps, warmup=warmup, **bench)


def with_model_dir(spec: BenchSpec, model_dir: str) -> BenchSpec:
    """``spec`` loading its weights from ``model_dir`` (``model_dir`` and ``train.model.name``)."""
    model = dataclasses.replace(spec.train.model, name=model_dir)
    return dataclasses.replace(spec, model_dir=model_dir, train=dataclasses.replace(spec.train, model=model))


def length_signal_reward(completion: str, example) -> float:
    """A benchmarking-only reward that varies with the completion's length (in [0, 1]).

    A random-init tiny model never earns the correctness reward, so every group would have
    zero std and our trainer would skip every update, which flatters it. With this reward both
    trainers run their full update: ``--reward vlm_treegrpo.bench.spec:length_signal_reward``.
    """
    return (len(completion) % 7) / 6.0


def bench_task(spec: BenchSpec) -> tuple[list[Example], str]:
    """``(examples in step order, instruction)``: step s uses ``examples[s*P:(s+1)*P]``."""
    data = spec.train.data
    task = load_task(data.source, "gsm8k", spec.n_prompts + spec.images_per_prompt, 1, data.difficulty, data.seed)
    examples = task.train[: spec.n_prompts]
    if spec.images_per_prompt > 1:
        pool = [im for ex in task.train for im in ex.images]
        examples = [
            Example(ex.prompt, ex.answer, ex.images + tuple(pool[(i + j + 1) % len(pool)] for j in range(spec.images_per_prompt - 1)), ex.meta)
            for i, ex in enumerate(examples)
        ]
    return examples, task.instruction
