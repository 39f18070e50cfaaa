"""Gemma3: SigLIP tower, 4 x 4 average-pooled to a fixed 256 soft tokens per image, + Gemma3 LLM.

The processor expands each ``<start_of_image>`` of the chat template into
``\\n\\n<start_of_image>`` + ``<image_soft_token>`` x ``mm_tokens_per_image`` + ``<end_of_image>\\n\\n``
and returns ``token_type_ids`` (1 on soft tokens): the LLM attends bidirectionally inside each
image's block. They are a per-token extra here (``Encoded.token_inputs``), left-padded with 0 so
they stay aligned with ``input_ids``; completion tokens get 0.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    SiglipVisionConfig,
)

from vlm_treegrpo.vlm.adapter import Encoded, Preset
from vlm_treegrpo.vlm.batching import concat_image_inputs, content_groups
from vlm_treegrpo.vlm.families._siglip_common import (
    TINY_MAX_LENGTH,
    TINY_TEXT_HIDDEN,
    SiglipFamilyAdapter,
    first_occurrence_groups,
    named_tokenizer,
    pooled_features,
    tiny_siglip,
)

# google/gemma-3-*-it chat template as the hub checkpoints ship it.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

GEMMA3_SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)

# Tiny sizes: 16 px images in 4 px patches (16 patches) pooled 2 x 2 to 4 soft tokens.
TINY_IMAGE = 16
TINY_PATCH = 4
TINY_TOKENS_PER_IMAGE = 4

_NOTES = (
    "bf16 weights ~{w} GB; full fine-tune with AdamW ~{full} GB before activations, LoRA ~{lora} GB. "
    "Every image is 896 px -> 256 soft tokens (pan-and-scan off). Flash-attention is not supported "
    "(it drops the bidirectional mask over image tokens): use sdpa, or eager. 262k vocabulary: "
    "[B, T, V] fp32 logits are large, compute log-probs in chunks. Gated on the hub (accept the licence)."
)


class Gemma3Adapter(SiglipFamilyAdapter):
    family = "gemma3"
    presets = (
        Preset("gemma3-4b", "google/gemma-3-4b-it", "4B", attn_implementation="sdpa", notes=_NOTES.format(w=8.6, full=70, lora=12)),
        Preset("gemma3-12b", "google/gemma-3-12b-it", "12B", attn_implementation="sdpa", notes=_NOTES.format(w=24.4, full=195, lora=30)),
    )
    model_cls = Gemma3ForConditionalGeneration
    config_cls = Gemma3Config
    token_fields = {"boi_token_index": "<start_of_image>", "eoi_token_index": "<end_of_image>", "image_token_index": "<image_soft_token>"}
    image_input_names = ("pixel_values",)
    flash_attention = False
    tree_packing = False  # its forward builds the bidirectional image-block mask itself

    def tiny_parts(self):
        tokenizer = named_tokenizer(
            GEMMA3_SPECIAL_TOKENS,
            bos="<bos>",
            eos="<eos>",
            pad="<pad>",
            chat_template=GEMMA3_CHAT_TEMPLATE,
            boi_token="<start_of_image>",
            eoi_token="<end_of_image>",
            image_token="<image_soft_token>",
        )
        processor = Gemma3Processor(
            image_processor=Gemma3ImageProcessor(size={"height": TINY_IMAGE, "width": TINY_IMAGE}),
            tokenizer=tokenizer,
            chat_template=GEMMA3_CHAT_TEMPLATE,
            image_seq_length=TINY_TOKENS_PER_IMAGE,
        )
        text = Gemma3TextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TINY_TEXT_HIDDEN,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            # One local (sliding) and one global layer, as in the real 5:1 pattern.
            sliding_window=32,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=TINY_MAX_LENGTH,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        config = Gemma3Config(
            text_config=text,
            vision_config=SiglipVisionConfig(**tiny_siglip(TINY_IMAGE, TINY_PATCH, vision_use_head=False)),
            mm_tokens_per_image=TINY_TOKENS_PER_IMAGE,
            boi_token_index=tokenizer.boi_token_id,
            eoi_token_index=tokenizer.eoi_token_id,
            image_token_index=tokenizer.image_token_id,
        )
        eos_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
        return config, processor, eos_ids

    def random_processor(self, tokenizer, spec: dict):
        """Gemma3's processor with the released 896 px view and 256 soft tokens per image."""
        return Gemma3Processor(
            image_processor=Gemma3ImageProcessor(**spec["image_processor"]),
            tokenizer=tokenizer,
            chat_template=GEMMA3_CHAT_TEMPLATE,
            **spec.get("processor", {}),
        )

    def _post_init_tiny(self, model) -> None:
        # Gemma3 zero-initialises the image projection (it is always loaded from a checkpoint);
        # a random model needs it non-zero or images would not reach the LLM at all.
        torch.nn.init.normal_(self.core(model).multi_modal_projector.mm_input_projection_weight, std=0.05)

    def sample_token_inputs(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"token_type_ids": out["token_type_ids"][0].long()}  # [T] 1 on image soft tokens

    def collate_images(self, samples: list[Encoded]) -> dict[str, Tensor]:
        """``pixel_values [N, C, H, W]``: every image of the batch, in order."""
        return concat_image_inputs(samples)

    def encoder_outputs(self, model, batch: dict[str, Tensor], image_keys) -> dict | None:
        pixels = batch["pixel_values"]  # [N, C, H, W]
        keys = content_groups(list(pixels)) if image_keys is None else list(image_keys)
        if len(keys) != len(pixels):
            raise ValueError(f"{len(keys)} image keys for {len(pixels)} images in the batch")
        groups, unique = first_occurrence_groups(keys)
        if len(unique) == len(keys):
            return None
        features = self.core(model).get_image_features(pixels[unique], return_dict=True).pooler_output  # [U, S, D]
        return pooled_features(features[groups])  # [N, S, D]
