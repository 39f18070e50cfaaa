"""Closed-form score features equal autograd's gradient w.r.t. the final norm weight (rescaled)."""
from __future__ import annotations

import torch
from torch.testing import assert_close

from vlm_treegrpo.models.tiny import build_tiny_llama
from vlm_treegrpo.rollout.logprobs import packed_logp
from vlm_treegrpo.rollout.packing import pack_trees
from vlm_treegrpo.rollout.tree import Tree
from vlm_treegrpo.rollout.scores import check_spans, token_score_features, weighted_row_sums


def _trees(tok):
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [
        Tree(enc("Tom has 3 apples."), [enc(" He buys"), enc(" So 3 + 1") + [tok.eos_token_id]], [False, True],
             [[enc(" 4 more."), enc(" two, 5")], [[], []]]),
        Tree(enc("Anna has 12 coins."), [enc(" Then 10"), enc(" 12 - 2")], [False, False],
             [[enc(" coins."), enc("!")], [enc(" = 10"), enc(" is 10.")]]),
    ]


def test_per_prompt_features_equal_autograd_gradient_of_final_norm_weight():
    model, tok = build_tiny_llama(seed=4)
    trees = _trees(tok)
    packed = pack_trees(trees, torch.tensor([[0.5, -1.0], [1.5, -0.5]]), torch.arange(8.0).view(2, 2, 2) - 3, tok.pad_token_id)
    temperature = 0.7
    psi = token_score_features(model, packed, temperature)  # [N, L, H]
    got = weighted_row_sums(psi, packed.advantages)  # [N, H]
    w = model.model.norm.weight
    for n in range(2):
        logp = packed_logp(model, packed.rows(slice(n, n + 1)), temperature)  # [1, L]
        (grad,) = torch.autograd.grad((packed.advantages[n] * logp[0]).sum(), w)
        assert_close(got[n], grad * w.detach(), atol=1e-5, rtol=1e-4)
    assert bool((psi[packed.target_mask == 0] == 0).all())


def test_spans_follow_pack_order_and_fail_loudly_otherwise():
    _, tok = build_tiny_llama(seed=4)
    trees = _trees(tok)
    packed = pack_trees(trees, torch.zeros(2, 2), torch.zeros(2, 2, 2), tok.pad_token_id)
    th, ans = check_spans(trees[0], packed.input_ids[0])
    assert th[0][0] == len(trees[0].prompt_ids) and ans[1] == [None, None]
    try:
        check_spans(trees[1], packed.input_ids[0])
    except RuntimeError:
        pass
    else:
        raise AssertionError("a wrong row must be rejected")
