"""Model name -> policy, at the config boundary: built-ins, tiny VLMs, presets, local
directories and hub ids, training checkpoints; and the policy ``model.*`` describes (LoRA
adapters, activation checkpointing)."""
from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from vlm_treegrpo.config import ConfigError, ModelConfig, config_from_dict
from vlm_treegrpo.models.loader import BUILTINS, load_policy, pick_dtype
from vlm_treegrpo.models.shapes import PREFIX, build_random_text, is_random_name, load_shape, shape_names
from vlm_treegrpo.policy.base import Policy, PolicyBuilder
from vlm_treegrpo.policy.text import TextPolicy
from vlm_treegrpo.policy.vlm import VLMPolicy, load_vlm_policy, random_vlm_policy, tiny_vlm_policy
from vlm_treegrpo.rollout.attention import enable_activation_checkpointing
from vlm_treegrpo.train.align import ALIGNED_VLM, aligned_vlm_policy
from vlm_treegrpo.train.checkpoint import is_checkpoint, load_params, read_meta, saved_config
from vlm_treegrpo.vlm.registry import TINY_NAMES, checkpoint_family, get_adapter, presets


def _text_policy(name: str, device, dtype: str, attn_implementation: str) -> TextPolicy:
    model, tokenizer = load_policy(name, device=str(device), dtype=dtype, attn_implementation=attn_implementation)
    return TextPolicy(model, tokenizer)


def random_policy(preset: str, device, dtype: str = "auto", attn_implementation: str = "auto", layers: int | None = None) -> Policy:
    """``random:<preset>``: the released architecture of ``preset`` (:mod:`vlm_treegrpo.models.shapes`)
    with seeded random weights and a stand-in tokenizer of the real vocabulary size, depth cut to
    ``layers``; a VLM through its family adapter's ``build_random``, a text LM otherwise."""
    shape = load_shape(preset)
    if shape.family is not None:
        return random_vlm_policy(get_adapter(shape.family), shape, device, dtype, attn_implementation, layers)
    model, tokenizer = build_random_text(shape, layers)
    model = model.to(device=device, dtype=pick_dtype(device, dtype))
    if attn_implementation != "auto":
        model.set_attn_implementation(attn_implementation)
    tokenizer.padding_side = "left"
    return TextPolicy(model, tokenizer)


def named_policies() -> dict[str, PolicyBuilder]:
    """Every model known by name: the text built-ins, the tiny VLMs (``tiny-<family>``), the
    VLM presets (short name and hub id), the random-weight builds of the shape presets
    (``random:<preset>``) and ``smolvlm-smollm2`` (aligned on first use)."""
    out: dict[str, PolicyBuilder] = {name: partial(_text_policy, name) for name in BUILTINS}
    out.update({name: partial(tiny_vlm_policy, family) for name, family in TINY_NAMES.items()})
    out.update({name: partial(load_vlm_policy, family, p.hub_id) for name, (family, p) in presets().items()})
    out.update({PREFIX + name: partial(random_policy, name) for name in shape_names()})
    out[ALIGNED_VLM] = aligned_vlm_policy
    return out


def make_policy(name: str, device: torch.device | str, dtype: str = "auto", attn_implementation: str = "auto",
                layers: int | None = None) -> Policy:
    """The policy for a model name. The config boundary: a known name (:func:`named_policies`),
    a training checkpoint directory (:func:`load_checkpoint_policy`), else a local
    directory or hub id, a :class:`~vlm_treegrpo.policy.vlm.VLMPolicy` when its config has a
    ``vision_config`` (family from ``model_type``), a :class:`TextPolicy` otherwise.
    ``layers`` cuts the depth of a ``random:<preset>`` build; an unknown preset lists the valid ones."""
    if is_random_name(name):
        return random_policy(name, device, dtype, attn_implementation, layers)
    if layers:
        raise ConfigError(f"model.layers: only applies to random:<preset> names, got {name!r}")
    if is_checkpoint(name):
        return load_checkpoint_policy(name, device, dtype, attn_implementation)
    build = named_policies().get(name)
    if build is None:
        family = checkpoint_family(name)
        build = partial(_text_policy, name) if family is None else partial(load_vlm_policy, family, name)
    return build(device, dtype, attn_implementation)


def lora_config(r: int, alpha: float, targets: list[str]):
    """The peft ``LoraConfig`` of ``model.lora_r / lora_alpha / lora_targets`` (no dropout)."""
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)


def apply_lora(model, r: int, alpha: float, targets: list[str]):
    """Wrap the policy with LoRA adapters (peft); only the adapters train."""
    return get_peft_model(model, lora_config(r, alpha, targets))


def vision_tower_prefix(policy: Policy) -> str | None:
    """The module name of a VLM policy's vision tower (its family adapter says which module that
    is); None for a text policy."""
    if not isinstance(policy, VLMPolicy):
        return None
    tower = policy.adapter.vision_tower(policy.model)
    return next(name for name, module in policy.model.named_modules() if module is tower)


def lora_target_names(model, targets: list[str], skip_prefix: str | None) -> list[str]:
    """Full names of the modules LoRA adapts: those whose last name part is in ``targets``,
    outside ``skip_prefix`` (the vision tower, unless ``model.lora_vision``)."""
    wanted = set(targets)
    return [name for name, _ in model.named_modules()
            if name.rsplit(".", 1)[-1] in wanted and not (skip_prefix and (name == skip_prefix or name.startswith(skip_prefix + ".")))]


def build_policy(m: ModelConfig, device, dtype: str, attn_implementation: str) -> Policy:
    """The policy ``model.*`` describes, in ``dtype``: LoRA adapters when ``lora_r`` > 0 (on
    ``lora_targets``, the vision tower's left alone unless ``lora_vision``), and activation
    checkpointing when ``gradient_checkpointing`` is on."""
    policy = make_policy(m.name, device, dtype, attn_implementation, m.layers or None)
    if m.lora_r > 0:
        names = lora_target_names(policy.model, m.lora_targets, None if m.lora_vision else vision_tower_prefix(policy))
        if not names:
            raise ConfigError(f"model.lora_targets: no module of {m.name} is named any of {m.lora_targets}"
                              + ("" if m.lora_vision else " outside its vision tower"))
        policy.model = apply_lora(policy.model, m.lora_r, m.lora_alpha, names)
    if m.gradient_checkpointing:
        enable_activation_checkpointing(policy.model)
    return policy


def limit_pixels(policy: Policy, min_pixels: int, max_pixels: int, model_name: str) -> None:
    """``data.min_pixels`` / ``data.max_pixels`` (0 = the processor's own) applied to ``policy``'s
    processor; ConfigError naming the field where the model cannot take them."""
    if not (min_pixels or max_pixels):
        return
    try:
        policy.limit_pixels(min_pixels, max_pixels)
    except ValueError as e:
        raise ConfigError(f"data.{'max' if max_pixels else 'min'}_pixels: model {model_name}: {e}") from e


def checkpoint_config(path) -> dict:
    """The config a training checkpoint was written with, as this version reads it
    (:func:`~vlm_treegrpo.train.checkpoint.saved_config`)."""
    return saved_config(read_meta(Path(path))["config"])


def load_checkpoint_policy(path, device, dtype: str = "auto", attn_implementation: str = "auto", merge: bool = True) -> Policy:
    """The policy a training checkpoint holds: its config's base model with the trained weights
    (LoRA adapters merged in unless ``merge`` is false). What ``model.name=<run>/checkpoint`` and
    ``vlm-treegrpo eval --model <run>/checkpoint`` load; ``vlm-treegrpo export`` writes it out
    (:mod:`vlm_treegrpo.train.export`)."""
    path = Path(path)
    m = dataclasses.replace(config_from_dict(checkpoint_config(path)).model, gradient_checkpointing=False)
    policy = build_policy(m, device, dtype, attn_implementation)
    load_params(policy.model, torch.load(path / "model.pt", map_location="cpu", weights_only=True), path / "model.pt")
    if m.lora_r > 0 and merge:
        policy.model = policy.model.merge_and_unload()
    policy.model.eval()
    return policy
