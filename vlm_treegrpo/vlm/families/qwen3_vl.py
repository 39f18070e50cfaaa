"""Qwen3-VL: SigLIP-2-style ViT with learned (interpolated) position embeddings, DeepStack
features injected into the first LLM layers, and interleaved mRoPE in a Qwen3 LLM."""
from __future__ import annotations

from transformers import (
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from vlm_treegrpo.vlm.adapter import Preset
from vlm_treegrpo.vlm.families._qwen_common import (
    QWEN3_VL_CHAT_TEMPLATE,
    TINY_MERGE,
    TINY_PATCH,
    TINY_TEXT_HIDDEN,
    QwenVLAdapter,
)

_NOTES = (
    "bf16 weights ~{w} GB; full fine-tune with AdamW (fp32 master + moments) ~{full} GB before "
    "activations plus a bf16 reference copy for KL; LoRA ~{lora} GB. Images cost t*h*w/4 tokens "
    "(32 px per token side): cap max_pixels to bound memory."
)


class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3-vl"
    presets = (
        Preset("qwen3-vl-2b", "Qwen/Qwen3-VL-2B-Instruct", "2B", notes=_NOTES.format(w=4.3, full=34, lora=8)),
        Preset("qwen3-vl-4b", "Qwen/Qwen3-VL-4B-Instruct", "4B", notes=_NOTES.format(w=8.9, full=71, lora=14)),
        Preset("qwen3-vl-8b", "Qwen/Qwen3-VL-8B-Instruct", "8B", notes=_NOTES.format(w=17.5, full=140, lora=24)),
    )
    config_cls = Qwen3VLConfig
    model_cls = Qwen3VLForConditionalGeneration
    processor_cls = Qwen3VLProcessor
    image_processor_cls = Qwen2VLImageProcessor
    video_processor_cls = Qwen3VLVideoProcessor
    chat_template = QWEN3_VL_CHAT_TEMPLATE
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)

    def _tiny_text_config(self) -> dict:
        """The shared tiny text config with an explicit head_dim and Qwen3-VL's interleaved mRoPE."""
        return {
            **super()._tiny_text_config(),
            "head_dim": 16,
            # 8 rotary frequencies interleaved over (t, h, w) like the real [24, 20, 20].
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
        }

    def _tiny_vision_config(self) -> dict:
        return dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=TINY_PATCH,
            spatial_merge_size=TINY_MERGE,
            temporal_patch_size=2,
            out_hidden_size=TINY_TEXT_HIDDEN,
            num_position_embeddings=64,  # an 8 x 8 learned grid, interpolated to each image
            deepstack_visual_indexes=[0],
        )
