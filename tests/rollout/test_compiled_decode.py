"""Compiled decoding (``rollout.compile_decode``): a static KV cache and ``generate``'s compiled
forward give the samples eager decoding gives, with the shared prefill and without, for text
and a VLM; prompts of other lengths in the same cache bucket reuse the compiled step."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from vlm_treegrpo.models.tiny import build_tiny_llama
from vlm_treegrpo.rollout.kv_cache import STATIC_CACHE_BUCKET, static_cache
from vlm_treegrpo.rollout.tree import SamplingParams, generate

PROMPTS = ["1 + 2 =", "12 * 34 - 5 =", "7"]


def _sample(model, tok, prompts, n, sampling, seed=0):
    torch.manual_seed(seed)
    return generate(model, tok, [tok.encode(p) for p in prompts], n, 10, sampling, ["\n\n"])


@pytest.fixture(scope="module")
def tiny():
    torch._dynamo.reset()
    model, tok = build_tiny_llama(seed=5)
    return model.eval(), tok


@pytest.mark.parametrize("n", [3, 1], ids=["shared-prefill", "one-sample"])
def test_compiled_decode_samples_what_eager_decode_samples(tiny, n):
    from torch._dynamo.utils import counters

    model, tok = tiny
    eager = SamplingParams(temperature=1.0)
    want = _sample(model, tok, PROMPTS, n, eager)
    frames = counters["frames"]["ok"]
    got = _sample(model, tok, PROMPTS, n, dataclasses.replace(eager, compile=True))
    assert counters["frames"]["ok"] > frames  # compiled (a new batch shape: a new graph)
    assert got == want
    assert sum(map(len, want[0])) > 10  # something was sampled


def test_prompts_in_one_cache_bucket_reuse_the_compiled_step(tiny):
    from torch._dynamo.utils import counters

    model, tok = tiny
    sampling = SamplingParams(temperature=1.0, compile=True)
    _sample(model, tok, PROMPTS, 2, sampling)
    graphs = counters["stats"]["unique_graphs"]
    _sample(model, tok, ["3 * 3 = 9; 4 * 4 =", "5"], 2, sampling)  # other prompt lengths, same bucket
    assert counters["stats"]["unique_graphs"] == graphs


def test_static_cache_holds_the_prefill_and_rounds_its_length_up(tiny):
    from vlm_treegrpo.rollout.kv_cache import prefill_shared
    from vlm_treegrpo.rollout.tree import left_pad

    model, tok = tiny
    ids, mask = left_pad([tok.encode(p) for p in PROMPTS], tok.pad_token_id, "cpu")
    with torch.no_grad():
        prefilled = prefill_shared(model, {"input_ids": ids, "attention_mask": mask}, 2)
        keys = prefilled.layers[0].keys.clone()  # [B*2, H, T-1, D]
        cache = static_cache(model, ids.shape[1] + 10, prefilled)
    layer = cache.layers[0]
    assert layer.keys.shape[2] == STATIC_CACHE_BUCKET and int(layer.cumulative_length) == ids.shape[1] - 1
    assert torch.equal(layer.keys[:, :, : ids.shape[1] - 1], keys)


def test_compiled_decode_in_a_vlm_tree_samples_what_eager_decode_samples():
    from vlm_treegrpo.data.visual import make_visual
    from vlm_treegrpo.policy.vlm import tiny_vlm_policy

    from torch._dynamo.utils import counters

    policy = tiny_vlm_policy("qwen2-vl", "cpu")
    prompts = [policy.encode(ex, "") for ex in make_visual(2, seed=0)]
    frames = counters["frames"]["ok"]
    trees = {}
    for compile_ in (False, True):
        torch.manual_seed(0)
        with torch.no_grad():
            out = policy.sample(prompts, 2, 2, 6, 5, SamplingParams(temperature=1.0, compile=compile_), ["\n\n"])
        trees[compile_] = [(t.thoughts, t.answers) for t in out]
    assert counters["frames"]["ok"] > frames  # the VLM's decode step was compiled
    assert trees[True] == trees[False]


def test_compiled_tree_resumes_its_thought_cache_and_samples_what_eager_samples(tiny, monkeypatch):
    import vlm_treegrpo.rollout.kv_cache as KV
    import vlm_treegrpo.rollout.tree as T
    from vlm_treegrpo.rollout.tree import sample_trees

    model, tok = tiny
    prompts = [tok.encode(p) for p in PROMPTS]
    trees = {}
    for compile_ in (False, True):
        made = []
        monkeypatch.setattr(T, "continuation_cache", lambda *a, **kw: made.append(KV.continuation_cache(*a, **kw)) or made[-1])
        torch.manual_seed(1)
        out = sample_trees(model, tok, prompts, 2, 2, 6, 4, SamplingParams(temperature=1.0, compile=compile_), ["e", "\n"])
        trees[compile_] = [(t.thoughts, t.thought_done, t.answers) for t in out]
        assert len(made) == 1 and made[0] is not None  # resumed from the thought pass (a static cache when compiled)
    assert trees[True] == trees[False]
