"""LLaVA-OneVision: SigLIP tower + 2-layer MLP projector + Qwen2 LLM, "anyres_max_9" tiling.

A lone image in a prompt is tiled (a base view plus the grid crops of its best
``image_grid_pinpoints`` resolution, unpadded, with a learned newline per feature row); an image
of a multi-image prompt is one base view + one newline. The model tells the two apart through
``batch_num_images`` (images per prompt), so a batch carries, in image order:
``pixel_values [N, P, C, H, W]`` (crops padded to the batch's largest ``P``), ``image_sizes
[N, 2]`` and ``batch_num_images`` with one entry per prompt that has images.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)

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

# llava-hf/llava-onevision-qwen2-*-ov-hf chat template (images first, each on its own line).
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Tiny sizes: 16 px views in 4 px patches (16 tokens per view); crops on a <= 2 x 2 grid.
TINY_IMAGE = 16
TINY_PATCH = 4
TINY_PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]
SIGLIP_MEAN_STD = [0.5, 0.5, 0.5]

_NOTES = (
    "bf16 weights ~{w} GB; full fine-tune with AdamW ~{full} GB before activations, LoRA ~{lora} GB. "
    "A lone image costs up to ~7.4k tokens (729 base + crops capped near 9 x 729, + newlines); each image of a "
    "multi-image prompt costs 730. Downscale images or cap the crop grid to bound sequence length."
)


def _pad_dim1(t: Tensor, size: int) -> Tensor:
    """Zero-pad dim 1 of ``t`` to ``size``."""
    if t.shape[1] == size:
        return t
    pad = t.new_zeros((t.shape[0], size - t.shape[1], *t.shape[2:]))
    return torch.cat([t, pad], dim=1)


class LlavaOneVisionAdapter(SiglipFamilyAdapter):
    family = "llava-onevision"
    presets = (
        Preset("llava-onevision-0.5b", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "0.9B", notes=_NOTES.format(w=1.8, full=15, lora=4)),
        Preset("llava-onevision-7b", "llava-hf/llava-onevision-qwen2-7b-ov-hf", "8B", notes=_NOTES.format(w=16.1, full=130, lora=22)),
    )
    model_cls = LlavaOnevisionForConditionalGeneration
    config_cls = LlavaOnevisionConfig
    token_fields = {"image_token_index": "<image>", "video_token_index": "<video>"}
    image_input_names = ("pixel_values", "image_sizes", "batch_num_images")

    def tiny_parts(self):
        tokenizer = named_tokenizer(
            ("<image>", "<video>"),
            bos=None,
            eos="<|im_end|>",
            pad="<|endoftext|>",
            chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
        )
        size = {"height": TINY_IMAGE, "width": TINY_IMAGE}
        processor = LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessor(
                size=size, image_grid_pinpoints=TINY_PINPOINTS, image_mean=SIGLIP_MEAN_STD, image_std=SIGLIP_MEAN_STD
            ),
            tokenizer=tokenizer,
            video_processor=LlavaOnevisionVideoProcessor(size=size, image_mean=SIGLIP_MEAN_STD, image_std=SIGLIP_MEAN_STD),
            num_image_tokens=(TINY_IMAGE // TINY_PATCH) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
            chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
        )
        text = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=TINY_TEXT_HIDDEN,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=TINY_MAX_LENGTH,
            # Untied: with tied random embeddings greedy decoding just repeats the last token.
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        config = LlavaOnevisionConfig(
            text_config=text,
            vision_config=SiglipVisionConfig(**tiny_siglip(TINY_IMAGE, TINY_PATCH, vision_use_head=False)),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=TINY_PINPOINTS,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            vision_aspect_ratio="anyres_max_9",
            tie_word_embeddings=False,
        )
        return config, processor, [tokenizer.eos_token_id]

    def random_processor(self, tokenizer, spec: dict):
        """LLaVA-OneVision's processor with the released 384 px views and anyres pinpoints."""
        ip = spec["image_processor"]
        return LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessor(**ip),
            tokenizer=tokenizer,
            video_processor=LlavaOnevisionVideoProcessor(size=ip["size"], image_mean=ip["image_mean"], image_std=ip["image_std"]),
            chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
            **spec.get("processor", {}),
        )

    def collate_images(self, samples: list[Encoded]) -> dict[str, Tensor]:
        """Images of all samples in order; crops padded to the batch's largest count."""
        with_images = [s for s in samples if s.n_images]
        if not with_images:
            return {}
        n_crops = max(s.image_inputs["pixel_values"].shape[1] for s in with_images)
        return {
            "pixel_values": torch.cat([_pad_dim1(s.image_inputs["pixel_values"], n_crops) for s in with_images]),  # [N, P, C, H, W]
            "image_sizes": torch.cat([s.image_inputs["image_sizes"] for s in with_images]),  # [N, 2]
            "batch_num_images": torch.cat([s.image_inputs["batch_num_images"] for s in with_images]),  # [S]
        }

    def encoder_outputs(self, model, batch: dict[str, Tensor], image_keys) -> dict | None:
        pixels, sizes = batch["pixel_values"], batch["image_sizes"]  # [N, P, C, H, W], [N, 2]
        per_prompt = batch["batch_num_images"].tolist()
        tiled = [n == 1 for n in per_prompt for _ in range(n)]  # [N] lone image -> anyres tiling
        if len(tiled) != len(pixels):
            raise ValueError(f"batch_num_images covers {len(tiled)} images, pixel_values has {len(pixels)}")
        if image_keys is None:
            image_keys = content_groups([torch.cat([p.flatten(), s.float()]) for p, s in zip(pixels, sizes)])
        if len(image_keys) != len(pixels):
            raise ValueError(f"{len(image_keys)} image keys for {len(pixels)} images in the batch")
        # The same picture is encoded differently alone and within a multi-image prompt.
        groups, unique = first_occurrence_groups(list(zip(image_keys, tiled)))
        if len(unique) == len(pixels):
            return None
        # One vision pass: the tiled images as prompts of 1, then the others as one prompt of n;
        # a single untiled image is repeated once since a prompt of 1 would tile it.
        order = [i for i in unique if tiled[i]] + [i for i in unique if not tiled[i]]
        n_single = sum(tiled[i] for i in unique)
        n_multi = len(order) - n_single
        if n_multi == 1:
            order.append(order[-1])
        counts = [1] * n_single + ([max(n_multi, 2)] if n_multi else [])
        out = self.core(model).get_image_features(
            pixels[order], sizes[order], batch_num_images=torch.tensor(counts, device=pixels.device), return_dict=True
        ).pooler_output  # list of [n_tokens_i, D], one per image of `order`
        slot = {i: j for j, i in enumerate(order[: len(unique)])}
        return pooled_features([out[slot[unique[g]]] for g in groups])
