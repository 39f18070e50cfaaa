"""Memory plan of a run before anything is loaded: weights, gradients, optimizer state, the KL
reference, activations (with and without checkpointing), logits and the rollout KV cache, per
GPU, for full fine-tuning and LoRA, sharded and not. Formulas and their limits: docs/memory.md.

The parameter counts are exact: the released architecture (:mod:`vlm_treegrpo.models.shapes`)
is instantiated on the ``meta`` device, which allocates nothing. Everything else is arithmetic
on the shape's numbers (:func:`plan_rows` is pure).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import AutoModelForCausalLM

from vlm_treegrpo.models.shapes import PREFIX, Shape, load_shape, shape_names, text_config_object
from vlm_treegrpo.policy.factory import lora_target_names
from vlm_treegrpo.vlm.registry import get_adapter

GIB = 1024**3


@dataclass(frozen=True)
class ModelSize:
    """What the plan needs to know of an architecture."""

    params: int
    """All parameters (vision tower included; a tied embedding counted once)."""
    lora_params: int
    """Parameters of rank-``r`` LoRA adapters on the target linear layers (peft's suffix match)."""
    layers: int
    """LLM blocks."""
    hidden: int
    """LLM width."""
    intermediate: int
    """LLM MLP width."""
    kv_dim: int
    """Key (= value) width per token per layer: kv heads x head dim."""
    vocab: int
    """Vocabulary (the logits' width)."""


def _meta_model(shape: Shape, layers: int | None):
    """The architecture on the meta device (no memory)."""
    with torch.device("meta"):
        if shape.family is None:
            return AutoModelForCausalLM.from_config(text_config_object(shape, layers))
        adapter = get_adapter(shape.family)
        return adapter.model_cls(adapter.random_config(shape, layers))


def lora_param_count(model, r: int, targets: list[str], skip_prefix: str | None = None) -> int:
    """``r x (in + out)`` over every ``nn.Linear`` LoRA adapts: its name ends in one of ``targets``
    and it lies outside ``skip_prefix`` (:func:`~vlm_treegrpo.policy.factory.lora_target_names`)."""
    names = set(lora_target_names(model, targets, skip_prefix))
    return sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if name in names and isinstance(m, torch.nn.Linear))


def model_size(shape: Shape, lora_r: int = 16, lora_targets: list[str] | None = None, layers: int | None = None,
               lora_vision: bool = False) -> ModelSize:
    """The exact sizes of ``shape`` (depth cut to ``layers``) from a meta-device build; the LoRA
    adapters leave the vision tower alone unless ``lora_vision`` (as ``model.lora_vision``)."""
    targets = lora_targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = _meta_model(shape, layers)
    skip = None
    if shape.family is not None and not lora_vision:
        tower = get_adapter(shape.family).vision_tower(model)
        skip = next(name for name, module in model.named_modules() if module is tower)
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return ModelSize(
        params=sum(p.numel() for p in model.parameters()),
        lora_params=lora_param_count(model, lora_r, targets, skip),
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        kv_dim=text.num_key_value_heads * head_dim,
        vocab=text.vocab_size,
    )


def random_rows() -> list[dict[str, str]]:
    """The ``random:<preset>`` builds as ``{"name", "family", "params", "source"}`` rows (for ``presets``)."""
    rows = []
    for name in shape_names():
        shape = load_shape(name)
        params = model_size(shape).params
        rows.append({"name": PREFIX + name, "family": shape.family or "text", "params": f"{params / 1e9:.2f}B",
                     "source": f"random weights at {shape.hub_id}'s shape (models/shapes/{name}.json)"})
    return rows


@dataclass(frozen=True)
class Workload:
    """The run's sizes that memory depends on (from a training config or the command line)."""

    gpus: int = 1
    """GPUs (data parallel; sharded settings divide the model state by it)."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU."""
    prompt_tokens: int = 512
    """Prompt length in tokens, image tokens included."""
    prompts_per_step: int = 8
    """Prompts per step over all GPUs."""
    K: int = 4
    """Thoughts per prompt."""
    M: int = 2
    """Continuations per thought."""
    thought_tokens: int = 256
    """Thought budget."""
    answer_tokens: int = 256
    """Continuation budget."""
    micro_batch: int = 1
    """Packed trees per training forward."""
    reference: bool = False
    """A KL reference model is held (``algo.beta > 0``); LoRA's is the base with adapters off."""
    act_bytes: int = 2
    """Bytes per activation element: 2 under bf16 autocast (a GPU), 4 in fp32."""
    headroom: float = 0.9
    """Share of the GPU memory the plan may fill (the rest: CUDA context, allocator slack)."""

    @property
    def tree_tokens(self) -> int:
        """Tokens of one packed tree: the prompt once, K thoughts, K x M continuations."""
        return self.prompt_tokens + self.K * self.thought_tokens + self.K * self.M * self.answer_tokens

    @property
    def local_prompts(self) -> int:
        """Prompts per GPU per step."""
        return -(-self.prompts_per_step // self.gpus)


def activation_bytes_per_token_layer(size: ModelSize, act_bytes: int) -> int:
    """What autograd keeps per token in one Llama-style block: 8 hidden-wide tensors (norm
    inputs and outputs, query, attention output, o_proj input, residual), key and value, and 4
    MLP-wide tensors (gate, up, activation, product), at ``act_bytes`` each."""
    return act_bytes * (8 * size.hidden + 2 * size.kv_dim + 4 * size.intermediate)


def plan_rows(size: ModelSize, w: Workload) -> list[dict]:
    """One row per setting (``lora`` x ``sharded`` x ``checkpointing``), bytes per GPU of each
    part and their total, and whether it fits ``w.headroom`` of the GPU. Pure arithmetic."""
    P, L = size.params, size.lora_params
    tokens = min(w.micro_batch, w.local_prompts) * w.tree_tokens  # one training forward
    per_layer = activation_bytes_per_token_layer(size, w.act_bytes)
    act_full = tokens * size.layers * per_layer
    # checkpointing keeps each block's input, and recomputes one block at a time in the backward
    act_ckpt = tokens * size.layers * w.act_bytes * size.hidden + tokens * per_layer
    logits = tokens * size.vocab * 4 * 2  # fp32 logits and their log-softmax / gradient
    leaves = w.local_prompts * w.K * w.M
    kv = leaves * w.tree_tokens * size.layers * 2 * size.kv_dim * 2  # bf16 K and V of every leaf row
    rows = []
    for lora in (False, True):
        for sharded in (False, True) if w.gpus > 1 else (False,):
            shard = w.gpus if sharded else 1
            if lora:  # bf16 frozen base; fp32 adapters, their gradients and AdamW moments
                weights, grads, optim, ref = 2 * P / shard + 4 * L, 4 * L, 8 * L, 0.0
            else:  # fp32 master weights, fp32 gradients, two fp32 AdamW moments
                weights, grads, optim = 4 * P / shard, 4 * P / shard, 8 * P / shard
                ref = 4 * P / shard if w.reference else 0.0
            for ckpt in (False, True):
                parts = {"weights": weights, "gradients": grads, "optimizer": optim, "reference": ref,
                         "activations": act_ckpt if ckpt else act_full, "logits": logits, "kv_cache": kv}
                total = sum(parts.values())
                rows.append({
                    "lora": lora, "sharded": sharded, "checkpointing": ckpt,
                    **{k: v / GIB for k, v in parts.items()},
                    "total": total / GIB,
                    "fits": total <= w.headroom * w.gpu_memory_gib * GIB,
                })
    return rows


# Settings from the least to the most change to a run: (lora, sharded, checkpointing).
_CHANGE_ORDER = ((False, False, False), (False, False, True), (False, True, False), (False, True, True),
                 (True, False, False), (True, False, True), (True, True, False), (True, True, True))


def verdict(rows: list[dict], lora: bool, sharded: bool, ckpt: bool) -> dict:
    """``{"fits", "row", "fix"}``: whether the requested setting's row fits, that row, and when it
    does not the first row that fits, trying the requested fine-tuning kind (full or LoRA) first
    and within it checkpointing, sharding, both (None when nothing fits)."""
    by = {(r["lora"], r["sharded"], r["checkpointing"]): r for r in rows}
    row = by.get((lora, sharded, ckpt)) or by[(lora, False, ckpt)]
    order = [k for k in _CHANGE_ORDER if k[0] == lora] + [k for k in _CHANGE_ORDER if k[0] != lora]
    fix = None if row["fits"] else next((by[k] for k in order if k in by and by[k]["fits"]), None)
    return {"fits": row["fits"], "row": row, "fix": fix}


def describe(row: dict) -> str:
    """``full fine-tune, sharded, checkpointing`` style name of a row's setting."""
    parts = ["LoRA" if row["lora"] else "full fine-tune", "sharded" if row["sharded"] else "not sharded",
             "checkpointing" if row["checkpointing"] else "no checkpointing"]
    return ", ".join(parts)


def format_plan(shape: Shape, size: ModelSize, w: Workload, rows: list[dict], v: dict) -> str:
    """The table the ``plan`` command prints, then the verdict."""
    cols = ("weights", "gradients", "optimizer", "reference", "activations", "logits", "kv_cache", "total")
    lines = [
        f"{shape.name} ({shape.hub_id}): {size.params / 1e9:.2f}B parameters, LoRA adapters {size.lora_params / 1e6:.1f}M; "
        f"{w.gpus} x {w.gpu_memory_gib:g} GiB; {w.tree_tokens} tokens per tree, {w.local_prompts} prompts per GPU",
        f"{'setting (GiB per GPU)':<46}" + "".join(f"{c:>12}" for c in cols) + "  fits",
    ]
    for r in rows:
        lines.append(f"{describe(r):<46}" + "".join(f"{r[c]:>12.2f}" for c in cols) + f"  {'yes' if r['fits'] else 'no'}")
    requested = describe(v["row"])
    if v["fits"]:
        lines.append(f"fits: {requested} needs {v['row']['total']:.1f} GiB of {w.headroom * w.gpu_memory_gib:.1f} usable per GPU")
    elif v["fix"] is not None:
        lines.append(f"does not fit: {requested} needs {v['row']['total']:.1f} GiB; {describe(v['fix'])} fits ({v['fix']['total']:.1f} GiB)")
    else:
        lines.append(f"does not fit: {requested} needs {v['row']['total']:.1f} GiB and no setting fits "
                     f"{w.headroom * w.gpu_memory_gib:.1f} GiB: more GPUs, shorter budgets or a smaller micro_batch")
    return "\n".join(lines)


def as_record(size: ModelSize, w: Workload, rows: list[dict]) -> dict:
    """Plain-data form of a plan (for JSON)."""
    return {"size": asdict(size), "workload": asdict(w), "rows": rows}
