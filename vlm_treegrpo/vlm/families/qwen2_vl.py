"""Qwen2-VL: ViT (quick-GELU, 2-D RoPE) + 2 x 2 patch merger + Qwen2 LLM with mRoPE."""
from __future__ import annotations

from transformers import (
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from vlm_treegrpo.vlm.adapter import Preset
from vlm_treegrpo.vlm.families._qwen_common import (
    QWEN2_VL_CHAT_TEMPLATE,
    TINY_MERGE,
    TINY_PATCH,
    TINY_TEXT_HIDDEN,
    QwenVLAdapter,
)

_NOTES = (
    "bf16 weights ~{w} GB; full fine-tune with AdamW (fp32 master + moments) ~{full} GB before "
    "activations plus a bf16 reference copy for KL; LoRA ~{lora} GB. Images cost t*h*w/4 tokens "
    "(28 px per token side): cap max_pixels to bound memory."
)


class Qwen2VLAdapter(QwenVLAdapter):
    family = "qwen2-vl"
    presets = (
        Preset("qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct", "2B", notes=_NOTES.format(w=4.4, full=35, lora=8)),
        Preset("qwen2-vl-7b", "Qwen/Qwen2-VL-7B-Instruct", "7B", notes=_NOTES.format(w=16.6, full=133, lora=22)),
    )
    config_cls = Qwen2VLConfig
    model_cls = Qwen2VLForConditionalGeneration
    processor_cls = Qwen2VLProcessor
    image_processor_cls = Qwen2VLImageProcessor
    video_processor_cls = Qwen2VLVideoProcessor
    chat_template = QWEN2_VL_CHAT_TEMPLATE

    def _tiny_vision_config(self) -> dict:
        return dict(
            depth=2,
            embed_dim=32,
            hidden_size=TINY_TEXT_HIDDEN,  # the merger projects to the LLM width
            num_heads=2,
            mlp_ratio=2,
            patch_size=TINY_PATCH,
            spatial_merge_size=TINY_MERGE,
            temporal_patch_size=2,
        )
