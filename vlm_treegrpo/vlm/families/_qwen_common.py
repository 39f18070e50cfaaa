"""What Qwen2-VL, Qwen2.5-VL and Qwen3-VL share: processor call, mRoPE positions, image dedupe.

The three families process images the same way: the processor turns each image into a flat run
of patches (``pixel_values [n_patches, C*tp*p*p]``) plus one ``image_grid_thw`` row, and expands
each ``<|image_pad|>`` of the chat template into ``t*h*w / merge**2`` placeholder tokens. The LLM
uses 3-D multimodal RoPE (mRoPE): text tokens advance one position on all three axes, an image
spans its (t, h, w) grid. Subclasses differ only in classes and tiny sizes
(:meth:`QwenVLAdapter._tiny_text_config`, :meth:`QwenVLAdapter._tiny_vision_config`).

Left padding: positions come from the model's own ``get_rope_index`` with the attention mask
(padding gets 0, every row starts at 0 on its first real token), which is what ``generate``
computes for the prompt; completion tokens then continue at ``max prompt position + 1``, as
generation's ``rope_deltas`` do, so the rollout and the training forward agree.

Image dedupe (:meth:`QwenVLAdapter.encoder_outputs`, for training forwards and generation): the
K x M leaves of one prompt repeat its images; the vision tower runs once per distinct image and the per-image features are handed to
the model through its ``mm_encoder_outputs`` argument (the transformers hook for precomputed
encoder outputs), so the language model sees exactly what the plain forward computes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig

from vlm_treegrpo.models.tokenizer import MODEL_MAX_LENGTH, build_local_tokenizer
from vlm_treegrpo.rollout.kv_cache import RowState
from vlm_treegrpo.vlm.adapter import Encoded, VLMAdapter
from vlm_treegrpo.vlm.batching import concat_image_inputs, content_groups, image_key, left_pad_ids, left_pad_token_inputs

# Qwen2/2.5/3-VL special tokens besides <|endoftext|>, <|im_start|>, <|im_end|> (the base
# tokenizer's ids 0, 1, 2), in the order of the real vocabulary.
QWEN_VL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The Qwen2-VL / Qwen2.5-VL chat template as the hub checkpoints ship it (default system prompt,
# one <|vision_start|><|image_pad|><|vision_end|> per image, expanded by the processor).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL-Instruct's template without its tool-calling branch: no default system prompt,
# the same vision placeholders.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content['type'] == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Tiny sizes shared by the three families: text hidden 64 (4 heads of 16, 2 kv heads), 2 layers;
# vision patches of 8 px merged 2 x 2, so a 64 x 64 image (resized to 48 x 48) is 36 patches
# and 9 LLM tokens.
TINY_PATCH = 8
TINY_MERGE = 2
TINY_TEXT_HIDDEN = 64
TINY_MIN_PIXELS = 16 * 16
TINY_MAX_PIXELS = 48 * 48


def _vlm_core(model) -> Any:
    """The inner ``Qwen*VLModel`` (owner of ``visual`` and ``get_rope_index``), also under PEFT."""
    for module in model.modules():
        if hasattr(module, "get_rope_index") and hasattr(module, "visual"):
            return module
    raise ValueError(f"{type(model).__name__} has no Qwen-VL core model (get_rope_index + visual)")


class RopeDeltas(RowState):
    """Qwen's mRoPE offsets ``rope_deltas [B, 1]``, which the core model keeps between
    ``generate`` calls (set by the prefill, None before): the offset of a row counts from its real
    tokens, so it holds for the row's prompt + thought wherever the padding puts them."""

    def __init__(self, model):
        self.core = _vlm_core(model)

    def get(self) -> Tensor | None:
        return getattr(self.core, "rope_deltas", None)

    def set(self, state: Tensor | None) -> None:
        self.core.rope_deltas = state

    def repeat(self, n: int) -> None:
        if self.get() is not None:
            self.core.rope_deltas = self.core.rope_deltas.repeat_interleave(n, dim=0)

    def select(self, rows: list[int], n: int = 1) -> None:
        if self.get() is not None:
            keep = torch.tensor(rows, dtype=torch.long, device=self.core.rope_deltas.device)
            self.core.rope_deltas = self.core.rope_deltas.index_select(0, keep).repeat_interleave(n, dim=0)

    def decode_positions(self, attention_mask: Tensor) -> Tensor:
        """``[3, B]``: a generated token's mRoPE position is its text position plus the row's
        offset, the same on all three axes (``compute_3d_position_ids`` once the cache holds the
        prompt)."""
        text = super().decode_positions(attention_mask)  # [B]
        deltas = self.get()
        if deltas is not None:
            text = text + deltas.to(text.device).reshape(-1).repeat_interleave(text.shape[0] // deltas.shape[0])
        return text[None, :].expand(3, -1)


def _select_images(outputs, index: list[int]):
    """Re-index the per-image tuples of a ``get_image_features`` output (``pooler_output`` and,
    for Qwen3-VL, each deepstack layer) by ``index``; unsplit fields are dropped."""
    n = None if outputs.pooler_output is None else len(outputs.pooler_output)
    fields = {}
    for name, value in outputs.items():
        if isinstance(value, (tuple, list)) and len(value) == n and all(isinstance(v, Tensor) for v in value):
            fields[name] = tuple(value[i] for i in index)
        elif isinstance(value, (tuple, list)) and all(isinstance(v, (tuple, list)) and len(v) == n for v in value):
            fields[name] = [tuple(v[i] for i in index) for v in value]
    return type(outputs)(**fields)


class QwenVLAdapter(VLMAdapter):
    """Shared Qwen-VL adapter; subclasses set the classes and the tiny sub-configs."""

    config_cls: type
    model_cls: type
    processor_cls: type
    image_processor_cls: type
    video_processor_cls: type
    chat_template: str = QWEN2_VL_CHAT_TEMPLATE
    image_mean: tuple[float, float, float] | None = None
    """Tiny image processor normalization; None keeps the class default (CLIP mean/std)."""
    image_std: tuple[float, float, float] | None = None

    # ---- tiny build -------------------------------------------------------------------------

    def _tiny_text_config(self) -> dict:
        """Tiny text sub-config: head_dim 16, so 8 rotary frequencies split over (t, h, w) as
        [2, 3, 3] like the real [16, 24, 24] (Qwen2-VL, Qwen2.5-VL); Qwen3-VL overrides it."""
        return dict(
            hidden_size=TINY_TEXT_HIDDEN,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        )

    def _tiny_vision_config(self) -> dict:
        """Family-specific tiny vision sub-config."""
        raise NotImplementedError

    def tiny_tokenizer(self):
        """The offline byte-level BPE with the Qwen-VL special tokens and this family's template."""
        tokenizer = build_local_tokenizer(extra_special_tokens=QWEN_VL_SPECIAL_TOKENS)
        tokenizer.chat_template = self.chat_template
        tokenizer.padding_side = "left"
        return tokenizer

    def tiny_processor(self, tokenizer):
        """The family's real processor class over small image/video processors."""
        kwargs = dict(
            patch_size=TINY_PATCH,
            merge_size=TINY_MERGE,
            temporal_patch_size=2,
            size={"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS},
        )
        if self.image_mean is not None:
            kwargs.update(image_mean=list(self.image_mean), image_std=list(self.image_std))
        return self.processor_cls(
            image_processor=self.image_processor_cls(**kwargs),
            tokenizer=tokenizer,
            video_processor=self.video_processor_cls(**kwargs),
            chat_template=self.chat_template,
        )

    def tiny_config(self, tokenizer):
        """The small config sized to ``tokenizer``; image/video/vision ids are the tokenizer's."""
        ids = tokenizer.convert_tokens_to_ids
        text = dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=MODEL_MAX_LENGTH,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **self._tiny_text_config(),
        )
        return self.config_cls(
            text_config=text,
            vision_config=self._tiny_vision_config(),
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=True,
        )

    def build_tiny(self, seed: int = 0) -> tuple[Any, Any]:
        """``(model, processor)``: a seeded random-init fp32 model on CPU in eval mode, offline.

        The global torch RNG is seeded for the weight init and restored afterwards.
        """
        tokenizer = self.tiny_tokenizer()
        processor = self.tiny_processor(tokenizer)
        config = self.tiny_config(tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model_cls(config)
        model = model.to(torch.float32)
        model.generation_config = GenerationConfig(
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model.eval()
        return model, processor

    # ---- random weights at a released shape --------------------------------------------------

    token_fields = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }

    def standin_tokenizer(self):
        return self.tiny_tokenizer()

    def random_processor(self, tokenizer, spec: dict):
        """The family's processor with the released ``min_pixels`` / ``max_pixels`` (as the
        processor's ``size``), patch, merge and temporal patch sizes and normalisation."""
        ip = dict(spec["image_processor"])
        kwargs = dict(
            size={"shortest_edge": ip.pop("min_pixels"), "longest_edge": ip.pop("max_pixels")},
            **ip,
        )
        return self.processor_cls(
            image_processor=self.image_processor_cls(**kwargs),
            tokenizer=tokenizer,
            video_processor=self.video_processor_cls(**kwargs),
            chat_template=self.chat_template,
            **spec.get("processor", {}),
        )

    # ---- per-prompt encoding and batching ---------------------------------------------------

    def limit_pixels(self, processor, min_pixels: int, max_pixels: int) -> None:
        """Set the image processor's pixel bounds (``size.shortest_edge`` / ``longest_edge``, which
        its ``smart_resize`` keeps each image's pixel count between, in multiples of the patch grid)."""
        ip = processor.image_processor
        size = dict(ip.size)
        if min_pixels:
            size["shortest_edge"] = min_pixels
        if max_pixels:
            size["longest_edge"] = max_pixels
        if size["shortest_edge"] > size["longest_edge"]:
            raise ValueError(f"the bounds would be min {size['shortest_edge']} > max {size['longest_edge']} pixels "
                             "(the processor's own bound fills the one not set)")
        ip.size = type(ip.size)(**size)

    def messages(self, text: str, n_images: int, system: str = "") -> list[dict]:
        """One user turn: the images first, then the text (Qwen's documented layout)."""
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
        turns = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        return turns + [{"role": "user", "content": content}]

    def encode(self, processor, text: str, images: list, system: str = "") -> Encoded:
        """Render the chat template and run the processor once for this prompt."""
        images = list(images or [])
        prompt = processor.apply_chat_template(self.messages(text, len(images), system), tokenize=False, add_generation_prompt=True)
        out = processor(text=[prompt], images=images or None, return_tensors="pt")
        ids = out["input_ids"][0]  # [T]
        if "mm_token_type_ids" in out:
            mm = out["mm_token_type_ids"][0].long()  # [T] 0 text, 1 image, 2 video
        else:
            mm = (ids == processor.image_token_id).long() + 2 * (ids == processor.video_token_id).long()
        image_inputs = {k: out[k] for k in ("pixel_values", "image_grid_thw") if images}
        return Encoded(
            input_ids=ids,
            image_inputs=image_inputs,
            n_images=len(images),
            image_keys=tuple(image_key(im) for im in images),
            token_inputs={"mm_token_type_ids": mm},
        )

    def collate(self, samples: list[Encoded], pad_id: int) -> dict[str, Tensor]:
        """Left-padded ``input_ids``/``attention_mask``/``mm_token_type_ids`` ``[B, T]`` and the
        images of all samples concatenated in order (``pixel_values [P, D]``, ``image_grid_thw
        [N, 3]``). Ready for ``model(**batch)`` and ``model.generate(**batch)``, which derive the
        mRoPE positions from ``mm_token_type_ids`` and the mask (see :meth:`position_ids`)."""
        input_ids, attention_mask = left_pad_ids([s.input_ids for s in samples], pad_id)  # [B, T]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        batch.update(left_pad_token_inputs(samples))
        batch.update(concat_image_inputs(samples))
        return batch

    def vision_tower(self, model) -> torch.nn.Module:
        return _vlm_core(model).visual

    # ---- forward ----------------------------------------------------------------------------

    def position_ids(self, model, batch: dict[str, Tensor]) -> Tensor:
        """mRoPE positions ``[3, B, T]`` from the model's own ``get_rope_index`` under the mask
        (0 on padding); text-only rows and batches get 0, 1, 2, ... from their first real token."""
        input_ids = batch["input_ids"]
        mm = batch.get("mm_token_type_ids")
        if mm is None:
            mm = torch.zeros_like(input_ids)
        extra = {k: batch[k] for k in ("video_grid_thw", "second_per_grid_ts") if k in batch}
        position_ids, _ = _vlm_core(model).get_rope_index(
            input_ids,
            mm_token_type_ids=mm,
            image_grid_thw=batch.get("image_grid_thw"),
            attention_mask=batch.get("attention_mask"),
            **extra,
        )
        return position_ids  # [3, B, T]

    def row_state(self, model) -> RopeDeltas:
        """The mRoPE offsets (:class:`RopeDeltas`)."""
        return RopeDeltas(model)

    def encoder_outputs(self, model, batch: dict[str, Tensor], image_keys) -> dict | None:
        """``mm_encoder_outputs`` with each distinct image encoded once (identity from
        ``image_keys``, else from equal pixels); None when no image repeats."""
        grid = batch["image_grid_thw"]  # [N, 3]
        chunks = list(batch["pixel_values"].split(grid.prod(-1).tolist()))  # N x [n_patches, D]
        if image_keys is None:
            groups = content_groups(chunks)
        else:
            if len(image_keys) != len(chunks):
                raise ValueError(f"{len(image_keys)} image keys for {len(chunks)} images in the batch")
            first: dict = {}
            groups = [first.setdefault(key, len(first)) for key in image_keys]
        n_unique = max(groups) + 1
        if n_unique == len(chunks):
            return None
        unique = [groups.index(g) for g in range(n_unique)]  # first occurrence of each group
        features = _vlm_core(model).get_image_features(torch.cat([chunks[i] for i in unique]), grid[unique], return_dict=True)
        return {"image": _select_images(features, groups)}
