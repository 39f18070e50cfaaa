"""RREDCoT credit on the tiny Llama: redistribution, token placement, and the packed probe forward."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vlm_treegrpo.config import ConfigError, config_from_dict
from vlm_treegrpo.credit.rredcot import RRedCoT, rredcot_for
from vlm_treegrpo.data.types import Example
from vlm_treegrpo.models.tiny import build_tiny_llama
from vlm_treegrpo.policy.text import TextPolicy
from vlm_treegrpo.rollout.packing import pack_trees
from vlm_treegrpo.rollout.tree import Tree

K, M = 2, 2


@pytest.fixture(scope="module")
def setup():
    model, tok = build_tiny_llama(seed=3)
    policy = TextPolicy(model, tok)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id
    t1 = Tree(prompt_ids=enc("Tom has 3 apples and buys 6."), thoughts=[enc(" First 3 + 6 = 9.\n So"), enc(" We add\n\n")],
              thought_done=[False, False],
              answers=[[enc(" it is 9\nAnswer: 9"), enc(" Therefore 10\nAnswer: 10")], [enc(" Step two\n 12"), enc("Answer: 9")]])
    t2 = Tree(prompt_ids=enc("Anna has 12 coins and loses 7."), thoughts=[enc(" It is 5\nAnswer: 5") + [eos], enc(" 12 - 7\n")],
              thought_done=[True, False], answers=[[[], []], [enc(" = 5\nAnswer: 5"), enc(" = 4")]])
    trees = [t1, t2]
    examples = [Example("Tom has 3 apples and buys 6.", "9"), Example("Anna has 12 coins and loses 7.", "5")]
    rewards = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 0.0]]])  # [N, K, M]
    texts = policy.decode([t.leaf_ids(k, m) for t in trees for k in range(K) for m in range(M)])
    packed = pack_trees(trees, torch.zeros(2, K), torch.zeros(2, K, M), tok.pad_token_id)
    return policy, trees, examples, rewards, texts, packed


def _credit(policy, values="answer_prob", segmenter="delimiters"):
    return RRedCoT(policy.tokenizer, segmenter=segmenter, values=values, min_len=1)


@pytest.mark.parametrize("values, segmenter", [("answer_prob", "delimiters"), ("importance", "hybrid"), ("answer_prob", "entropy")])
def test_segment_rewards_sum_to_the_return_of_each_leaf(setup, values, segmenter):
    policy, trees, examples, rewards, texts, packed = setup
    res = _credit(policy, values, segmenter).assign(policy, trees, examples, rewards, packed, texts)
    assert res.valid.sum(1).min() >= 1
    assert_close(res.seg_rewards.sum(1), rewards.reshape(-1).double(), atol=1e-9, rtol=0)
    assert torch.isfinite(res.seg_adv).all() and bool((res.seg_adv != 0).any())


def test_delimiters_split_leaves_and_thought_boundary(setup):
    policy, trees, examples, rewards, texts, packed = setup
    res = _credit(policy).assign(policy, trees, examples, rewards, packed, texts)
    # leaf (0, 0, 0): " First 3 + 6 = 9.\n" | " So" | " it is 9\n" | "Answer: 9" -> 4 segments
    assert int(res.valid[0].sum()) == 4
    # the thought's segments are shared by its M leaves
    lt = len(trees[0].thoughts[0])
    assert torch.equal(res.seg_id[0, :lt], res.seg_id[1, :lt])


def test_token_advantages_zero_off_target_and_thoughts_take_the_mean_of_their_leaves(setup):
    policy, trees, examples, rewards, texts, packed = setup
    res = _credit(policy).assign(policy, trees, examples, rewards, packed, texts)
    assert bool((res.advantages[packed.target_mask == 0] == 0).all())
    assert bool((res.token_adv[res.seg_id < 0] == 0).all())
    assert bool((res.advantages[packed.target_mask > 0] != 0).any())
    off = len(trees[0].prompt_ids)
    lt = len(trees[0].thoughts[0])
    assert_close(res.advantages[0, off : off + lt], res.token_adv[0:2, :lt].mean(0))
    la = len(trees[0].answers[0][1])
    start = off + lt + len(trees[0].answers[0][0])
    assert_close(res.advantages[0, start : start + la], res.token_adv[1, lt : lt + la])


def _plain_logp_sum(model, context: list[int], scored: list[int]) -> float:
    ids = torch.tensor([context + scored])
    lp = model(input_ids=ids).logits.float()[0].log_softmax(-1)  # [T, V]
    return sum(float(lp[len(context) + t - 1, tok]) for t, tok in enumerate(scored))


def test_answer_prob_values_from_one_packed_forward_equal_separate_forwards(setup):
    policy, trees, examples, rewards, texts, packed = setup
    credit = _credit(policy)
    res = credit.assign(policy, trees, examples, rewards, packed, texts)
    model = policy.model
    checked = 0
    with torch.no_grad():
        for b in range(res.leaf_ids.shape[0]):
            tree, ex = trees[b // (K * M)], examples[b // (K * M)]
            gold = credit.answer_tokens(ex.answer)
            n_seg = int(res.valid[b].sum())
            ends = [int((res.seg_id[b] == i).nonzero().max()) for i in range(n_seg)]
            prefixes = [[]] + [res.leaf_ids[b, : e + 1].tolist() for e in ends[:-1]]  # s_0 .. s_{n-1}
            for i, pre in enumerate(prefixes):
                want = _plain_logp_sum(model, list(tree.prompt_ids) + pre + credit.prefix_ids, gold)
                assert abs(float(res.values[b, i].log()) - want) < 1e-5
                checked += 1
            assert torch.isnan(res.values[b, n_seg])  # after the last segment the return is used
    assert checked >= 20


def test_rredcot_needs_a_text_policy_and_a_mean_baseline():
    algo = config_from_dict({}, ["algo.credit=rredcot"]).algo
    with pytest.raises(ConfigError, match=r"^algo.credit: rredcot is implemented for text policies"):
        rredcot_for(object(), algo, 1.0)
    with pytest.raises(ConfigError, match=r"^algo.baseline"):
        config_from_dict({"rollout": {"K": 4, "M": 1}}, ["algo.credit=rredcot", "algo.baseline=rloo"])
