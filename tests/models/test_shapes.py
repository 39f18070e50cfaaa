"""Released shapes as data: every file loads and names its source, depth truncation, the stand-in
tokenizer of the real vocabulary size, and the parameter counts the shapes give."""
from __future__ import annotations

import json

import pytest

from vlm_treegrpo.analysis.memory_plan import model_size
from vlm_treegrpo.config import ConfigError
from vlm_treegrpo.models.shapes import SHAPES_DIR, load_shape, shape_for, shape_names, truncate_config, widen_vocab
from vlm_treegrpo.models.tokenizer import SPECIAL_TOKENS, VOCAB_SIZE, build_local_tokenizer
from vlm_treegrpo.vlm.registry import FAMILIES

PRESETS = ["gemma3-4b", "llama-3.2-1b", "llama-3.2-3b", "llava-onevision-7b", "qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-vl-3b",
           "qwen2.5-vl-7b", "qwen3-vl-4b", "qwen3-vl-8b", "smollm2-1.7b", "smollm2-135m", "smolvlm-2b"]


def test_every_preset_has_one_file_naming_its_source():
    assert shape_names() == PRESETS
    for name in PRESETS:
        raw = json.loads((SHAPES_DIR / f"{name}.json").read_text())
        shape = load_shape(f"random:{name}")
        assert shape.name == name == raw["name"]
        assert shape.hub_id in shape.source  # (the file says which hub file it transcribes)
        assert shape.family is None or shape.family in FAMILIES
        if shape.family is not None:  # a VLM: real image limits and both towers
            assert shape.processor["image_processor"] and {"text_config", "vision_config"} <= set(shape.config)
        assert shape_for(shape.hub_id) == shape


def test_an_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_shape("random:qwen9-vl-1t")
    assert "qwen9-vl-1t" in str(err.value)
    for name in PRESETS:
        assert f"random:{name}" in str(err.value)


def test_truncate_config_keeps_the_first_blocks_and_the_roles_inside_them():
    config = {
        "text_config": {"num_hidden_layers": 36, "hidden_size": 2048, "layer_types": ["a", "b", "c", "d"]},
        "vision_config": {"depth": 32, "fullatt_block_indexes": [7, 15, 23, 31], "deepstack_visual_indexes": [1, 8]},
    }
    out = truncate_config(config, 2)
    assert out["text_config"] == {"num_hidden_layers": 2, "hidden_size": 2048, "layer_types": ["a", "b"]}
    assert out["vision_config"] == {"depth": 2, "fullatt_block_indexes": [1], "deepstack_visual_indexes": [1]}
    assert truncate_config(config, 16)["vision_config"]["fullatt_block_indexes"] == [7, 15]
    assert truncate_config(config, 100) == config and truncate_config(config, None) == config
    assert config["text_config"]["num_hidden_layers"] == 36  # (a copy: the shape is not changed)


def test_widen_vocab_reaches_the_size_with_the_specials_on_top_and_the_text_ids_unchanged():
    extras = ("<|image_pad|>", "<|video_pad|>")
    text = "Tom has 3 apples.\nAnswer: 12"
    before = build_local_tokenizer(extra_special_tokens=extras)
    ids = before(text)["input_ids"]
    tok = widen_vocab(build_local_tokenizer(extra_special_tokens=extras), 5000)
    assert len(tok) == 5000 and len(tok.get_vocab()) == 5000
    assert tok(text)["input_ids"] == ids and tok.decode(ids) == text
    assert [tok.convert_tokens_to_ids(t) for t in extras] == [4998, 4999]
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert tok.decode([VOCAB_SIZE, 4997]) == f"<|filler_{VOCAB_SIZE}|><|filler_4997|>"  # (every id decodes)
    with pytest.raises(ConfigError):
        widen_vocab(build_local_tokenizer(), 10)


# Parameter counts the hub reports for the released checkpoints (model cards, safetensors
# metadata), in billions to two decimals: the shapes must build the same architectures.
RELEASED_BILLIONS = {
    "qwen2.5-vl-3b": 3.75, "qwen2.5-vl-7b": 8.29, "qwen3-vl-4b": 4.44, "qwen3-vl-8b": 8.77, "gemma3-4b": 4.30,
    "smolvlm-2b": 2.25, "llava-onevision-7b": 8.03, "qwen2.5-1.5b": 1.54, "qwen2.5-7b": 7.62, "llama-3.2-1b": 1.24,
    "llama-3.2-3b": 3.21, "smollm2-1.7b": 1.71, "smollm2-135m": 0.13,
}


@pytest.mark.parametrize("name", PRESETS)
def test_full_depth_parameter_count_is_the_released_models(name):
    assert round(model_size(load_shape(name)).params / 1e9, 2) == RELEASED_BILLIONS[name]


def test_smollm2_135m_shape_counts_the_real_checkpoints_parameters():
    assert model_size(load_shape("smollm2-135m")).params == 134_515_008  # (SmolLM2-135M's safetensors total)
