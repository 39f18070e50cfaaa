"""Family name -> adapter, and model name -> family, at the config boundary only.

A model name reaches a VLM family in one of three ways: a tiny built-in (``tiny-<family>``,
random init, offline), a preset of a family adapter (its short name or its hub id), or a local
directory / hub id whose config has a ``vision_config`` (family from ``config.model_type``
through :data:`MODEL_TYPE_FAMILIES`). Modules import lazily.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from vlm_treegrpo.vlm.adapter import Preset, VLMAdapter

_FAMILY_MODULES = {
    "qwen2-vl": "vlm_treegrpo.vlm.families.qwen2_vl:Qwen2VLAdapter",
    "qwen2.5-vl": "vlm_treegrpo.vlm.families.qwen2_5_vl:Qwen25VLAdapter",
    "qwen3-vl": "vlm_treegrpo.vlm.families.qwen3_vl:Qwen3VLAdapter",
    "smolvlm": "vlm_treegrpo.vlm.families.smolvlm:SmolVLMAdapter",
    "llava-onevision": "vlm_treegrpo.vlm.families.llava_onevision:LlavaOneVisionAdapter",
    "gemma3": "vlm_treegrpo.vlm.families.gemma3:Gemma3Adapter",
}
FAMILIES = tuple(_FAMILY_MODULES)

MODEL_TYPE_FAMILIES: dict[str, str] = {
    "qwen2_vl": "qwen2-vl",
    "qwen2_5_vl": "qwen2.5-vl",
    "qwen3_vl": "qwen3-vl",
    "idefics3": "smolvlm",
    "smolvlm": "smolvlm",
    "llava_onevision": "llava-onevision",
    "gemma3": "gemma3",
}
"""``config.model_type`` of a checkpoint -> the family whose adapter serves it."""

TINY_NAMES: dict[str, str] = {f"tiny-{family}": family for family in FAMILIES}
"""Built-in tiny random-init VLMs (``adapter.build_tiny``) by name."""

TINY_PARAMS: dict[str, str] = {
    "qwen2-vl": "0.18M",
    "qwen2.5-vl": "0.18M",
    "qwen3-vl": "0.21M",
    "smolvlm": "0.20M",
    "llava-onevision": "0.19M",
    "gemma3": "0.14M",
}
"""Parameter count of each tiny build (checked by the tests)."""


ALIGNED_NAME = "smolvlm-smollm2"
"""The SmolVLM-architecture model on the real SmolLM2 (:mod:`vlm_treegrpo.models.smolvlm_smollm2`)."""


def get_adapter(family: str) -> VLMAdapter:
    """The adapter instance for a family name (ValueError naming the known families)."""
    if family not in _FAMILY_MODULES:
        raise ValueError(f"unknown VLM family {family!r}; known: {list(FAMILIES)}")
    module, cls = _FAMILY_MODULES[family].split(":")
    return getattr(importlib.import_module(module), cls)()


def presets() -> dict[str, tuple[str, Preset]]:
    """Every family's presets as ``name -> (family, preset)``, under both the short name and the hub id."""
    out: dict[str, tuple[str, Preset]] = {}
    for family in FAMILIES:
        for preset in get_adapter(family).presets:
            out[preset.name] = out[preset.hub_id] = (family, preset)
    return out


def family_of_config(config: dict) -> str | None:
    """The family of a checkpoint config (as a dict); None for a model without ``vision_config``.

    Raises ValueError for a vision model of a type no adapter serves.
    """
    if not config.get("vision_config"):
        return None
    model_type = config.get("model_type", "")
    if model_type not in MODEL_TYPE_FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} has a vision_config but no VLM adapter; supported: {sorted(MODEL_TYPE_FAMILIES)}"
        )
    return MODEL_TYPE_FAMILIES[model_type]


def _checkpoint_config(name: str) -> dict | None:
    """``config.json`` of a local directory, else of a hub id (None when it cannot be read)."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        file = path / "config.json"
        return json.loads(file.read_text()) if file.exists() else None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name).to_dict()
    except (OSError, ValueError):  # not a reachable hub id: the text loader reports it in one line
        return None


def checkpoint_family(name: str) -> str | None:
    """The VLM family of a local directory or hub id from its config (``vision_config`` and
    ``model_type``); None for a text model or a name whose config cannot be read."""
    config = _checkpoint_config(name)
    return None if config is None else family_of_config(config)


def vlm_builtins() -> list[dict[str, str]]:
    """Tiny VLMs, ``smolvlm-smollm2`` and presets as ``{"name", "family", "params", "source"}`` rows (for ``presets``)."""
    rows = [
        {"name": name, "family": family, "params": TINY_PARAMS[family],
         "source": "random init (seeded), offline tokenizer + the family's real processor class; for tests and smoke runs"}
        for name, family in TINY_NAMES.items()
    ]
    rows.append({"name": ALIGNED_NAME, "family": "smolvlm", "params": "136M",
                 "source": "SmolLM2-135M-Instruct (pretrained) behind a SigLIP encoder + connector aligned here "
                           "(`vlm-treegrpo prepare smolvlm-smollm2`, cached)"})
    for family in FAMILIES:
        for p in get_adapter(family).presets:
            rows.append({"name": p.name, "family": family, "params": p.params, "source": f"hub {p.hub_id} ({p.dtype}, {p.attn_implementation})"})
    return rows
