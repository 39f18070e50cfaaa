"""VLM trees sampled with finished rows dropped from the decode batch equal trees sampled
without, for every family: the dropped rows' KV cache (and Qwen's mRoPE offsets) follow the
kept rows, and a thought stopped at a delimiter is continued from its stashed cache."""
from __future__ import annotations

import pytest
import torch

from vlm_treegrpo.data.visual import make_visual
from vlm_treegrpo.rollout.tree import SamplingParams
from vlm_treegrpo.policy.vlm import tiny_vlm_policy

FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "smolvlm", "llava-onevision", "gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_trees_with_dropped_rows_equal_trees_without(family, monkeypatch):
    policy = tiny_vlm_policy(family, "cpu")
    prompts = [policy.encode(ex, "") for ex in make_visual(3, seed=1)]
    eos = policy.model.generation_config.eos_token_id
    policy.model.generation_config.eos_token_id = [*(eos if isinstance(eos, list) else [eos]), *range(200, 215)]
    calls, orig = [], policy.model.generate
    monkeypatch.setattr(policy.model, "generate", lambda **kw: calls.append(kw["input_ids"].shape[0]) or orig(**kw))
    got = {}
    for drop in (False, True):
        calls.clear()
        torch.manual_seed(5)
        with torch.no_grad():
            trees = policy.sample(prompts, 4, 3, 12, 10, SamplingParams(temperature=1.0, drop_finished=drop), ["e", "\n"])
        got[drop] = ([(t.thoughts, t.thought_done, t.answers) for t in trees], list(calls))
    assert got[True][0] == got[False][0]
    assert len(got[False][1]) == 2 and len(got[True][1]) > 2  # the two passes ran in segments on fewer rows
    done = [d for thoughts, dones, _ in got[False][0] for d in dones]
    assert any(done) and not all(done)
