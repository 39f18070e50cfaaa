"""Family name -> adapter, at the config boundary only. Modules import lazily."""
from __future__ import annotations

import importlib

from vlm_treegrpo.vlm.adapter import VLMAdapter

_FAMILY_MODULES = {
    "qwen2-vl": "vlm_treegrpo.vlm.families.qwen2_vl:Qwen2VLAdapter",
    "qwen2.5-vl": "vlm_treegrpo.vlm.families.qwen2_5_vl:Qwen25VLAdapter",
    "qwen3-vl": "vlm_treegrpo.vlm.families.qwen3_vl:Qwen3VLAdapter",
    "smolvlm": "vlm_treegrpo.vlm.families.smolvlm:SmolVLMAdapter",
    "llava-onevision": "vlm_treegrpo.vlm.families.llava_onevision:LlavaOneVisionAdapter",
    "gemma3": "vlm_treegrpo.vlm.families.gemma3:Gemma3Adapter",
}
FAMILIES = tuple(_FAMILY_MODULES)


def get_adapter(family: str) -> VLMAdapter:
    """The adapter instance for a family name (ValueError naming the known families)."""
    if family not in _FAMILY_MODULES:
        raise ValueError(f"unknown VLM family {family!r}; known: {list(FAMILIES)}")
    module, cls = _FAMILY_MODULES[family].split(":")
    return getattr(importlib.import_module(module), cls)()
