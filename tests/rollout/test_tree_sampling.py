"""Tree sampling on a tiny model: shapes, budgets, branch points, reproducibility."""
from __future__ import annotations

import torch

from vlm_treegrpo.data.arithmetic import make_arithmetic
from vlm_treegrpo.models.tiny import build_tiny_llama
from vlm_treegrpo.rollout.prompts import prompt_ids
from vlm_treegrpo.rollout.tree import SamplingParams, generate, sample_trees


def _setup(n=3):
    model, tok = build_tiny_llama(seed=0)
    exs = make_arithmetic(n, seed=0)
    return model, tok, [prompt_ids(tok, e, "") for e in exs]


def test_tree_shapes_and_budgets():
    model, tok, prompts = _setup()
    K, M, TT, TA = 3, 2, 5, 4
    trees = sample_trees(model, tok, prompts, K, M, TT, TA, SamplingParams(temperature=1.0), ["\n\n"])
    assert len(trees) == len(prompts)
    for tree, p in zip(trees, prompts):
        assert tree.prompt_ids == p
        assert len(tree.thoughts) == K and len(tree.answers) == K
        for k in range(K):
            assert 1 <= len(tree.thoughts[k]) <= TT
            assert len(tree.answers[k]) == M
            for m in range(M):
                if tree.thought_done[k]:
                    assert tree.answers[k][m] == []
                    assert tree.thoughts[k][-1] == tok.eos_token_id
                else:
                    assert 1 <= len(tree.answers[k][m]) <= TA


def test_flat_k_by_1_has_no_continuations():
    model, tok, prompts = _setup(2)
    trees = sample_trees(model, tok, prompts, 4, 1, 6, 0, SamplingParams(), [])
    for tree in trees:
        assert len(tree.thoughts) == 4 and all(a == [[]] for a in tree.answers)


def test_same_seed_same_trees():
    model, tok, prompts = _setup(2)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        trees = sample_trees(model, tok, prompts, 2, 2, 5, 4, SamplingParams(temperature=1.0), [])
        runs.append([(t.thoughts, t.answers) for t in trees])
    assert runs[0] == runs[1]


def test_thought_stops_at_delimiter():
    model, tok, prompts = _setup(1)
    # Make the tiny model always emit a blank line: huge bias on the "\n\n" pieces.
    nl = tok("\n\n", add_special_tokens=False)["input_ids"]
    bias = torch.zeros(model.config.vocab_size)
    bias[nl[0]] = 100.0
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    try:
        outs, ended = generate(model, tok, prompts * 2, 1, 10, SamplingParams(greedy=True), ["\n\n"])
    finally:
        hook.remove()
    for ids, e in zip(outs, ended):
        assert not e
        assert "\n\n" in tok.decode(ids)
        assert len(ids) < 10


def test_continuations_from_the_thought_cache_sample_what_a_new_prefill_samples(monkeypatch):
    """The continuation pass starts from the thought pass's KV cache (no second prefill of
    prompt + thought) and samples the same tokens as prefilling prompt + thought again, with
    thoughts cut at different lengths by a frequent delimiter and some ended by EOS."""
    import vlm_treegrpo.rollout.tree as T

    model, tok, prompts = _setup(4)
    model.generation_config.eos_token_id = [tok.eos_token_id, *range(300, 420)]  # some thoughts end with "EOS"
    sampling = SamplingParams(temperature=1.0)
    K, M, delims = 3, 2, ["1", "e", "\n"]

    def fresh_gen(seqs, n, max_new_tokens, stop):
        return generate(model, tok, seqs, n, max_new_tokens, sampling, stop)

    torch.manual_seed(3)
    want = T.grow_trees(prompts, list, lambda p, th: list(p) + th, fresh_gen, K, M, 8, 5, delims)
    prefills, made = [], []
    prefill, cont = T.prefill_shared, T.continuation_cache
    monkeypatch.setattr(T, "prefill_shared", lambda *a, **kw: prefills.append(1) or prefill(*a, **kw))
    monkeypatch.setattr(T, "continuation_cache", lambda *a, **kw: made.append(cont(*a, **kw)) or made[-1])
    torch.manual_seed(3)
    got = sample_trees(model, tok, prompts, K, M, 8, 5, sampling, delims)
    assert len(prefills) == 1  # the prompts, once; not prompt + thought again
    assert len(made) == 1 and made[0] is not None  # the continuations' cache came from the thought pass
    lens = {len(th) for t in want for th, done in zip(t.thoughts, t.thought_done) if not done}
    assert len(lens) > 1  # thoughts of several lengths were continued
    assert 0 < sum(d for t in want for d in t.thought_done) < len(prompts) * K  # and some were not (EOS)
    for a, b in zip(got, want):
        assert (a.thoughts, a.thought_done, a.answers) == (b.thoughts, b.thought_done, b.answers)

