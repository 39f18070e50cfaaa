"""The per-segment attention plan is the tree mask, computed segment by segment."""
from __future__ import annotations

import pytest
import torch

from vlm_treegrpo.core.tree_packing import segment_mask, segment_plan, segment_table, tree_attention_mask
from vlm_treegrpo.rollout.packing import segment_tables


def _dense_from_plan(plan) -> torch.Tensor:
    """``[N*W, N*W]`` bool: query i may attend key j, as the plan's groups say."""
    NW = plan.rows * plan.width
    dense = torch.zeros(NW, NW, dtype=torch.bool)
    for g in plan.groups:
        for s in range(g.q_index.shape[0]):
            for i in range(g.q_index.shape[1]):
                if g.q_valid[s, i]:
                    dense[g.q_index[s, i], g.k_index[s][g.mask[s, 0, i]]] = True
    return dense


ROWS = [  # (seg_len, parent) of one row each: prompt, thoughts, continuations in packing order
    ([3, 2, 1, 2, 2], [-1, 0, 1, 1, 0]),
    ([4, 1, 3], [-1, 0, 0]),
    ([2, 2, 1, 1, 1, 1], [-1, 0, 1, 1, 0, 4]),
]


def test_segment_plan_is_the_tree_mask_block_diagonal_over_rows():
    W = max(sum(lens) for lens, _ in ROWS) + 2  # padding at the end of every row
    plan = segment_plan(segment_tables([segment_table(lens, par) for lens, par in ROWS]), W)
    want = torch.zeros(len(ROWS) * W, len(ROWS) * W, dtype=torch.bool)
    real = torch.zeros(len(ROWS) * W, dtype=torch.bool)
    for n, (lens, par) in enumerate(ROWS):
        seg_ids = torch.full((W,), -1)
        seg_ids[: sum(lens)] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        m = tree_attention_mask(seg_ids, torch.tensor(par), seg_ids >= 0)
        m &= (seg_ids >= 0)[:, None]  # padding is no query here
        want[n * W:(n + 1) * W, n * W:(n + 1) * W] = m
        real[n * W: n * W + sum(lens)] = True
    assert torch.equal(_dense_from_plan(plan), want)
    assert sorted(plan.out_index.tolist()) == real.nonzero().flatten().tolist()  # every real token once
    assert [g.q_index.shape[0] for g in plan.groups] == [3, 6, 5]  # prompts, then depth 1, then depth 2
    for g in plan.groups:  # padding queries see key 0 only: no empty softmax row
        assert torch.equal(g.mask[:, 0].any(-1), torch.ones_like(g.q_valid))
        assert torch.equal(g.q_index.view(-1)[g.q_keep], g.q_index[g.q_valid])  # q_keep picks the real queries, in order


def test_segment_plan_needs_far_fewer_scores_than_the_dense_mask():
    # a 4 x 4 tree of 16 + 24 tokens behind a 60-token prompt, as the bench's
    lens, par = [60], [-1]
    for k in range(4):
        par.append(0)
        lens.append(16)
        t = len(lens) - 1
        for _ in range(4):
            par.append(t)
            lens.append(24)
    plan = segment_plan(segment_table(lens, par)[None], sum(lens))
    assert plan.scores() == 60 * 60 + 4 * 16 * 76 + 16 * 24 * 100
    assert plan.scores() * 5 < sum(lens) ** 2


def test_segment_plan_rejects_a_child_before_its_parent():
    with pytest.raises(ValueError, match="parents must come first"):
        segment_plan(torch.tensor([[[0, 2, -1], [2, 1, 2], [3, 1, 0]]]), 4)
    with pytest.raises(ValueError, match="segment 1 of row 0 has parent 2"):
        segment_mask(torch.tensor([[[0, 2, -1], [2, 1, 2], [3, 1, 0]]]), 4)


def test_segment_mask_is_each_rows_tree_attention_mask():
    W = max(sum(lens) for lens, _ in ROWS) + 2
    got = segment_mask(segment_tables([segment_table(lens, par) for lens, par in ROWS]), W)
    assert got.shape == (len(ROWS), W, W)
    for n, (lens, par) in enumerate(ROWS):
        seg_ids = torch.full((W,), -1)
        seg_ids[: sum(lens)] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        assert torch.equal(got[n], tree_attention_mask(seg_ids, torch.tensor(par), seg_ids >= 0))
    assert torch.equal(got[0, -1], torch.eye(W, dtype=torch.bool)[-1])  # padding attends to itself only


def test_segment_table_lays_segments_out_one_after_another():
    assert segment_table([3, 2, 4], [-1, 0, 1], first=5).tolist() == [[5, 3, -1], [8, 2, 0], [10, 4, 1]]
