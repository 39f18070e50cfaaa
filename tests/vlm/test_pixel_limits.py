"""data.min_pixels / data.max_pixels through the adapter (VLMAdapter.limit_pixels) to the processor."""
from __future__ import annotations

import pytest
from PIL import Image

from vlm_treegrpo.config import ConfigError, config_from_dict
from vlm_treegrpo.data.types import Example
from vlm_treegrpo.policy.factory import limit_pixels, make_policy

EX = Example(prompt="How many?", answer="1", images=(Image.new("RGB", (64, 64), "red"),))


@pytest.mark.parametrize("model", ["tiny-qwen2-vl", "tiny-qwen3-vl"])
def test_qwen_processors_resize_within_the_bounds(model):
    policy = make_policy(model, "cpu", "float32")
    ip = policy.processor.image_processor
    cell = ip.patch_size * ip.merge_size  # pixels per side of one merged image token
    cells = lambda: [[h // ip.merge_size, w // ip.merge_size] for _, h, w in policy.encode(EX, "").image_inputs["image_grid_thw"].tolist()]  # noqa: E731
    limit_pixels(policy, cell * cell, cell * cell * 4, model)  # a 64 px square shrinks to 2 x 2 tokens
    assert cells() == [[2, 2]]
    tokens = policy.encode(EX, "").input_ids.numel()
    limit_pixels(policy, cell * cell * 9, cell * cell * 9, model)  # exactly 3 x 3 tokens
    assert cells() == [[3, 3]] and policy.encode(EX, "").input_ids.numel() == tokens + 9 - 4
    with pytest.raises(ConfigError, match=rf"^data.max_pixels: model {model}: the bounds would be min {cell * cell * 9} > max {cell * cell * 4} "):
        limit_pixels(policy, 0, cell * cell * 4, model)  # (the min of 9 cells set before stays)


def test_models_without_bounds_refuse_them_naming_the_field():
    with pytest.raises(ConfigError, match=r"^data.max_pixels: model tiny-smolvlm: the smolvlm processor resizes images to its own fixed size"):
        limit_pixels(make_policy("tiny-smolvlm", "cpu", "float32"), 0, 1024, "tiny-smolvlm")
    with pytest.raises(ConfigError, match=r"^data.min_pixels: model tiny-llama: a text-only causal LM takes no images$"):
        limit_pixels(make_policy("tiny-llama", "cpu", "float32"), 256, 0, "tiny-llama")
    limit_pixels(make_policy("tiny-llama", "cpu", "float32"), 0, 0, "tiny-llama")  # (nothing asked: nothing to refuse)


def test_pixel_bound_config_checks():
    d = config_from_dict({"data": {"max_pixels": 1024, "min_pixels": 256}}).data
    assert (d.min_pixels, d.max_pixels) == (256, 1024)
    with pytest.raises(ConfigError, match=r"^data.min_pixels: must be <= data.max_pixels, got 2048 > 1024"):
        config_from_dict({"data": {"max_pixels": 1024, "min_pixels": 2048}})
    with pytest.raises(ConfigError, match=r"^data.max_pixels: must be >= 0"):
        config_from_dict({"data": {"max_pixels": -1}})
