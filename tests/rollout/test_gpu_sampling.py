"""GPU only (skipped without CUDA): tree sampling on the device. Continuations that resume the
thought pass's KV cache sample what a new prefill samples (text and Qwen2-VL, fp32), and
compiled decoding (CUDA graphs) samples what eager decoding samples, and so do decoding that drops
finished rows and decode steps replayed from captured CUDA graphs (text and Qwen2-VL)."""
from __future__ import annotations

import pytest
import torch

from vlm_treegrpo.rollout.tree import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _text():
    from vlm_treegrpo.models.tiny import build_tiny_llama

    model, tok = build_tiny_llama(seed=0)
    return model.to("cuda").eval(), tok, [tok.encode(p) for p in ["1 + 2 =", "12 * 34 - 5 =", "7"]]


def _shapes(trees):
    return [(t.thoughts, t.thought_done, t.answers) for t in trees]


def test_text_tree_resume_equals_a_new_prefill_on_cuda():
    from vlm_treegrpo.rollout.tree import generate, grow_trees, sample_trees

    model, tok, prompts = _text()
    sampling = SamplingParams(temperature=1.0)
    torch.manual_seed(0)
    want = grow_trees(prompts, list, lambda p, th: list(p) + th,
                      lambda seqs, n, mx, stop: generate(model, tok, seqs, n, mx, sampling, stop), 3, 2, 8, 5, ["e", "\n"])
    torch.manual_seed(0)
    got = sample_trees(model, tok, prompts, 3, 2, 8, 5, sampling, ["e", "\n"])
    assert _shapes(got) == _shapes(want)


def test_vlm_tree_resume_equals_a_new_prefill_on_cuda():
    from vlm_treegrpo.data.visual import make_visual
    from vlm_treegrpo.policy.vlm import tiny_vlm_policy

    policy = tiny_vlm_policy("qwen2-vl", "cuda", dtype="float32")
    prompts = [policy.encode(ex, "") for ex in make_visual(3, seed=1)]
    out = {}
    for reuse in (False, True):
        policy.reuse_thought_cache = reuse
        torch.manual_seed(0)
        with torch.no_grad():
            out[reuse] = _shapes(policy.sample(prompts, 3, 2, 6, 4, SamplingParams(temperature=1.0), ["e", "\n"]))
    assert out[True] == out[False]


def test_compiled_decode_equals_eager_on_cuda():
    from vlm_treegrpo.rollout.tree import sample_trees

    model, tok, prompts = _text()
    out = {}
    for compile_ in (False, True):
        torch.manual_seed(0)
        out[compile_] = _shapes(sample_trees(model, tok, prompts, 2, 2, 6, 4, SamplingParams(temperature=1.0, compile=compile_), ["e"]))
    assert out[True] == out[False]


def test_dropping_finished_rows_samples_what_one_call_samples_on_cuda():
    """On the device too (fp64, so a smaller batch's kernels cannot move a draw)."""
    from vlm_treegrpo.rollout.tree import sample_trees

    model, tok, prompts = _text()
    model = model.double()
    model.generation_config.eos_token_id = [tok.eos_token_id, *range(300, 380)]
    calls, orig = [], model.generate
    model.generate = lambda **kw: calls.append(kw["input_ids"].shape[0]) or orig(**kw)
    out, n_calls = {}, {}
    for drop in (False, True):
        calls.clear()
        torch.manual_seed(0)
        out[drop] = _shapes(sample_trees(model, tok, prompts, 4, 3, 16, 12, SamplingParams(temperature=1.0, drop_finished=drop), ["1", "e"]))
        n_calls[drop] = len(calls)
    assert out[True] == out[False]
    assert n_calls[False] == 2 and n_calls[True] > 2  # rows were dropped along the way


def test_graph_decode_replays_a_captured_step_and_samples_what_eager_samples_on_cuda(monkeypatch):
    """``rollout.decode_graphs``: the step is captured once per batch shape and replayed. In fp32
    a tree is the one eager decoding samples; after an in-place weight change (as an optimizer
    step makes) the same shape replays its graph, which reads the new weights; under bf16
    autocast the replay samples what the same loop samples uncaptured."""
    import dataclasses

    from vlm_treegrpo.rollout import graphs
    from vlm_treegrpo.rollout.tree import sample_trees

    model, tok, prompts = _text()
    sampling = SamplingParams(temperature=1.0)

    def tree(on, seed=0):
        torch.manual_seed(seed)
        return _shapes(sample_trees(model, tok, prompts, 3, 2, 8, 5, dataclasses.replace(sampling, graphs=on), ["e", "\n"]))

    def flat(on, seed=0):  # (3 prompts x 4 samples: always 12 rows, one 16-row graph)
        torch.manual_seed(seed)
        return _shapes(sample_trees(model, tok, prompts, 4, 1, 6, 0, dataclasses.replace(sampling, graphs=on), []))

    assert tree(True) == tree(False)
    assert flat(True) == flat(False)
    assert not graphs.STATS.failures, graphs.STATS.failures
    captured, replays = graphs.STATS.captured, graphs.STATS.replays
    assert captured > 0 and replays > 0
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(0.5)  # in place
    assert flat(True, 1) == flat(False, 1)
    assert graphs.STATS.captured == captured and graphs.STATS.replays > replays  # the old graph, the new weights

    graphs._POOLS.pop(model, None)
    with monkeypatch.context() as m, torch.autocast("cuda", dtype=torch.bfloat16):
        m.setattr(graphs.StepGraph, "capture", lambda self, model, stats: setattr(self, "tried", True))
        uncaptured = flat(True, 2)  # (the same loop, each step's forward eager)
    graphs._POOLS.pop(model, None)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert flat(True, 2) == uncaptured == flat(True, 2)  # captured on the first call, replayed on both
    assert graphs.STATS.captured > captured and not graphs.STATS.failures


def test_graph_decode_of_a_vlm_tree_samples_what_eager_samples_on_cuda():
    """``rollout.decode_graphs`` on Qwen2-VL (fp32): mRoPE positions from the row state, the
    steps captured without image inputs."""
    from vlm_treegrpo.data.visual import make_visual
    from vlm_treegrpo.rollout import graphs
    from vlm_treegrpo.policy.vlm import tiny_vlm_policy

    policy = tiny_vlm_policy("qwen2-vl", "cuda", dtype="float32")
    prompts = [policy.encode(ex, "") for ex in make_visual(3, seed=1)]
    replays = graphs.STATS.replays
    out = {}
    for on in (False, True):
        torch.manual_seed(0)
        with torch.no_grad():
            out[on] = _shapes(policy.sample(prompts, 3, 2, 6, 4, SamplingParams(temperature=1.0, graphs=on), ["e", "\n"]))
    assert out[True] == out[False]
    assert graphs.STATS.replays > replays and not graphs.STATS.failures, graphs.STATS.failures
