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
