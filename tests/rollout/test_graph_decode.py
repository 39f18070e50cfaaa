"""Graph decoding (``rollout.decode_graphs``): the fixed-buffer decode loop samples what
``generate`` samples (same draws, padding, stops), with the shared prefill and without, in
trees whose continuations resume the thought cache, greedy too; each batch shape gets one step
buffer, reused by later passes; every VLM family's trees too (Gemma3, with its sliding window,
through ``generate``). On this CPU the step runs eagerly (``tests/test_gpu_sampling.py`` checks
the captured graph on CUDA)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from vlm_treegrpo.models.tiny import build_tiny_llama
from vlm_treegrpo.rollout import graphs
from vlm_treegrpo.rollout.tree import SamplingParams, generate, sample_trees

PROMPTS = ["1 + 2 =", "12 * 34 - 5 =", "7", "3 * 3 = 9; 4 * 4 ="]


@pytest.fixture(scope="module", params=["float64", "float32"])
def tiny(request):
    model, tok = build_tiny_llama(seed=5)
    model = model.to(getattr(torch, request.param)).eval()
    model.generation_config.eos_token_id = [tok.eos_token_id, *range(300, 330)]  # (some rows end early)
    return model, tok


def _ids(tok, prompts):
    return [tok.encode(p) for p in prompts]


@pytest.mark.parametrize("n", [4, 1], ids=["shared-prefill", "one-sample"])
def test_graph_decode_samples_what_generate_samples(tiny, n):
    model, tok = tiny
    eager = SamplingParams(temperature=1.0)
    torch.manual_seed(0)
    want = generate(model, tok, _ids(tok, PROMPTS), n, 12, eager, ["\n\n", " 1"])
    before = graphs.STATS.eager_steps
    torch.manual_seed(0)
    got = generate(model, tok, _ids(tok, PROMPTS), n, 12, dataclasses.replace(eager, graphs=True), ["\n\n", " 1"])
    assert graphs.STATS.eager_steps > before  # (the loop ran: no CUDA here, so eagerly)
    assert got == want
    assert any(got[1]) and not all(got[1])  # some rows ended at EOS, some did not
    assert sum(map(len, want[0])) > 2 * len(PROMPTS) * n


def test_greedy_and_top_p_through_the_loop(tiny):
    model, tok = tiny
    for sampling in (SamplingParams(greedy=True), SamplingParams(temperature=0.7, top_p=0.9)):
        torch.manual_seed(1)
        want = generate(model, tok, _ids(tok, PROMPTS), 2, 10, sampling)
        before = graphs.STATS.eager_steps
        torch.manual_seed(1)
        assert generate(model, tok, _ids(tok, PROMPTS), 2, 10, dataclasses.replace(sampling, graphs=True)) == want
        assert graphs.STATS.eager_steps > before


def _trees_without_and_with_the_loop(model, tok) -> dict:
    """3 x 2 trees of PROMPTS, through generate (False) and the graph loop (True), same seed."""
    sampling = SamplingParams(temperature=1.0)
    out = {}
    for on in (False, True):
        before = graphs.STATS.eager_steps
        torch.manual_seed(3)
        trees = sample_trees(model, tok, _ids(tok, PROMPTS), 3, 2, 8, 6, dataclasses.replace(sampling, graphs=on), ["e", "\n"])
        out[on] = [(t.thoughts, t.thought_done, t.answers) for t in trees]
        assert (graphs.STATS.eager_steps > before) == on
    return out


def test_a_tree_resumes_its_thoughts_from_the_step_buffers_cache(tiny):
    out = _trees_without_and_with_the_loop(*tiny)
    assert out[True] == out[False]
    assert any(not done for t in out[True] for done in t[1])  # some thoughts were continued


def test_rows_rounded_up_to_a_bucket_sample_what_generate_samples(monkeypatch):
    """As on a GPU: the step buffers have row_bucket(B) rows, the extra ones repeat the last row
    and never reach the sampler (12 thoughts -> 16 rows; the continuations' count varies)."""
    monkeypatch.setattr(graphs, "BUCKET_DEVICES", ("cuda", "cpu"))
    assert [graphs.row_bucket(b) for b in (1, 3, 5, 12, 16, 17, 40, 64)] == [1, 4, 8, 16, 16, 32, 48, 64]
    model, tok = build_tiny_llama(seed=5)
    model.generation_config.eos_token_id = [tok.eos_token_id, *range(300, 330)]
    sampling = SamplingParams(temperature=1.0)
    out = {}
    for on in (False, True):
        torch.manual_seed(3)
        trees = sample_trees(model, tok, _ids(tok, PROMPTS), 3, 2, 8, 6, dataclasses.replace(sampling, graphs=on), ["e", "\n"])
        out[on] = [(t.thoughts, t.thought_done, t.answers) for t in trees]
    assert out[True] == out[False]
    rows = sorted(k[0] for k in graphs._pool(model))
    assert 16 in rows and all(r == graphs.row_bucket(r) for r in rows)  # (12 thought rows in a 16-row buffer)


def test_one_step_buffer_per_batch_shape_reused_across_passes():
    model, tok = build_tiny_llama(seed=5)
    sampling = SamplingParams(temperature=1.0, graphs=True)
    generate(model, tok, _ids(tok, PROMPTS[:2]), 3, 6, sampling)
    pool = graphs._pool(model)
    held = {k: id(v) for k, v in pool.items()}
    generate(model, tok, _ids(tok, ["5 + 5 =", "9"]), 3, 6, sampling)  # same rows, same cache bucket
    assert {k: id(v) for k, v in graphs._pool(model).items()} == held
    assert len(held) == 1
    generate(model, tok, _ids(tok, PROMPTS[:2]), 2, 6, sampling)  # 4 rows: a new buffer
    assert len(graphs._pool(model)) == 2


def test_new_weights_drop_the_step_buffers():
    model, tok = build_tiny_llama(seed=5)
    sampling = SamplingParams(temperature=1.0, graphs=True)
    generate(model, tok, _ids(tok, PROMPTS[:2]), 2, 4, sampling)
    assert len(graphs._pool(model)) == 1
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # (tied weights untied: new storage)
    assert len(graphs._pool(model)) == 0


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "smolvlm", "llava-onevision", "gemma3"])
def test_a_vlm_tree_through_the_loop_equals_generate(family):
    """Every family: the steps need no image input once the cache holds the prompt, and Qwen's
    mRoPE offsets place them (RopeDeltas.decode_positions). Gemma3 (sliding window) decodes
    through generate."""
    from vlm_treegrpo.data.visual import make_visual
    from vlm_treegrpo.policy.vlm import tiny_vlm_policy

    policy = tiny_vlm_policy(family, "cpu")
    prompts = [policy.encode(ex, "") for ex in make_visual(3, seed=1)]
    eos = policy.model.generation_config.eos_token_id
    policy.model.generation_config.eos_token_id = [*(eos if isinstance(eos, list) else [eos]), *range(200, 215)]
    out, steps = {}, {}
    for on in (False, True):
        before = graphs.STATS.eager_steps
        torch.manual_seed(5)
        with torch.no_grad():
            trees = policy.sample(prompts, 3, 2, 10, 8, SamplingParams(temperature=1.0, graphs=on), ["e", "\n"])
        out[on], steps[on] = [(t.thoughts, t.thought_done, t.answers) for t in trees], graphs.STATS.eager_steps - before
    assert out[True] == out[False]
    assert steps[False] == 0 and (steps[True] == 0) == (family == "gemma3")
    done = [d for _, dones, _ in out[True] for d in dones]
    assert any(done) and not all(done)  # some thoughts were continued


def test_the_config_refuses_graphs_with_compile():
    from vlm_treegrpo.config import ConfigError, RolloutConfig

    with pytest.raises(ConfigError, match="rollout.decode_graphs"):
        RolloutConfig(decode_graphs=True, compile_decode=True)


def test_a_model_on_flash_or_eager_attention_or_a_sliding_window_decodes_through_generate():
    model, _ = build_tiny_llama(seed=5)
    assert graphs.supports(model)
    model.config._attn_implementation = "flash_attention_2"  # (the switch only: flash takes no 4-D mask)
    assert not graphs.supports(model)
    model.config._attn_implementation = "eager"  # (transformers' eager kernel adds the mask to the scores: no bool mask)
    assert not graphs.supports(model)
    model.config._attn_implementation = "sdpa"
    model.config.sliding_window = 16
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers  # (a static cache of window layers)
    assert not graphs.supports(model)


def test_the_step_buffers_live_beside_the_model_and_go_with_it():
    import copy
    import gc

    model, tok = build_tiny_llama(seed=5)
    generate(model, tok, _ids(tok, PROMPTS[:2]), 2, 4, SamplingParams(temperature=1.0, graphs=True))
    assert len(graphs._pool(model)) == 1
    copy.deepcopy(model)  # (a reference model is a deep copy: nothing of the pool is on the model)
    n = len(graphs._POOLS)
    del model
    gc.collect()
    assert len(graphs._POOLS) == n - 1


def test_autocast_gets_its_own_step_buffers():
    model, tok = build_tiny_llama(seed=5)
    sampling = SamplingParams(temperature=1.0, graphs=True)
    generate(model, tok, _ids(tok, PROMPTS[:2]), 2, 4, sampling)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        generate(model, tok, _ids(tok, PROMPTS[:2]), 2, 4, sampling)
    assert sorted(k[4] is None for k in graphs._pool(model)) == [False, True]  # (key: B, L, device, dtype, autocast, axes)


def test_a_lora_model_trees_through_the_loop_equal_generate():
    """Training with ``model.lora_r > 0`` samples through a peft wrapper: the loop decodes its
    trees as generate does, with adapters that change the outputs."""
    from vlm_treegrpo.policy.factory import apply_lora

    model, tok = build_tiny_llama(seed=5)
    model = apply_lora(model.float(), 4, 8.0, ["q_proj", "v_proj"]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # (initialized to 0: the adapters would not change the outputs)
                p.normal_(0, 0.5)
    out = _trees_without_and_with_the_loop(model, tok)
    assert out[True] == out[False]
