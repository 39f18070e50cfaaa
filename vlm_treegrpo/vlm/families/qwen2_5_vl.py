"""Qwen2.5-VL: Qwen2-VL with a windowed-attention SwiGLU ViT (full attention in a few blocks)."""
from __future__ import annotations

from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
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
from vlm_treegrpo.vlm.families.qwen2_vl import _NOTES


class Qwen25VLAdapter(QwenVLAdapter):
    family = "qwen2.5-vl"
    presets = (
        Preset("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", "3B", notes=_NOTES.format(w=7.5, full=60, lora=12)),
        Preset("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", "7B", notes=_NOTES.format(w=16.6, full=133, lora=22)),
    )
    config_cls = Qwen2_5_VLConfig
    model_cls = Qwen2_5_VLForConditionalGeneration
    processor_cls = Qwen2_5_VLProcessor
    image_processor_cls = Qwen2VLImageProcessor
    video_processor_cls = Qwen2VLVideoProcessor
    chat_template = QWEN2_VL_CHAT_TEMPLATE

    def _tiny_vision_config(self) -> dict:
        return dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=TINY_PATCH,
            spatial_merge_size=TINY_MERGE,
            temporal_patch_size=2,
            # windows of 2 x 2 merged tokens (4 x 4 patches); block 1 attends over the whole image.
            window_size=2 * TINY_MERGE * TINY_PATCH,
            fullatt_block_indexes=[1],
            out_hidden_size=TINY_TEXT_HIDDEN,
            tokens_per_second=2,
        )
