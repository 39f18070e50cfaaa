"""What SmolVLM (Idefics3), LLaVA-OneVision and Gemma3 share: a SigLIP-style vision tower whose
features replace placeholder tokens in a 1-D-RoPE LLM.

* **Tiny builds**: :func:`named_tokenizer` wraps the offline byte-level BPE of
  :mod:`vlm_treegrpo.models.tokenizer` with the family's special tokens (named ones such as
  Gemma3's ``boi_token`` become tokenizer attributes, as the hub tokenizers declare them);
  :func:`tiny_siglip` is the small SigLIP vision sub-config all three use.
* **Encoding**: :meth:`SiglipFamilyAdapter.encode` renders one user turn (images first, then the
  text) with the family's chat template and runs the processor ONCE on it, with the images of the
  prompt passed as one nested list so multi-image prompts are processed as such (LLaVA-OV
  encodes an image of a multi-image prompt differently from a lone image).
* **Positions**: all three use 1-D RoPE, so positions are ``cumsum(mask) - 1`` (0 on padding),
  exactly what ``generate`` derives from the attention mask under left padding.
* **Image dedupe** (each family's ``encoder_outputs``, for training forwards and generation) runs
  the vision tower once per distinct image (or per distinct image set, for SmolVLM) and hands the features to the model via
  its ``mm_encoder_outputs`` argument, so the language model sees what the plain forward computes.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedTokenizerFast
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlm_treegrpo.models.tokenizer import UNK_TOKEN, build_local_tokenizer
from vlm_treegrpo.vlm.adapter import Encoded, VLMAdapter
from vlm_treegrpo.vlm.batching import image_key, left_pad_ids, left_pad_token_inputs

TINY_TEXT_HIDDEN = 64
TINY_MAX_LENGTH = 4096


def named_tokenizer(
    special_tokens: Sequence[str],
    *,
    bos: str | None,
    eos: str,
    pad: str,
    chat_template: str,
    **named: str,
) -> PreTrainedTokenizerFast:
    """The offline BPE with ``special_tokens`` appended (in order) and the family's bos/eos/pad.

    ``named`` are model-specific named tokens (e.g. ``boi_token='<start_of_image>'``) exposed as
    ``tokenizer.boi_token`` / ``tokenizer.boi_token_id`` like the hub tokenizers do. No bos is
    added when encoding; chat templates that need one write it themselves.
    """
    base = build_local_tokenizer(extra_special_tokens=special_tokens)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        unk_token=UNK_TOKEN,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens=list(special_tokens),
        chat_template=chat_template,
        model_max_length=TINY_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        **named,
    )
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_siglip(image_size: int, patch_size: int, **extra) -> dict:
    """A 1-layer, 32-wide SigLIP vision sub-config (``image_size / patch_size`` squared patches)."""
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        **extra,
    )


def first_occurrence_groups(keys: Sequence) -> tuple[list[int], list[int]]:
    """``(groups, unique)``: a group id per key (ids in order of first appearance) and, per group,
    the index of its first occurrence."""
    first: dict = {}
    groups: list[int] = []
    unique: list[int] = []
    for i, key in enumerate(keys):
        if key not in first:
            first[key] = len(unique)
            unique.append(i)
        groups.append(first[key])
    return groups, unique


def pooled_features(features) -> dict:
    """``mm_encoder_outputs`` for the model's forward: precomputed pooled image features."""
    return {"image": BaseModelOutputWithPooling(pooler_output=features)}


class SiglipFamilyAdapter(VLMAdapter):
    """Shared adapter; subclasses set the classes, the tiny build and the image tensors."""

    model_cls: type
    """The ``*ForConditionalGeneration`` class the tiny build instantiates."""
    image_input_names: tuple[str, ...] = ()
    """Keys of the processor output that belong to the prompt's images (kept per sample)."""
    core_vision_attr: str = "vision_tower"
    """Attribute of the inner model that holds the vision encoder."""

    # ---- tiny build -------------------------------------------------------------------------

    def tiny_parts(self) -> tuple[Any, Any, list[int]]:
        """``(config, processor, eos_ids)`` of the tiny build, built offline."""
        raise NotImplementedError

    def _post_init_tiny(self, model) -> None:
        """Re-initialise weights the family's ``_init_weights`` zeroes (random models only)."""

    def build_tiny(self, seed: int = 0) -> tuple[Any, Any]:
        """``(model, processor)``: a seeded random-init fp32 model on CPU in eval mode, offline.

        The global torch RNG is seeded for the weight init and restored afterwards.
        """
        config, processor, eos_ids = self.tiny_parts()
        tokenizer = processor.tokenizer
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model_cls(config)
            self._post_init_tiny(model)
        model = model.to(torch.float32)
        model.generation_config = GenerationConfig(
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        )
        model.eval()
        return model, processor

    # ---- random weights at a released shape (processor: each family's ``random_processor``) ----

    def standin_tokenizer(self):
        return self.tiny_parts()[1].tokenizer

    def stop_ids(self, tokenizer) -> list[int]:
        """The tiny build's stop tokens (the same strings, looked up in ``tokenizer``)."""
        _, processor, eos_ids = self.tiny_parts()
        return [tokenizer.convert_tokens_to_ids(processor.tokenizer.convert_ids_to_tokens(i)) for i in eos_ids]

    def post_init_random(self, model) -> None:
        self._post_init_tiny(model)

    # ---- per-prompt encoding and batching ---------------------------------------------------

    def messages(self, text: str, n_images: int, system: str = "") -> list[dict]:
        """One user turn: the images first, then the text."""
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
        turns = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        return turns + [{"role": "user", "content": content}]

    def process(self, processor, text: str, images: list, system: str = "") -> dict[str, Tensor]:
        """Render the chat template and run the processor once on this prompt (batch of 1)."""
        prompt = processor.apply_chat_template(self.messages(text, len(images), system), tokenize=False, add_generation_prompt=True)
        return processor(text=[prompt], images=[images] if images else None, return_tensors="pt", add_special_tokens=False)

    def encode(self, processor, text: str, images: list, system: str = "") -> Encoded:
        images = list(images or [])
        out = self.process(processor, text, images, system)
        return Encoded(
            input_ids=out["input_ids"][0],  # [T]
            image_inputs=self.sample_image_inputs(out) if images else {},
            n_images=len(images),
            image_keys=tuple(image_key(im) for im in images),
            token_inputs=self.sample_token_inputs(out),
        )

    def sample_image_inputs(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """This prompt's image tensors from the processor output (batch of 1)."""
        return {k: out[k] for k in self.image_input_names}

    def sample_token_inputs(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-token extras ``[T]`` of this prompt (none by default)."""
        return {}

    def collate_images(self, samples: list[Encoded]) -> dict[str, Tensor]:
        """The batch's image tensors; ``{}`` when no sample has an image."""
        raise NotImplementedError

    def collate(self, samples: list[Encoded], pad_id: int) -> dict[str, Tensor]:
        """Left-padded ``input_ids``/``attention_mask`` ``[B, T]`` (plus per-token extras) and the
        batch's image tensors; ready for ``model(**batch)`` and ``model.generate(**batch)``."""
        input_ids, attention_mask = left_pad_ids([s.input_ids for s in samples], pad_id)  # [B, T]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        batch.update(left_pad_token_inputs(samples))
        batch.update(self.collate_images(samples))
        return batch

    def core(self, model) -> Any:
        """The inner multimodal model (owner of the vision tower), also under PEFT wrappers."""
        for module in model.modules():
            if hasattr(module, self.core_vision_attr) and hasattr(module, "get_image_features") and not hasattr(module, "lm_head"):
                return module
        raise ValueError(f"{type(model).__name__} has no {self.core_vision_attr!r} core model")

    def vision_tower(self, model) -> torch.nn.Module:
        return getattr(self.core(model), self.core_vision_attr)

    # ---- forward ----------------------------------------------------------------------------

    def position_ids(self, model, batch: dict[str, Tensor]) -> Tensor:
        """``cumsum(mask) - 1``, 0 on padding ``[B, T]``: what ``generate`` uses under left padding."""
        mask = batch["attention_mask"].long()
        return (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]

