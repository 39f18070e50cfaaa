"""Run configuration: one dataclass per concern, loaded from YAML plus dotted overrides.

Every field has a one-line docstring. ``__post_init__`` rejects impossible values and
combinations with a :class:`ConfigError` that names the field (``algo.K: must be >= 1, got 0``);
nothing is ever silently rewritten. Unknown keys are errors too.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlm_treegrpo.core.advantages import ANSWER_SCOPES, BASELINES, SCALES
from vlm_treegrpo.core.losses import AGG_ALIASES, AGGREGATIONS, KL_KINDS, POLICY_LOSSES
from vlm_treegrpo.data.columns import FIELDS as DATA_FIELDS
from vlm_treegrpo.data.prompting import DEFAULT_TEMPLATE, template_problem
from vlm_treegrpo.data.visual import DIFFICULTIES as VISUAL_DIFFICULTIES
from vlm_treegrpo.data.visual import KINDS as VISUAL_KINDS
from vlm_treegrpo.data.visual import MIN_IMAGE_SIZE
from vlm_treegrpo.data.visual_math import KINDS as VISUAL_MATH_KINDS
from vlm_treegrpo.data.visual_math import LEVELS as VISUAL_MATH_LEVELS

CREDITS = ("outcome", "rredcot")
SEGMENTERS = ("delimiters", "entropy", "hybrid")
VALUE_ESTIMATORS = ("answer_prob", "importance")
TRACKER_NAMES = ("tensorboard", "wandb", "trackio", "mlflow")


class ConfigError(ValueError):
    """A config problem; the message starts with the dotted field name."""


def _require(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {msg}")


def _choice(value: str, allowed: tuple[str, ...], field_name: str) -> None:
    _require(value in allowed, field_name, f"must be one of {list(allowed)}, got {value!r}")


@dataclass
class ModelConfig:
    """Which policy to train and how to hold it."""

    name: str = "tiny-llama"
    """Built-in name (see `vlm-treegrpo presets`), local directory or Hugging Face hub id."""
    dtype: str = "auto"
    """auto, float32, bfloat16 or float16. For training, auto is fp32 weights (the master copy
    under autocast: AdamW steps smaller than bf16's resolution would otherwise be lost), except a
    frozen LoRA base on a GPU, which is bf16 (:meth:`training_dtype`); evaluation and sampling
    alone load auto as bf16 on CUDA, fp32 on the CPU."""
    attn_implementation: str = "auto"
    """auto (flash_attention_2 on CUDA when flash-attn is installed, else sdpa), sdpa or eager."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:N."""
    lora_r: int = 0
    """LoRA rank; 0 trains all weights."""
    lora_alpha: float = 32.0
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names that get LoRA adapters: every module whose last name part is one of these (the
    attention and MLP projections of the language model by default), outside the vision tower
    unless `lora_vision`."""
    lora_vision: bool = False
    """Also put LoRA adapters on the vision tower's modules named in `lora_targets` (which module
    is the tower, each family's adapter says); false leaves the vision encoder as it is."""
    threads: int = 0
    """torch CPU threads; 0: all cores when the model is on the CPU, 4 when it is on a GPU."""
    cudnn_attention: bool = False
    """On a GPU, let torch's sdpa pick cuDNN's attention kernel. Off by default: cuDNN builds an
    execution plan for each new shape (hundreds of milliseconds, forward and backward apart), and
    an RL step's shapes change with every batch (prompt widths, completion lengths), so steps
    stall on new shapes (docs/performance.md). True leaves torch's choice alone
    (:func:`~vlm_treegrpo.train.runtime.setup`)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them (activation
    checkpointing, :func:`~vlm_treegrpo.rollout.attention.checkpoint_layer`): the training forward
    keeps one tensor per layer, for about one more forward's compute. Same gradients, to the bit."""
    autocast: str = "auto"
    """Mixed precision for rollouts and the training forward/backward: auto (bfloat16 on a GPU,
    none on the CPU), none or bfloat16 (weights and optimizer state stay in `dtype`; evaluation
    always runs in `dtype`)."""

    layers: int = 0
    """Keep only the first N blocks of the LLM and of the vision tower (0: all). Only for
    ``random:<preset>`` names, whose widths, vocabulary and image limits stay the released
    model's: a depth-2 build of a 7B preset tests the real shapes in a few GiB."""

    def __post_init__(self) -> None:
        _require(bool(self.name), "model.name", "must not be empty")
        _require(self.layers >= 0, "model.layers", f"must be >= 0, got {self.layers}")
        _require(self.layers == 0 or self.name.startswith("random:"), "model.layers",
                 f"only applies to random:<preset> names, got model.name={self.name!r}")
        _choice(self.dtype, ("auto", "float32", "bfloat16", "float16"), "model.dtype")
        _choice(self.attn_implementation, ("auto", "sdpa", "eager", "flash_attention_2"), "model.attn_implementation")
        _require(self.lora_r >= 0, "model.lora_r", f"must be >= 0, got {self.lora_r}")
        _require(self.lora_alpha > 0, "model.lora_alpha", f"must be > 0, got {self.lora_alpha}")
        _require(self.threads >= 0, "model.threads", f"must be >= 0, got {self.threads}")
        _choice(self.autocast, ("auto", "none", "bfloat16"), "model.autocast")

    def training_dtype(self, device_type: str) -> str:
        """The weights' dtype for training on a ``device_type`` (``cpu``, ``cuda``, ...) device."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if device_type != "cpu" and self.lora_r > 0 else "float32"


def resolve_autocast(kind: str, device_type: str) -> str:
    """``model.autocast`` on a ``device_type`` device: ``auto`` is bfloat16 on an accelerator,
    none on the CPU (where bf16 pays only on CPUs with AVX512-BF16 or AMX: set it there)."""
    if kind != "auto":
        return kind
    return "none" if device_type == "cpu" else "bfloat16"


@dataclass
class DataConfig:
    """Where prompts and reference answers come from."""

    source: str = "arithmetic"
    """'arithmetic', 'visual' or 'visual_math' (built-in synthetic tasks; 'visual' and 'visual_math'
    have one image per question and need a vision-language model), a local .jsonl/.json/.parquet/.csv
    file, a folder `datasets` reads (imagefolder with metadata, shards), or a hub dataset id ('id',
    'id:config', 'id@split')."""
    format: str = "auto"
    """Record format of a file or hub source: gsm8k (question/answer '#### N'), math (problem/solution
    \\boxed{}), visual (image-question records: Geometry3K / CLEVR / MathVista fields; the default
    instruction asks for a number, set `instruction` for multiple-choice data), or auto (told from
    the columns: an image column is visual, an answer with '####' gsm8k, else math)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Which column holds each field the format reads: {question: ..., answer: ..., solution: ...,
    image: ..., choices: ...}; unmapped fields are read from their usual names."""
    train_split: str = "train"
    """Split of `source` to train on (an 'id@split' source names its own)."""
    test_split: str = "test"
    """Split to evaluate on: of `test_source` when set, else of `source`; without it a held-out part
    of the training split is used (`test_fraction`)."""
    test_source: str = ""
    """Evaluation source for file/hub data (same forms as `source`); empty uses `source`'s `test_split`."""
    test_fraction: float = 0.1
    """Share of the training split held out (seeded by `seed`, never trained on) when there is no
    `test_split` in `source` and no `test_source`."""
    n_train: int = 2000
    """Training problems (synthetic) or cap on loaded records (0 = all)."""
    n_test: int = 200
    """Held-out problems for evaluation."""
    difficulty: int = 1
    """Synthetic task difficulty (1 easiest)."""
    seed: int = 0
    """Seed of the synthetic generator and of the held-out part of file/hub data."""
    instruction: str = "default"
    """Text appended to every prompt; 'default' uses the task's answer-format instruction, '' adds nothing."""
    template: str = DEFAULT_TEMPLATE
    """The user turn, from the record's question and the instruction: '{question}' is required,
    '{instruction}' optional (literal braces doubled)."""
    system_prompt: str = ""
    """A system turn before every prompt ('' = none; the model's chat template may add its own)."""
    skip_bad: bool = False
    """Skip (and count) records without an answer instead of failing on the first one."""
    image_size: int = 64
    """Side in pixels of the synthetic visual task's images (source 'visual'; the processor resizes them)."""
    max_pixels: int = 0
    """Most pixels the processor resizes an image to (bounds its image tokens and memory; Qwen-VL
    families); 0 keeps the processor's own bound."""
    min_pixels: int = 0
    """Fewest pixels the processor resizes an image to (Qwen-VL families); 0 keeps the processor's own."""
    kinds: list[str] = field(default_factory=list)
    """Question kinds of a synthetic visual task ('visual': count, relation, bar_chart, geometry;
    'visual_math': cards, shapes, bars); [] draws all."""

    def __post_init__(self) -> None:
        _require(bool(self.source), "data.source", "must not be empty")
        _choice(self.format, ("auto", "gsm8k", "math", "visual"), "data.format")
        _require(isinstance(self.columns, dict), "data.columns", f"must be a mapping of field to column, got {self.columns!r}")
        _require(not self.columns or self.source not in ("arithmetic", "visual"), "data.columns",
                 f"the synthetic source {self.source!r} has no columns to map")
        for key, column in self.columns.items():
            _require(key in DATA_FIELDS, f"data.columns.{key}", f"unknown field; the fields are {list(DATA_FIELDS)}")
            _require(isinstance(column, str) and bool(column), f"data.columns.{key}", f"must be a column name, got {column!r}")
        _require(bool(self.train_split), "data.train_split", "must not be empty")
        problem = template_problem(self.template) if isinstance(self.template, str) else "must be a string"
        _require(problem is None, "data.template", f"{problem}, got {self.template!r}")
        _require(bool(self.test_split), "data.test_split", "must not be empty")
        _require(self.max_pixels >= 0, "data.max_pixels", f"must be >= 0, got {self.max_pixels}")
        _require(self.min_pixels >= 0, "data.min_pixels", f"must be >= 0, got {self.min_pixels}")
        _require(not (self.min_pixels and self.max_pixels) or self.min_pixels <= self.max_pixels, "data.min_pixels",
                 f"must be <= data.max_pixels, got {self.min_pixels} > {self.max_pixels}")
        _require(0 < self.test_fraction < 1, "data.test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        _require(self.image_size >= MIN_IMAGE_SIZE, "data.image_size", f"must be >= {MIN_IMAGE_SIZE}, got {self.image_size}")
        _require(
            self.source != "visual" or self.difficulty in VISUAL_DIFFICULTIES,
            "data.difficulty",
            f"the visual task has levels {sorted(VISUAL_DIFFICULTIES)}, got {self.difficulty}",
        )
        _require(self.n_train >= 0, "data.n_train", f"must be >= 0, got {self.n_train}")
        _require(self.n_test >= 1, "data.n_test", f"must be >= 1, got {self.n_test}")
        _require(self.difficulty >= 1, "data.difficulty", f"must be >= 1, got {self.difficulty}")
        _require(
            self.source != "visual_math" or self.difficulty in VISUAL_MATH_LEVELS,
            "data.difficulty",
            f"must be in {min(VISUAL_MATH_LEVELS)}..{max(VISUAL_MATH_LEVELS)} for the visual_math task, got {self.difficulty}",
        )
        kinds = {"visual": VISUAL_KINDS, "visual_math": VISUAL_MATH_KINDS}
        _require(not self.kinds or self.source in kinds, "data.kinds", f"only the 'visual' source (and 'visual_math') has kinds, source is {self.source!r}")
        bad = [k for k in self.kinds if k not in kinds.get(self.source, ())]
        _require(not bad, "data.kinds", f"unknown kinds {bad}; the {self.source} task has {list(kinds.get(self.source, ()))}")
        _require(len(set(self.kinds)) == len(self.kinds), "data.kinds", f"must not repeat a kind, got {self.kinds}")


@dataclass
class RolloutConfig:
    """How the K x M tree of completions is sampled for each prompt."""

    K: int = 4
    """Thoughts sampled per prompt."""
    M: int = 2
    """Continuations (answers) sampled per thought; M=1 with K=G is flat GRPO."""
    thought_max_tokens: int = 32
    """Token budget of a thought; it ends earlier at a branch delimiter or EOS."""
    answer_max_tokens: int = 32
    """Token budget of each continuation after its thought."""
    branch_delimiters: list[str] = field(default_factory=lambda: ["</think>", "\n\n"])
    """Strings that end a thought (the branch point); [] branches at the token budget only."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    prompts_per_step: int = 4
    """Prompts (trees) per optimizer step."""
    compile_decode: bool = False
    """Decode through a static KV cache with the model's forward compiled (torch.compile; CUDA
    graphs on a GPU, where each decode step is otherwise bound by kernel launches). The first
    step pays the compilation (a new batch size once more), and ``drop_finished`` is off under
    it."""
    decode_graphs: bool | str = "auto"
    """Decode steps replay a captured CUDA graph (one launch a token instead of about 1,240 for
    SmolLM2's 30 layers; :mod:`vlm_treegrpo.rollout.graphs`), for text models and VLMs: one
    graph per batch shape, captured on first use and kept. ``"auto"`` (default): on where the
    model is on a CUDA device, off elsewhere and under ``compile_decode``; ``true`` also runs the
    same loop eagerly without CUDA; ``false``: ``generate``. If capture fails (the reason is
    warned and reported), the loop runs eagerly. On the CPU, where decoding is compute-bound, the
    static cache's padded columns cost more than the launches saved, so ``auto`` leaves it off
    there. A model with a sliding window (Gemma3) or on flash-attention
    decodes as without. Finished rows stay in the batch."""
    drop_finished: bool = True
    """Finished rows leave the decode batch (the same draws as without; off under
    ``compile_decode``). On a GPU, where decoding is launch-bound, fewer rows save less and each
    drop costs one more ``generate`` call."""
    refill_rounds: int = 0
    """Dynamic sampling (DAPO, arXiv 2503.14476): a prompt whose K*M rewards all agree gives no
    gradient, so it is replaced by the next prompt of the training order, sampled and scored,
    for up to this many rounds per step. The step then updates on up to ``prompts_per_step``
    prompts with signal. Departure: DAPO over-samples and filters until the batch is full; here
    the rounds are bounded, and a prompt still without signal after them stays (it adds no
    gradient). Under data parallelism each process replaces its own, from the shared training
    order. 0 = off."""

    def __post_init__(self) -> None:
        _require(isinstance(self.decode_graphs, bool) or self.decode_graphs == "auto",
                 "rollout.decode_graphs", f"must be true, false or auto, got {self.decode_graphs!r}")
        _require(not (self.decode_graphs is True and self.compile_decode), "rollout.decode_graphs",
                 "cannot be combined with rollout.compile_decode (choose one way to decode)")
        _require(self.refill_rounds >= 0, "rollout.refill_rounds", f"must be >= 0, got {self.refill_rounds}")
        _require(self.K >= 1, "rollout.K", f"must be >= 1, got {self.K}")
        _require(self.M >= 1, "rollout.M", f"must be >= 1, got {self.M}")
        _require(self.K * self.M >= 2, "rollout.K", f"K*M must be >= 2 for a group baseline, got {self.K}x{self.M}")
        _require(self.thought_max_tokens >= 1, "rollout.thought_max_tokens", f"must be >= 1, got {self.thought_max_tokens}")
        _require(self.answer_max_tokens >= 0, "rollout.answer_max_tokens", f"must be >= 0, got {self.answer_max_tokens}")
        _require(
            self.M == 1 or self.answer_max_tokens >= 1,
            "rollout.answer_max_tokens",
            f"must be >= 1 when M > 1 (M={self.M})",
        )
        _require(math.isfinite(self.temperature) and self.temperature > 0, "rollout.temperature",
                 f"must be a finite number > 0 (sampling needs one), got {self.temperature}")
        _require(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.top_k >= 0, "rollout.top_k", f"must be >= 0, got {self.top_k}")
        _require(self.prompts_per_step >= 1, "rollout.prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")

    @property
    def G(self) -> int:
        """Leaves per prompt."""
        return self.K * self.M

    @property
    def max_new_tokens(self) -> int:
        """Largest completion length (thought + continuation)."""
        return self.thought_max_tokens + (self.answer_max_tokens if self.M > 1 else 0)


@dataclass
class AlgoConfig:
    """The RL objective: rewards, advantages, policy loss, KL."""

    rewards: list[Any] = field(default_factory=lambda: ["correctness"])
    """Reward functions: 'correctness', 'format', 'printable' (dense shaping for smoke runs), 'pkg.module:fn', or {name, weight} mappings."""
    reward_timeout_s: float = 60.0
    """The time one reward call may take; a call past it is stopped and counted as a failure
    (reward 0.0, ``reward_failures/<fn>``), so a hanging reward cannot stall the run. 0 = none."""
    reward_workers: int = 1
    """Worker processes that run the rewards given by import path (built-ins run in the trainer's
    process). A call past ``reward_timeout_s`` has its worker killed and replaced, so the limit
    holds whatever the function catches (a bare ``except:`` too); 0 runs them in the trainer's
    process, where the limit is a signal the function can swallow
    (:mod:`vlm_treegrpo.rewards.workers`)."""
    loss: str = "grpo"
    """grpo (PPO-clipped token ratio), gspo (GSPO: clipped sequence ratio), cispo (CISPO: clipped,
    detached importance weight times log-prob, every token keeps its gradient) or rgra (REINFORCE
    with group-relative advantages, no ratio/clip); formulas in docs/losses.md."""
    scale: str = "std"
    """std (GRPO's per-prompt std normalization) or none (Dr. GRPO / plain REINFORCE scale)."""
    baseline: str = "mean"
    """Group baseline for flat groups: mean, rloo or none."""
    answer_scope: str = "group"
    """Continuation advantages relative to all K*M leaves (group) or within their thought (thought)."""
    clip_eps: float = 0.2
    """Clip range of the importance ratio (grpo, gspo, cispo): the ratio is clipped to
    [1 - clip_eps, 1 + clip_eps_high]."""
    clip_eps_high: float | None = None
    """Upper clip range (DAPO's clip-higher, e.g. 0.28 with clip_eps 0.2); null: clip_eps."""
    tis_cap: float = 0.0
    """Truncated importance sampling: with updates_per_batch > 1, each token's loss is weighted by
    min(pi_prox / pi_sampler, tis_cap), pi_prox being the current policy for rgra (whose later
    passes are otherwise uncorrected) and the ratio's old policy for grpo/gspo/cispo (the
    sampler's here, so the weight is 1); 0 = off, else >= 1 (e.g. 2)."""
    agg: str = "token_mean"
    """Token aggregation: token_mean (DAPO), seq_mean (GRPO paper), seq_mean_token_sum or constant
    (Dr. GRPO); TRL's loss_type names (grpo, dapo, dr_grpo) and verl's loss_agg_mode names
    (token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm) are accepted."""
    beta: float = 0.0
    """KL coefficient to the reference policy; 0 loads no reference model."""
    kl_kind: str = "k3"
    """KL estimator: k1 or k3."""
    updates_per_batch: int = 1
    """Optimizer passes over each rollout batch; 1 is on-policy (old log-probs not recomputed)."""
    eps: float = 1e-6
    """Added to the std before dividing."""
    credit: str = "outcome"
    """Credit assignment: outcome (one advantage per thought/continuation) or rredcot (RREDCoT,
    arXiv 2606.06475: per-segment advantages from model-estimated prefix values; text policies)."""
    rredcot_segmenter: str = "delimiters"
    """RREDCoT segmentation: delimiters (line breaks, </think>, Step/So/Therefore), entropy (high-
    entropy tokens start segments; one extra forward) or hybrid (both)."""
    rredcot_values: str = "answer_prob"
    """RREDCoT prefix values: answer_prob (p(gold answer | prefix + answer prefix), teacher-forced)
    or importance (the group's other final answers, weighted by their likelihood after the prefix)."""
    rredcot_min_len: int = 2
    """Minimum tokens per RREDCoT segment (boundaries closer than this are dropped)."""
    rredcot_entropy_quantile: float = 0.9
    """Per-sequence entropy quantile above which a token starts a segment (entropy, hybrid)."""
    rredcot_answer_prefix: str = "\nAnswer:"
    """Text teacher-forced after each prefix before the scored answer tokens."""
    diag_every: int = 5
    """Per-prompt gradient diagnostics (update norm with/without std scaling, pairwise cosine)
    every N steps; 0 = off. The reward-std statistics are logged every step regardless."""

    def __post_init__(self) -> None:
        _require(isinstance(self.rewards, list) and len(self.rewards) > 0, "algo.rewards", "must be a non-empty list")
        _require(self.reward_timeout_s >= 0, "algo.reward_timeout_s", f"must be >= 0, got {self.reward_timeout_s}")
        _require(self.reward_workers >= 0, "algo.reward_workers", f"must be >= 0, got {self.reward_workers}")
        _choice(self.credit, CREDITS, "algo.credit")
        _choice(self.rredcot_segmenter, SEGMENTERS, "algo.rredcot_segmenter")
        _choice(self.rredcot_values, VALUE_ESTIMATORS, "algo.rredcot_values")
        _require(self.rredcot_min_len >= 1, "algo.rredcot_min_len", f"must be >= 1, got {self.rredcot_min_len}")
        _require(
            0.0 <= self.rredcot_entropy_quantile <= 1.0,
            "algo.rredcot_entropy_quantile",
            f"must be in [0, 1], got {self.rredcot_entropy_quantile}",
        )
        _require(self.diag_every >= 0, "algo.diag_every", f"must be >= 0, got {self.diag_every}")
        _choice(self.loss, POLICY_LOSSES, "algo.loss")
        _choice(self.scale, SCALES, "algo.scale")
        _choice(self.baseline, BASELINES, "algo.baseline")
        _choice(self.answer_scope, ANSWER_SCOPES, "algo.answer_scope")
        _choice(self.agg, AGGREGATIONS + tuple(AGG_ALIASES), "algo.agg")
        _choice(self.kl_kind, KL_KINDS, "algo.kl_kind")
        _require(self.clip_eps >= 0, "algo.clip_eps", f"must be >= 0, got {self.clip_eps}")
        _require(
            self.clip_eps_high is None or (isinstance(self.clip_eps_high, (int, float)) and not isinstance(self.clip_eps_high, bool)
                                           and self.clip_eps_high >= 0),
            "algo.clip_eps_high", f"must be null or a number >= 0, got {self.clip_eps_high!r}",
        )
        _require(self.tis_cap == 0 or self.tis_cap >= 1, "algo.tis_cap",
                 f"must be 0 (off) or >= 1 (a cap below 1 would down-weight on-policy tokens), got {self.tis_cap}")
        _require(self.beta >= 0, "algo.beta", f"must be >= 0, got {self.beta}")
        _require(self.updates_per_batch >= 1, "algo.updates_per_batch", f"must be >= 1, got {self.updates_per_batch}")
        _require(self.eps > 0, "algo.eps", f"must be > 0, got {self.eps}")


@dataclass
class OptimConfig:
    """Optimizer and schedule."""

    steps: int = 20
    """Optimizer steps (each on a fresh rollout batch)."""
    lr: float = 1e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    schedule: str = "constant"
    """The learning rate after the warm-up: constant, linear (TRL's default) or cosine decay
    towards 0 at ``steps`` (a resumed run that changes ``steps`` stretches the decay)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = off)."""
    max_nonfinite_steps: int = 3
    """A step whose gradient is not finite (NaN or inf) makes no update (the step's row says
    ``skipped_updates``); this many such steps in a row stop the run with a checkpoint, the
    weights being those of the last finite update. 0 = never stop."""
    micro_batch: int = 4
    """Rows per forward/backward (gradient accumulation splits the step): packed prompt trees for
    text models and for the VLM families that pack trees (all but Gemma3), leaves for Gemma3
    (each distinct image is encoded once per micro-batch, so keep a tree's K*M leaves in one)."""
    seed: int = 0
    """Seed for prompt order and sampling."""
    time_budget_s: float = 0.0
    """Stop after the step during which the GRPO loop's wall-clock time (rollouts, updates and any
    periodic evaluation) reaches this many seconds, even if fewer than ``steps`` ran; 0 = no limit.
    The summary's ``steps`` is the number of steps that ran. A resumed run (``log.resume``)
    counts the seconds of the sessions before it too."""

    def __post_init__(self) -> None:
        _require(self.steps >= 0, "optim.steps", f"must be >= 0, got {self.steps}")
        _require(self.time_budget_s >= 0, "optim.time_budget_s", f"must be >= 0, got {self.time_budget_s}")
        _require(math.isfinite(self.lr) and 0 < self.lr <= 1, "optim.lr", f"must be in (0, 1], got {self.lr}")
        _require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", f"must be two numbers in [0, 1), got {self.betas}"
        )
        _require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _choice(self.schedule, ("constant", "linear", "cosine"), "optim.schedule")
        _require(self.max_grad_norm >= 0, "optim.max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        _require(self.max_nonfinite_steps >= 0, "optim.max_nonfinite_steps", f"must be >= 0, got {self.max_nonfinite_steps}")
        _require(self.micro_batch >= 1, "optim.micro_batch", f"must be >= 1, got {self.micro_batch}")


@dataclass
class SFTConfig:
    """Optional supervised warm start before GRPO (:mod:`vlm_treegrpo.train.sft`): teacher-forced NLL of a
    target completion built from each training example's reference answer."""

    steps: int = 0
    """SFT optimizer steps before the first GRPO step; 0 = no warm start."""
    lr: float = 1e-3
    """AdamW learning rate of the warm start (its own optimizer; GRPO's starts fresh)."""
    batch_size: int = 16
    """Training examples per SFT step (split into rows of `optim.micro_batch` per forward)."""
    target: str = "Answer: {answer}"
    """Completion taught for each example; `{answer}` is its reference answer (EOS is appended)."""

    def __post_init__(self) -> None:
        _require(self.steps >= 0, "sft.steps", f"must be >= 0, got {self.steps}")
        _require(math.isfinite(self.lr) and 0 < self.lr <= 1, "sft.lr", f"must be in (0, 1], got {self.lr}")
        _require(self.batch_size >= 1, "sft.batch_size", f"must be >= 1, got {self.batch_size}")
        try:
            probe = self.target.format(answer="\x00")
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"sft.target: must be a format string whose only field is {{answer}}, got {self.target!r} ({err!r})") from err
        _require("\x00" in probe, "sft.target", f"must contain {{answer}}, got {self.target!r}")


@dataclass
class EvalConfig:
    """Held-out evaluation (greedy decoding)."""

    before: bool = True
    """Evaluate before training."""
    after: bool = True
    """Evaluate after training."""
    every: int = 0
    """Also evaluate every N steps (0 = never)."""
    batch_size: int = 50
    """Prompts per generation batch."""
    max_new_tokens: int = 0
    """Generation budget; 0 uses the rollout's thought + answer budget."""
    allow_empty: bool = False
    """An empty test set is an error (an accuracy of nothing would read as 0.0); true lets the
    run go on with a warning and no evaluation."""
    samples: int = 0
    """Besides the greedy accuracy, sample this many completions per test prompt (at the
    rollout's temperature, top-p and top-k; seeded, the same draws at every evaluation) and
    report the unbiased pass@k for k = 1, 2, 4, ... up to it and the majority vote maj@n (the
    most common final answer of the n is correct); 0 = greedy only."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, "eval.every", f"must be >= 0, got {self.every}")
        _require(self.samples >= 0, "eval.samples", f"must be >= 0, got {self.samples}")
        _require(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.max_new_tokens >= 0, "eval.max_new_tokens", f"must be >= 0, got {self.max_new_tokens}")


@dataclass
class LogConfig:
    """Where the run writes."""

    name: str = ""
    """Run name; outputs go to <run_dir>/<name>/. Empty: a new timestamped name
    (run-YYYYmmdd-HHMMSS), so runs never write over one another unless given the same name."""
    run_dir: str = "runs"
    """Parent directory of runs."""
    progress: bool = True
    """Show a progress bar."""
    save_model: bool = False
    """Save the trained weights (or LoRA adapter) to <run>/model at the end."""
    samples_every: int = 5
    """Write a few sample completions to samples.jsonl every N steps (0 = never)."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint to <run>/checkpoint every N GRPO steps and after the last
    (0 = only when the run is stopped by SIGTERM / SIGINT); :mod:`vlm_treegrpo.train.checkpoint`."""
    save_best: bool = False
    """Keep the weights of the run's best held-out accuracy so far (of ``eval.before``, the warm
    start's, every ``eval.every`` and ``eval.after``; the earliest on a tie) in <run>/best, for
    ``eval --model`` and ``export``."""
    checkpoint_keep: int = 1
    """Checkpoints kept: the newest in <run>/checkpoint, the ``checkpoint_keep - 1`` before it
    in <run>/checkpoint-<step> (:mod:`vlm_treegrpo.train.checkpoint_dir`)."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that get the config, the per-step metrics and the sample completions
    besides metrics.jsonl: any of tensorboard (event files in <run>/tensorboard), wandb, trackio,
    mlflow. Each is an optional extra: pip install 'vlm-treegrpo[tensorboard]'."""
    project: str = "vlm-treegrpo"
    """Project name for wandb and trackio, experiment name for mlflow."""
    resume: str = "off"
    """``off`` (start afresh, overwriting the run's logs), ``auto`` (go on from <run>/checkpoint
    when there is one, else start) or ``must`` (go on from it; stop if there is none)."""

    def __post_init__(self) -> None:
        _require("/" not in self.name and self.name not in (".", ".."), "log.name", f"must be a name without '/', got {self.name!r}")
        _require(bool(self.name) or self.resume == "off", "log.resume",
                 "needs log.name (a run without a name gets a new timestamped directory, so there is nothing to resume)")
        bad = [t for t in self.report_to if t not in TRACKER_NAMES]
        _require(not bad, "log.report_to", f"unknown trackers {bad}; known: {list(TRACKER_NAMES)}")
        _require(len(set(self.report_to)) == len(self.report_to), "log.report_to", f"must not repeat a tracker, got {self.report_to}")
        _require(bool(self.project), "log.project", "must not be empty")
        _require(self.samples_every >= 0, "log.samples_every", f"must be >= 0, got {self.samples_every}")
        _require(self.checkpoint_every >= 0, "log.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        _require(self.checkpoint_keep >= 1, "log.checkpoint_keep", f"must be >= 1, got {self.checkpoint_keep}")
        _choice(self.resume, ("off", "auto", "must"), "log.resume")

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / self.name


@dataclass
class TrainConfig:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts and answers."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Tree sampling."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """Objective."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Supervised warm start."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    log: LogConfig = field(default_factory=LogConfig)
    """Outputs."""

    def __post_init__(self) -> None:
        _require(
            not (self.algo.answer_scope == "thought" and self.rollout.M < 2),
            "algo.answer_scope",
            f"'thought' needs rollout.M >= 2 (with M={self.rollout.M} every continuation advantage is 0)",
        )
        _require(
            self.algo.baseline == "mean" or self.rollout.M == 1,
            "algo.baseline",
            f"trees (M={self.rollout.M} > 1) use the mean baseline of GRPO-MA; {self.algo.baseline!r} is for flat groups",
        )
        if self.algo.credit == "rredcot":
            _require(
                self.algo.baseline == "mean",
                "algo.baseline",
                f"credit=rredcot centres segment returns on their prompt group's mean; {self.algo.baseline!r} does not apply",
            )
            _require(
                self.algo.answer_scope == "group",
                "algo.answer_scope",
                "credit=rredcot gives per-segment advantages over the prompt group; 'thought' does not apply",
            )

        _require(
            not (self.sft.steps > 0 and self.model.lora_r > 0 and self.algo.beta > 0),
            "sft.steps",
            "a warm start with LoRA and algo.beta > 0 would take the KL to the pre-SFT base model (LoRA's reference); "
            "train all weights (model.lora_r=0) or set algo.beta=0",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check a YAML value against a field's annotation (ints widen to floats; nothing else converts)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return value
    if origin is list:
        _require(isinstance(value, list), name, f"must be a list, got {value!r}")
        return value
    if tp is bool:
        _require(isinstance(value, bool), name, f"must be true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), name, f"must be a number, got {value!r}")
        _require(math.isfinite(value), name, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), name, f"must be an integer, got {value!r}")
        return value
    if tp is str:
        _require(isinstance(value, str), name, f"must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{name}: unknown key (known: {sorted(fields)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            _require(isinstance(value, dict), name, f"must be a mapping, got {value!r}")
            kwargs[key] = _build(tp, value, f"{name}.")
        else:
            kwargs[key] = _coerce(value, tp, name)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["algo.M=4", "log.name=x"]`` -> ``[("algo.M", 4), ("log.name", "x")]`` (values parsed as YAML)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: an override must look like section.field=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"{key.strip()}: the value {raw!r} is not valid YAML ({_yaml_problem(err)})") from err
        out.append((key.strip(), value))
    return out


def config_from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a nested mapping plus dotted overrides."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in (values or {}).items()}
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        return _build(TrainConfig, tree, "")
    except TypeError as err:  # a section given a scalar, etc.
        raise ConfigError(str(err)) from err


def _yaml_problem(err: Exception) -> str:
    """A YAML error in one line: the problem and its line and column."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(err, 'problem', None) or type(err).__name__}{where}"


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML file (or nothing) and apply ``section.field=value`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config: {p} is not valid YAML: {_yaml_problem(err)}") from err
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config: cannot read {p} ({type(err).__name__}: {err})") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config: {p} must hold a mapping at the top level")
        values = loaded or {}
    return config_from_dict(values, overrides)
