"""SmolVLM (Idefics3 architecture): SigLIP tower + pixel-shuffle connector + Llama/SmolLM2 LLM.

Each image is resized, split into square tiles of ``max_image_size`` (up to a grid) plus one
global view; every tile becomes ``image_seq_len`` ``<image>`` tokens wrapped in
``<fake_token_around_image>`` and ``<row_i_col_j>`` / ``<global-img>`` markers. A prompt's
tiles (all its images) are ``pixel_values [n_tiles, C, H, W]`` with ``pixel_attention_mask
[n_tiles, H, W]``; a batch stacks them per row as ``[B, max_tiles, C, H, W]``, padded with
all-zero tiles, which the model drops (text-only rows are all padding).

SmolVLM-256M/500M-Instruct are ``Idefics3ForConditionalGeneration`` checkpoints and the tiny
build uses the Idefics3 classes; SmolVLM2 uses the ``SmolVLM*`` classes (same model code, its
processor needs the ``num2words`` package), which this adapter batches the same way.

Image dedupe works per distinct *tile stack of a row* (all images of one prompt): the tiles of
one image cannot be told apart from the next in the batch, so ``image_keys`` are not used; equal
pixel tensors are. That covers the K x M leaves of one prompt, the case that matters.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor, LlamaConfig
from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

from vlm_treegrpo.vlm.adapter import Encoded, Preset
from vlm_treegrpo.vlm.batching import content_groups
from vlm_treegrpo.vlm.families._siglip_common import (
    TINY_MAX_LENGTH,
    TINY_TEXT_HIDDEN,
    SiglipFamilyAdapter,
    first_occurrence_groups,
    named_tokenizer,
    pooled_features,
    tiny_siglip,
)

# HuggingFaceTB/SmolVLM-*-Instruct chat template.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

SMOLVLM_SPECIAL_TOKENS = (
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)

# Tiny sizes: images resized to a 64 px longest edge, cut into 32 px tiles (<= 2 x 2 + global);
# 8 px patches (16 per tile) pixel-shuffled 2 x 2 into 4 tokens per tile.
TINY_LONGEST_EDGE = 64
TINY_TILE = 32
TINY_PATCH = 8
TINY_SCALE = 2

_NOTES = (
    "bf16 weights ~{w} GB; full fine-tune with AdamW ~{full} GB before activations. Each image is "
    "up to {tiles} tiles x {tok} tokens (split grid + global view): lower the processor's "
    "size['longest_edge'] (or do_image_splitting=False) to bound sequence length."
)


def _pad_tiles(t: Tensor, n: int, h: int, w: int) -> Tensor:
    """Zero-pad a ``[n_tiles, ..., H, W]`` stack to ``[n, ..., h, w]`` (padding tiles are all 0)."""
    out = t.new_zeros((n, *t.shape[1:-2], h, w))
    out[: t.shape[0], ..., : t.shape[-2], : t.shape[-1]] = t
    return out


class SmolVLMAdapter(SiglipFamilyAdapter):
    family = "smolvlm"
    presets = (
        Preset("smolvlm-256m", "HuggingFaceTB/SmolVLM-256M-Instruct", "256M", notes=_NOTES.format(w=0.5, full=4, tiles=17, tok=64)),
        Preset("smolvlm-500m", "HuggingFaceTB/SmolVLM-500M-Instruct", "500M", notes=_NOTES.format(w=1.0, full=8, tiles=17, tok=64)),
        Preset(
            "smolvlm2-2.2b",
            "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
            "2.2B",
            notes=_NOTES.format(w=4.5, full=36, tiles=17, tok=81) + " SmolVLMProcessor needs `pip install num2words`.",
        ),
    )
    model_cls = Idefics3ForConditionalGeneration
    config_cls = Idefics3Config
    token_fields = {"image_token_id": "<image>", "pad_token_id": "<|im_end|>"}
    image_input_names = ("pixel_values", "pixel_attention_mask")
    core_vision_attr = "vision_model"

    def tiny_parts(self):
        tokenizer = named_tokenizer(
            SMOLVLM_SPECIAL_TOKENS,
            bos="<|im_start|>",
            eos="<end_of_utterance>",
            pad="<|im_end|>",
            chat_template=SMOLVLM_CHAT_TEMPLATE,
        )
        image_seq_len = (TINY_TILE // TINY_PATCH) ** 2 // TINY_SCALE**2
        processor = Idefics3Processor(
            image_processor=Idefics3ImageProcessor(
                size={"longest_edge": TINY_LONGEST_EDGE}, max_image_size={"longest_edge": TINY_TILE}, do_image_splitting=True
            ),
            tokenizer=tokenizer,
            image_seq_len=image_seq_len,
            chat_template=SMOLVLM_CHAT_TEMPLATE,
        )
        text = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=TINY_TEXT_HIDDEN,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=TINY_MAX_LENGTH,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        config = Idefics3Config(
            text_config=text,
            vision_config=Idefics3VisionConfig(**tiny_siglip(TINY_TILE, TINY_PATCH)),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            scale_factor=TINY_SCALE,
            pad_token_id=tokenizer.pad_token_id,
        )
        return config, processor, [tokenizer.eos_token_id]

    def random_processor(self, tokenizer, spec: dict):
        """Idefics3's processor with the released tile size, longest edge and tokens per tile."""
        return Idefics3Processor(
            image_processor=Idefics3ImageProcessor(**spec["image_processor"]),
            tokenizer=tokenizer,
            chat_template=SMOLVLM_CHAT_TEMPLATE,
            **spec.get("processor", {}),
        )

    def sample_image_inputs(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            "pixel_values": out["pixel_values"][0],  # [n_tiles, C, H, W]
            "pixel_attention_mask": out["pixel_attention_mask"][0],  # [n_tiles, H, W]
        }

    def collate_images(self, samples: list[Encoded]) -> dict[str, Tensor]:
        """``pixel_values [B, max_tiles, C, H, W]`` and ``pixel_attention_mask [B, max_tiles, H, W]``,
        zero tiles as padding (text-only rows are all padding); ``{}`` for an all-text batch."""
        with_images = [s for s in samples if s.n_images]
        if not with_images:
            return {}
        stacks = [s.image_inputs["pixel_values"] for s in with_images]
        n = max(p.shape[0] for p in stacks)
        h = max(p.shape[-2] for p in stacks)
        w = max(p.shape[-1] for p in stacks)
        ref_pix, ref_mask = stacks[0], with_images[0].image_inputs["pixel_attention_mask"]
        pixels, masks = [], []
        for s in samples:
            if s.n_images:
                pixels.append(_pad_tiles(s.image_inputs["pixel_values"], n, h, w))
                masks.append(_pad_tiles(s.image_inputs["pixel_attention_mask"], n, h, w))
            else:
                pixels.append(ref_pix.new_zeros((n, *ref_pix.shape[1:-2], h, w)))
                masks.append(ref_mask.new_zeros((n, h, w)))
        return {"pixel_values": torch.stack(pixels), "pixel_attention_mask": torch.stack(masks)}

    def encoder_outputs(self, model, batch: dict[str, Tensor], image_keys) -> dict | None:
        pixels, masks = batch["pixel_values"], batch.get("pixel_attention_mask")  # [B, N, C, H, W], [B, N, H, W]
        rows = [r for r in range(len(pixels)) if bool(pixels[r].ne(0).any())]  # rows that have images
        groups, unique = first_occurrence_groups(content_groups([pixels[r] for r in rows]))
        if len(unique) == len(rows):
            return None
        first = [rows[i] for i in unique]
        features = self.core(model).get_image_features(
            pixels[first], None if masks is None else masks[first], return_dict=True
        ).pooler_output  # one [n_tokens_row, D] per unique row
        return pooled_features([features[g] for g in groups])
