"""A text-only row of visual data (``images: []``) is a prompt a VLM takes, in a batch with image
prompts: each completes as it does alone."""
from __future__ import annotations

import pytest
from PIL import Image

from vlm_treegrpo.data.types import Example
from vlm_treegrpo.policy.factory import make_policy


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-smolvlm"])
def test_a_text_only_prompt_beside_an_image_prompt_completes_as_alone(name):
    policy = make_policy(name, "cpu", "float32")
    text = policy.encode(Example(prompt="What is 2 + 2?", answer="4"), "Answer with a number.")
    image = policy.encode(Example(prompt="What colour?", answer="red", images=(Image.new("RGB", (32, 32), "red"),)), "One word.")
    together = policy.greedy([text, image], 4)
    assert together == policy.greedy([text], 4) + policy.greedy([image], 4)
