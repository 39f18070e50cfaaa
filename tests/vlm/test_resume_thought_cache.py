"""VLM trees whose continuations resume the thought pass's KV cache (no image encoded and no
prompt prefilled a second time) sample what prefilling prompt + thought again samples, for
every family; a sliding-window cache (Gemma3) falls back to the new prefill."""
from __future__ import annotations

import pytest
import torch

import vlm_treegrpo.rollout.kv_cache as KV
from vlm_treegrpo.data.visual import make_visual
from vlm_treegrpo.rollout.tree import SamplingParams
from vlm_treegrpo.policy.vlm import tiny_vlm_policy

FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "smolvlm", "llava-onevision", "gemma3"]


def _trees(policy, prompts, reuse: bool):
    policy.reuse_thought_cache = reuse
    torch.manual_seed(5)
    with torch.no_grad():
        trees = policy.sample(prompts, 3, 2, 6, 4, SamplingParams(temperature=1.0), ["e", "\n"])
    return [(t.thoughts, t.thought_done, t.answers) for t in trees]


@pytest.mark.parametrize("family", FAMILIES)
def test_resumed_continuations_equal_a_new_prefill(family, monkeypatch):
    policy = tiny_vlm_policy(family, "cpu")
    prompts = [policy.encode(ex, "") for ex in make_visual(3, seed=1)]
    eos = policy.model.generation_config.eos_token_id
    policy.model.generation_config.eos_token_id = [*(eos if isinstance(eos, list) else [eos]), *range(200, 230)]  # some thoughts end
    want = _trees(policy, prompts, reuse=False)
    made = []
    cont = KV.continuation_cache
    monkeypatch.setattr("vlm_treegrpo.policy.vlm.continuation_cache", lambda *a, **kw: made.append(cont(*a, **kw)) or made[-1])
    got = _trees(policy, prompts, reuse=True)
    assert got == want
    lens = {len(th) for thoughts, done, _ in want for th, d in zip(thoughts, done) if not d}
    assert len(lens) > 1 and any(any(done) for _, done, _ in want)  # thoughts of several lengths; some ended
    assert len(made) == 1 and (made[0] is None) == (family == "gemma3")  # resumed, except over a sliding window
