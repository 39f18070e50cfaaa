"""Real model shapes as data: ``random:<preset>`` builds a released architecture with random weights.

Each preset is one JSON file in ``shapes/`` holding a transformers config dict (``text_config``
and ``vision_config`` as the released ``config.json`` has them, or a flat text-LM config with its
``model_type``), the image processor's real limits, and a ``source`` naming the hub file it
transcribes. Nothing is downloaded: the weights are random and the tokenizer is a stand-in of the
real vocabulary size (:func:`widen_vocab`), so memory, shapes and step times are the real
model's while the text is noise.

``model.layers`` truncates depth (:func:`truncate_config`): the LLM and the vision tower keep
their first ``layers`` blocks; everything else (embeddings, widths, heads, vocabulary, patch and
merge sizes, processor limits) stays full size.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from vlm_treegrpo.config import ConfigError
from vlm_treegrpo.models.tokenizer import build_local_tokenizer

SHAPES_DIR = Path(__file__).with_name("shapes")
PREFIX = "random:"


@dataclass(frozen=True)
class Shape:
    """One released architecture, read from ``shapes/<name>.json``."""

    name: str
    """Preset name, e.g. 'qwen2.5-vl-3b' (used as ``random:<name>``)."""
    family: str | None
    """VLM family whose adapter builds it (``vlm.registry``); None for a text LM."""
    hub_id: str
    """The released checkpoint these numbers describe."""
    source: str
    """Which files the numbers transcribe and how sure they are."""
    config: dict
    """The transformers config dict (``text_config`` / ``vision_config`` for a VLM)."""
    processor: dict
    """``image_processor`` and ``processor`` keyword arguments (real resolution limits); {} for text."""

    @property
    def text_config(self) -> dict:
        """The language model's sub-config (the whole config for a text LM)."""
        return self.config.get("text_config", self.config)

    @property
    def vocab_size(self) -> int:
        return int(self.text_config["vocab_size"])


def shape_names() -> list[str]:
    """Every preset with a shape file, sorted."""
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def is_random_name(name: str) -> bool:
    """Whether ``name`` asks for a random-weight build (``random:<preset>``)."""
    return name.startswith(PREFIX)


def load_shape(name: str) -> Shape:
    """The shape of ``random:<preset>`` or ``<preset>``; ConfigError listing the valid presets."""
    preset = name[len(PREFIX):] if is_random_name(name) else name
    path = SHAPES_DIR / f"{preset}.json"
    if not path.is_file():
        raise ConfigError(f"model.name: no preset {preset!r} for random weights; valid: "
                          + ", ".join(PREFIX + n for n in shape_names()))
    d = json.loads(path.read_text())
    return Shape(d["name"], d["family"], d["hub_id"], d["source"], d["config"], d.get("processor", {}))


def shape_for(name: str) -> Shape:
    """The shape of a ``random:<preset>`` name, a preset name or the hub id a shape transcribes;
    ConfigError listing the valid presets otherwise."""
    if not is_random_name(name) and "/" in name:
        for preset in shape_names():
            shape = load_shape(preset)
            if shape.hub_id == name:
                return shape
    return load_shape(name)


def _keep_indices(indices: list[int], layers: int) -> list[int]:
    """Block indices below ``layers``; the last block when none is (so the feature survives)."""
    kept = [i for i in indices if i < layers]
    return kept or [layers - 1]


def truncate_config(config: dict, layers: int | None) -> dict:
    """A copy of ``config`` whose LLM and vision tower keep their first ``layers`` blocks
    (all of them when ``layers`` is None or 0, or deeper than the model).

    Depth lives under these keys: ``num_hidden_layers`` (text and SigLIP towers), ``depth`` (the
    Qwen ViTs); per-block lists are cut to the kept blocks: ``layer_types``; block indices are kept
    where they fall inside the kept depth (``fullatt_block_indexes``, ``deepstack_visual_indexes``),
    else the last kept block takes the role.
    """
    out = copy.deepcopy(config)
    if not layers:
        return out
    for sub in (out, out.get("text_config"), out.get("vision_config")):
        if not sub:
            continue
        for key in ("num_hidden_layers", "depth"):
            if key in sub:
                sub[key] = min(int(sub[key]), layers)
        if "layer_types" in sub:
            sub["layer_types"] = sub["layer_types"][:layers]
        for key in ("fullatt_block_indexes", "deepstack_visual_indexes"):
            if key in sub:
                sub[key] = _keep_indices(sub[key], min(layers, sub.get("depth", layers)))
    return out


def widen_vocab(tokenizer, vocab_size: int):
    """``tokenizer`` (the offline byte-level BPE, :mod:`vlm_treegrpo.models.tokenizer`) grown to
    exactly ``vocab_size`` ids, in place: the trained tokens keep their ids, filler tokens
    ``<|filler_i|>`` take the middle, and the added special tokens move to the top ids (as in the
    released vocabularies, where they follow the BPE tokens). Every id a random model samples
    decodes to text."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    base = len(vocab)
    extra = [a for a in data["added_tokens"] if a["content"] not in vocab]
    if vocab_size < base + len(extra):
        raise ConfigError(f"vocab_size {vocab_size} is smaller than the stand-in tokenizer's {base + len(extra)} tokens")
    for j, token in enumerate(extra):
        token["id"] = vocab_size - len(extra) + j
        vocab[token["content"]] = token["id"]
    for i in range(base, vocab_size - len(extra)):
        vocab[f"<|filler_{i}|>"] = i
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tokenizer


def text_config_object(shape: Shape, layers: int | None = None):
    """The transformers config object of a text-LM shape, truncated to ``layers``."""
    config = truncate_config(shape.config, layers)
    return AutoConfig.for_model(config.pop("model_type"), **config)


def build_random_text(shape: Shape, layers: int | None = None, seed: int = 0) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a text-LM shape: seeded random fp32 weights on the CPU in eval
    mode and the stand-in tokenizer of the real vocabulary size; special ids are the tokenizer's."""
    tokenizer = widen_vocab(build_local_tokenizer(), shape.vocab_size)
    config = text_config_object(shape, layers)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    model.eval()
    return model, tokenizer
