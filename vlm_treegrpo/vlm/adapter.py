"""What differs between VLM families, behind one small interface.

The rollout and the trainer call only these methods; they never test ``model_type``. One
subclass per family lives in :mod:`vlm_treegrpo.vlm.families`, registered in
:data:`vlm_treegrpo.vlm.registry.ADAPTERS` by family name.

Per-sample tensors: :meth:`VLMAdapter.encode` runs the processor ONCE per prompt and returns
an unpadded :class:`Encoded` whose image tensors belong to that prompt only, so that K x M
branches, shuffles and micro-batches are built by repeating / selecting samples, never by
re-running the processor. :meth:`VLMAdapter.collate` left-pads a list of them into a batch.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Preset:
    """A real-size checkpoint users train."""

    name: str
    """Short preset name, e.g. 'qwen2.5-vl-3b'."""
    hub_id: str
    """Hugging Face hub id."""
    params: str
    """Parameter count, e.g. '3B'."""
    dtype: str = "bfloat16"
    """Recommended dtype."""
    attn_implementation: str = "flash_attention_2"
    """Recommended attention kernel on GPU."""
    notes: str = ""
    """Memory / usage notes."""


@dataclass
class Encoded:
    """One prompt after the processor: unpadded ids plus its own image tensors."""

    input_ids: Tensor  # [T] long
    image_inputs: dict[str, Tensor] = field(default_factory=dict)
    """Family-specific image tensors of THIS sample only (pixel_values, image_grid_thw, ...)."""
    n_images: int = 0
    """Images in this prompt (0 for text-only)."""
    image_keys: tuple = ()
    """Identity of each image (e.g. a hash of its pixels) so a batch can encode each once."""


class VLMAdapter(ABC):
    """Family-specific glue. Subclasses are small: processor call, image bookkeeping, positions."""

    family: str = ""
    """Family name, e.g. 'qwen2-vl'."""
    presets: tuple[Preset, ...] = ()
    """Real-size checkpoints of this family."""

    @abstractmethod
    def build_tiny(self, seed: int = 0) -> tuple[Any, Any]:
        """A random-init tiny model of this family and its real processor class, built offline."""

    def load(self, name_or_path: str, dtype: torch.dtype, attn_implementation: str, device: str) -> tuple[Any, Any]:
        """A real checkpoint from the hub or a local directory (needs network for hub ids)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn_implementation)
        processor = AutoProcessor.from_pretrained(name_or_path)
        processor.tokenizer.padding_side = "left"
        return model.to(device), processor

    @abstractmethod
    def encode(self, processor, text: str, images: list) -> Encoded:
        """Chat-format one user turn (text plus images) with the family's template and process it."""

    @abstractmethod
    def collate(self, samples: list[Encoded], pad_id: int) -> dict[str, Tensor]:
        """Left-pad samples into model kwargs (input_ids, attention_mask, image tensors, and
        position_ids where the family needs them, e.g. Qwen's 3-D mRoPE)."""

    @abstractmethod
    def vision_tower(self, model) -> torch.nn.Module:
        """The module that encodes pixels (used to count/cached image encodings)."""
