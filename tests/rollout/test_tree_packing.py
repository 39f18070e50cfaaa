"""Packed trees score every leaf exactly as the separate sequences would."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vlm_treegrpo.core.tree_packing import predictor_positions, tree_attention_mask, tree_positions
from vlm_treegrpo.models.tiny import build_tiny_llama
from vlm_treegrpo.rollout.logprobs import packed_logp
from vlm_treegrpo.rollout.packing import pack_trees
from vlm_treegrpo.rollout.tree import Tree


def _seq_logp(model, ids: list[int], start: int) -> torch.Tensor:
    """Log-probs of ids[start:] given everything before, from one plain causal forward."""
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits.float()[0]  # [T, V]
    lp = logits.log_softmax(-1)
    return torch.stack([lp[t - 1, ids[t]] for t in range(start, len(ids))])


def test_tree_mask_positions_and_predictors_on_hand_example():
    # segments: 0 = prompt (2 tokens), 1 = thought (1), 2 = answer under 1 (2), 3 = thought (1)
    parent = torch.tensor([-1, 0, 1, 0])
    seg_len = torch.tensor([2, 1, 2, 1])
    seg = torch.tensor([0, 0, 1, 2, 2, 3])
    mask = tree_attention_mask(seg, parent)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 0, 0, 0, 1],  # second thought sees the prompt, not the first branch
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    assert tree_positions(seg, parent, seg_len).tolist() == [0, 1, 2, 3, 4, 2]
    assert predictor_positions(seg, parent, seg_len).tolist() == [-1, 0, 1, 2, 3, 1]


def _make_trees(tok) -> list[Tree]:
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id
    t1 = Tree(prompt_ids=enc("Tom has 3 apples."), thoughts=[enc(" He buys"), enc(" So 3 + 1") + [eos]],
              thought_done=[False, True], answers=[[enc(" 4 more."), enc(" two pens, 5")], [[], []]])
    t2 = Tree(prompt_ids=enc("Anna has twelve coins and loses 2."), thoughts=[enc(" Then 10"), enc(" 12 - 2")],
              thought_done=[False, False], answers=[[enc(" coins."), enc("!")], [enc(" = 10"), enc(" is 10.")]])
    return [t1, t2]


def test_packed_logp_equals_separate_sequences():
    model, tok = build_tiny_llama(seed=1)
    trees = _make_trees(tok)
    K, M = 2, 2
    thought_adv = torch.tensor([[0.5, -0.5], [1.0, -1.0]])
    answer_adv = torch.arange(8, dtype=torch.float32).view(2, K, M)
    packed = pack_trees(trees, thought_adv, answer_adv, tok.pad_token_id)
    with torch.no_grad():
        logp = packed_logp(model, packed)  # [2, L]
    for n, tree in enumerate(trees):
        got = logp[n][packed.target_mask[n] > 0]
        want, advs = [], []
        for k in range(K):
            ids = tree.prompt_ids + tree.thoughts[k]
            want.append(_seq_logp(model, ids, len(tree.prompt_ids)))
            advs += [thought_adv[n, k].item()] * len(tree.thoughts[k])
            for m in range(M):
                if tree.answers[k][m]:
                    full = ids + tree.answers[k][m]
                    want.append(_seq_logp(model, full, len(ids)))
                    advs += [answer_adv[n, k, m].item()] * len(tree.answers[k][m])
        assert_close(got, torch.cat(want), atol=1e-5, rtol=1e-5)
        assert_close(packed.advantages[n][packed.target_mask[n] > 0], torch.tensor(advs))


def test_padding_rows_do_not_change_logp():
    model, tok = build_tiny_llama(seed=2)
    trees = _make_trees(tok)
    adv_t, adv_a = torch.zeros(2, 2), torch.zeros(2, 2, 2)
    both = pack_trees(trees, adv_t, adv_a, tok.pad_token_id)
    alone = pack_trees(trees[:1], adv_t[:1], adv_a[:1], tok.pad_token_id)
    with torch.no_grad():
        lp_both = packed_logp(model, both)[0]
        lp_alone = packed_logp(model, alone)[0]
    L = alone.input_ids.shape[1]
    assert_close(lp_both[:L], lp_alone, atol=1e-5, rtol=1e-5)
    assert both.target_mask[0, L:].sum() == 0


def test_packed_forward_switches_flash_attention_to_a_mask_capable_kernel():
    from vlm_treegrpo.rollout.attention import tree_attention

    model, tok = build_tiny_llama(seed=3)
    trees = _make_trees(tok)
    packed = pack_trees(trees, torch.zeros(2, 2), torch.zeros(2, 2, 2), tok.pad_token_id)
    with torch.no_grad():
        want = packed_logp(model, packed)
    model.config._attn_implementation = "flash_attention_2"  # as a CUDA load with flash-attn gives
    with tree_attention(model, packed.plan()):
        assert model.config._attn_implementation == "vlm_treegrpo"
    assert model.config._attn_implementation == "flash_attention_2"
    with torch.no_grad():
        got = packed_logp(model, packed)  # would fail inside a flash kernel without the switch
    assert_close(got, want)


def test_packed_batch_builds_its_dense_mask_from_the_segments_on_demand():
    """pack_trees builds no dense mask; mask() is each row's tree_attention_mask (padding to
    itself), and the dense batch scores the same log-probs."""
    from vlm_treegrpo.rollout.packing import PackedBatch

    model, tok = build_tiny_llama(seed=3)
    packed = pack_trees(_make_trees(tok), torch.zeros(2, 2), torch.zeros(2, 2, 2), tok.pad_token_id)
    assert packed.attention_mask is None
    L = packed.input_ids.shape[1]
    for n, row in enumerate(packed.segments):
        start, length, parent = row.unbind(-1)
        seg = torch.full((L,), -1)
        for s, (a, b) in enumerate(zip(start.tolist(), length.tolist())):
            seg[a:a + b] = s
        assert torch.equal(packed.mask()[n], tree_attention_mask(seg, parent, seg >= 0))
    dense = packed.dense()
    with torch.no_grad():
        assert_close(packed_logp(model, dense), packed_logp(model, packed), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dense attention mask or its segment table"):
        PackedBatch(**{**{f: getattr(packed, f) for f in packed.__dataclass_fields__}, "segments": None})
