"""make_policy (vlm_treegrpo.policy.text): the name -> policy registry at the config boundary (named
test_make_policy.py: tests/vlm/test_policy.py holds the basename test_policy)."""
from __future__ import annotations

import json

import pytest
import torch

from vlm_treegrpo.data.visual import VISUAL_INSTRUCTION, visual_splits
from vlm_treegrpo.models.loader import BUILTINS
from vlm_treegrpo.policy.factory import make_policy, named_policies
from vlm_treegrpo.policy.text import TextPolicy
from vlm_treegrpo.policy.vlm import VLMPolicy
from vlm_treegrpo.vlm.registry import FAMILIES, TINY_NAMES, checkpoint_family, get_adapter, presets


def test_named_policies_cover_text_builtins_tiny_vlms_and_presets():
    names = named_policies()
    assert set(BUILTINS) <= set(names) and set(TINY_NAMES) <= set(names)
    assert {f"tiny-{f}" for f in FAMILIES} == set(TINY_NAMES)
    for family in FAMILIES:
        for p in get_adapter(family).presets:
            assert p.name in names and p.hub_id in names and presets()[p.hub_id] == (family, p)


def test_make_policy_picks_text_or_vlm_by_name():
    assert isinstance(make_policy("tiny-llama", "cpu"), TextPolicy)
    policy = make_policy("tiny-smolvlm", "cpu", dtype="bfloat16")
    assert isinstance(policy, VLMPolicy) and policy.adapter.family == "smolvlm"
    assert next(policy.model.parameters()).dtype == torch.bfloat16
    assert policy.tokenizer.padding_side == "left" and policy.model.generation_config.pad_token_id == policy.pad_id


def test_saved_checkpoints_load_by_path_through_their_config(tmp_path):
    text = make_policy("tiny-llama", "cpu")
    text.save(tmp_path / "text")
    assert checkpoint_family(str(tmp_path / "text")) is None
    assert isinstance(make_policy(str(tmp_path / "text"), "cpu"), TextPolicy)

    vlm = make_policy("tiny-qwen2-vl", "cpu")
    vlm.save(tmp_path / "vlm")
    assert checkpoint_family(str(tmp_path / "vlm")) == "qwen2-vl"  # model_type qwen2_vl + vision_config
    again = make_policy(str(tmp_path / "vlm"), "cpu")
    assert isinstance(again, VLMPolicy) and again.adapter.family == "qwen2-vl"
    example = visual_splits(1, 1, seed=0)[0][0]
    prompts = [vlm.encode(example, VISUAL_INSTRUCTION)]
    assert torch.equal(again.encode(example, VISUAL_INSTRUCTION).input_ids, prompts[0].input_ids)
    assert again.greedy(prompts, 4) == vlm.greedy(prompts, 4)


def test_vision_checkpoint_of_unknown_type_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip_2", "vision_config": {"hidden_size": 8}}))
    with pytest.raises(ValueError, match="blip_2"):
        make_policy(str(tmp_path), "cpu")
