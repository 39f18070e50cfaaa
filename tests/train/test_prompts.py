"""EncodedPrompts (vlm_treegrpo.train.prompts): the same prompts as encoding up front, each
encoded only when indexed."""
from __future__ import annotations

from PIL import Image

from vlm_treegrpo.data.images import ImageRef
from vlm_treegrpo.data.types import Example
from vlm_treegrpo.policy.factory import make_policy
from vlm_treegrpo.train.prompts import EncodedPrompts


class CountingPolicy:
    def __init__(self):
        self.calls: list[str] = []

    def encode(self, example: Example, instruction: str) -> str:
        self.calls.append(example.prompt)
        return f"{example.prompt}|{instruction}"


def test_encodes_only_what_is_indexed_and_keeps_nothing():
    policy = CountingPolicy()
    prompts = EncodedPrompts(policy, [Example(prompt=f"p{i}", answer="1") for i in range(5)], "box")
    assert len(prompts) == 5 and policy.calls == []
    assert prompts[3] == "p3|box" and prompts[1:4:2] == ["p1|box", "p3|box"] and prompts[-1] == "p4|box"
    assert prompts[3] == "p3|box"
    assert policy.calls == ["p3", "p1", "p3", "p4", "p3"]


def test_vlm_prompts_from_image_refs_equal_those_from_decoded_images(tmp_path):
    Image.effect_noise((40, 30), 50).convert("RGB").save(tmp_path / "a.png")
    policy = make_policy("tiny-qwen2-vl", "cpu", "float32")
    lazy = Example(prompt="How many?", answer="1", images=(ImageRef(str(tmp_path / "a.png"), 0, "image"),))
    eager = Example(prompt="How many?", answer="1", images=(Image.open(tmp_path / "a.png").convert("RGB"),))
    got, want = EncodedPrompts(policy, [lazy], "")[0], policy.encode(eager, "")
    assert got.input_ids.tolist() == want.input_ids.tolist() and got.image_keys == want.image_keys
    assert all((got.image_inputs[k] == want.image_inputs[k]).all() for k in want.image_inputs)
