"""grow_trees / generate_batch (vlm_treegrpo.rollout.tree): the K x M bookkeeping over any prompt
type and generate function, and suppressed token ids."""
from __future__ import annotations

import torch

from vlm_treegrpo.models.tiny import build_tiny_llama
from vlm_treegrpo.rollout.tree import SamplingParams, generate_batch, grow_trees, left_pad


def test_grow_trees_bookkeeping_with_a_scripted_generator():
    calls = []

    def gen(items, n, max_new_tokens, stop):
        calls.append((list(items), n, max_new_tokens, stop))
        outs = [[100 * len(calls) + 10 * i + j] for i in range(len(items)) for j in range(n)]
        ended = [len(calls) == 1 and (i, j) == (0, 1) for i in range(len(items)) for j in range(n)]  # prompt 0, thought 1 ends
        return outs, ended

    prompts = [("p0", [1, 2]), ("p1", [3])]
    trees = grow_trees(prompts, lambda p: p[1], lambda p, th: (p[0] + "+", p[1] + th), gen, 2, 3, 8, 4, ["\n\n"])
    assert [c[1:] for c in calls] == [(2, 8, ["\n\n"]), (3, 4, None)]
    assert calls[1][0] == [("p0+", [1, 2, 100]), ("p1+", [3, 110]), ("p1+", [3, 111])]  # unfinished thoughts only
    assert trees[0].prompt == prompts[0] and trees[0].prompt_ids == [1, 2]
    assert trees[0].thoughts == [[100], [101]] and trees[0].thought_done == [False, True]
    assert trees[0].answers == [[[200], [201], [202]], [[], [], []]]
    assert trees[1].answers == [[[210], [211], [212]], [[220], [221], [222]]]
    flat = grow_trees(prompts, lambda p: p[1], None, gen, 2, 1, 5, 0, ["\n\n"])
    assert calls[-1][1:] == (2, 5, None)  # flat GRPO: one pass, no branch delimiters
    assert all(t.answers == [[[]], [[]]] and t.thought_done == [True, True] for t in flat)


def test_generate_batch_never_emits_suppressed_ids():
    model, tok = build_tiny_llama(seed=0)
    ids, mask = left_pad([tok.encode("1 + 2 =")] * 2, tok.pad_token_id, "cpu")
    inputs = {"input_ids": ids, "attention_mask": mask}
    greedy = SamplingParams(greedy=True)
    free, _ = generate_batch(model, tok, inputs, 1, 6, greedy)
    first = free[0][0]
    held, _ = generate_batch(model, tok, inputs, 1, 6, greedy, suppress_ids=[first])
    assert first not in sum(held, []) and held[0][0] != first
    torch.manual_seed(0)
    free, _ = generate_batch(model, tok, inputs, 8, 6, SamplingParams(temperature=0.05))  # near-greedy draws
    banned = sorted({t for row in free for t in row[:2]})
    torch.manual_seed(0)
    held, _ = generate_batch(model, tok, inputs, 8, 6, SamplingParams(temperature=0.05), suppress_ids=banned)
    assert not set(banned) & set(sum(held, []))  # the sampled path (the Sampler) suppresses too
