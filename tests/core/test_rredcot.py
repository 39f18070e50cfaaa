"""Hand-computed checks for vlm_treegrpo.core.rredcot."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from vlm_treegrpo.core.rredcot import (
    answer_prob_values,
    correlation,
    importance_values,
    redistribute,
    segment_advantages,
    segment_by_delimiters,
    segment_by_entropy,
    segment_ends,
    segment_hybrid,
    token_advantages_from_segments,
)

F64 = torch.float64
NAN = float("nan")
DELIM = torch.tensor([9])


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def L(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.long)


def B(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.bool)


# ---------------------------------------------------------------- segment_by_delimiters


def test_delimiters_hand_example_1d():
    ids = L([5, 1, 9, 9, 1, 7, 1, 3])
    mask = torch.ones(8, dtype=torch.bool)
    # a delimiter ends its segment: new segments start at 3 and at 4
    assert torch.equal(segment_by_delimiters(ids, mask, DELIM), L([0, 0, 0, 1, 2, 2, 2, 2]))
    # list of ids is accepted; min_len=2 keeps the start at 3, drops 4 (1 token after 3)
    seg = segment_by_delimiters(ids, mask, [9], min_len=2)
    assert torch.equal(seg, L([0, 0, 0, 1, 1, 1, 1, 1]))
    # two kinds of delimiters
    assert torch.equal(segment_by_delimiters(ids, mask, L([9, 7])), L([0, 0, 0, 1, 2, 2, 3, 3]))


def test_delimiters_last_token_makes_no_empty_segment():
    ids = L([1, 9, 2, 9])
    seg = segment_by_delimiters(ids, torch.ones(4, dtype=torch.bool), DELIM)
    assert torch.equal(seg, L([0, 0, 1, 1]))
    ends, valid = segment_ends(seg.unsqueeze(0))
    assert torch.equal(ends, L([[1, 3]])) and bool(valid.all())


def test_delimiters_min_len_keeps_last_segment_long_enough():
    # a start at 6 would leave 2 tokens < min_len=3 -> dropped
    ids = L([1, 1, 9, 1, 1, 9, 1, 1])
    seg = segment_by_delimiters(ids, torch.ones(8, dtype=torch.bool), DELIM, min_len=3)
    assert torch.equal(seg, L([0, 0, 0, 1, 1, 1, 1, 1]))


def test_delimiters_padding_and_holes_do_not_matter():
    core = [5, 9, 1, 1, 9, 2]
    expected = L([0, 0, 1, 1, 1, 2])
    # right padding, left padding (pad id is a delimiter on purpose), and a masked hole
    ids = L([core + [9, 9], [9, 9] + core, [5, 9, 1, 9, 1, 9, 2, 0]])
    mask = B([[1] * 6 + [0, 0], [0, 0] + [1] * 6, [1, 1, 1, 0, 1, 1, 1, 0]])
    seg = segment_by_delimiters(ids, mask, DELIM)
    assert torch.equal(seg[0], torch.cat([expected, L([-1, -1])]))
    assert torch.equal(seg[1], torch.cat([L([-1, -1]), expected]))
    assert torch.equal(seg[2], L([0, 0, 1, -1, 1, 1, 2, -1]))
    # batched equals row by row
    for b in range(3):
        assert torch.equal(segment_by_delimiters(ids[b], mask[b], DELIM), seg[b])


def test_delimiters_all_masked_row():
    seg = segment_by_delimiters(L([[1, 9, 2], [9, 9, 9]]), B([[1, 1, 1], [0, 0, 0]]), DELIM)
    assert torch.equal(seg, L([[0, 0, 1], [-1, -1, -1]]))


# ---------------------------------------------------------------- segment_by_entropy / hybrid

# sorted: .1 x5, .2, .2, .3, 2, 3; 0.7-quantile at position 6.3 -> 0.2 + 0.3 * 0.1 = 0.23
ENT = [0.1, 0.2, 3.0, 0.1, 0.2, 0.3, 2.0, 0.1, 0.1, 0.1]


def test_entropy_hand_example():
    ent = t([ENT])
    mask = torch.ones(1, 10, dtype=torch.bool)
    # above 0.23: indices 2, 5, 6; min_len=2 keeps 2 and 5, drops 6 (1 after 5)
    assert torch.equal(segment_by_entropy(ent, mask, 0.7, 2), L([[0, 0, 1, 1, 1, 2, 2, 2, 2, 2]]))
    # min_len=1 keeps all three
    assert torch.equal(segment_by_entropy(ent, mask, 0.7, 1), L([[0, 0, 1, 1, 1, 2, 3, 3, 3, 3]]))
    # min_len=4: 2 is too early (< 4 after 0), 5 ok, 6 too close
    assert torch.equal(segment_by_entropy(ent, mask, 0.7, 4), L([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]]))


def test_entropy_constant_row_is_one_segment():
    seg = segment_by_entropy(torch.full((2, 6), 0.5), torch.ones(2, 6, dtype=torch.bool), 0.9, 1)
    assert torch.equal(seg, torch.zeros(2, 6, dtype=torch.long))


def test_entropy_masked_tokens_do_not_matter():
    ent = t([ENT + [100.0, 100.0], [100.0] + ENT + [-5.0]])
    mask = B([[1] * 10 + [0, 0], [0] + [1] * 10 + [0]])
    seg = segment_by_entropy(ent, mask, 0.7, 2)
    ref = L([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    assert torch.equal(seg[0, :10], ref) and torch.equal(seg[1, 1:11], ref)
    assert bool((seg[~mask] == -1).all())


def test_entropy_min_len_property_random():
    gen = torch.Generator().manual_seed(0)
    ent = torch.rand(6, 40, generator=gen)
    mask = torch.rand(6, 40, generator=gen) > 0.2
    for min_len in (1, 3, 5):
        seg = segment_by_entropy(ent, mask, 0.6, min_len)
        for b in range(6):  # test-side loop over a handful of rows
            ids = seg[b][mask[b]]
            counts = torch.bincount(ids)
            assert bool((counts > 0).all())  # ids contiguous 0 .. n-1
            assert bool(ids.diff().ge(0).all())  # non-decreasing
            if ids.numel() >= min_len:
                assert int(counts.min()) >= min_len


def test_hybrid_is_union_then_min_len():
    ids = L([[1, 1, 1, 9, 1, 1, 1, 1, 1, 1]])
    ent = t([[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 5.0, 0.1, 0.1]])
    mask = torch.ones(1, 10, dtype=torch.bool)
    # delimiter start at 4, entropy start at 7
    seg = segment_hybrid(ids, ent, mask, DELIM, 0.8, 1)
    assert torch.equal(seg, L([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2]]))
    # min_len=4 keeps 4, drops 7 (3 after 4)
    seg = segment_hybrid(ids, ent, mask, DELIM, 0.8, 4)
    assert torch.equal(seg, L([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]]))
    assert torch.equal(
        segment_hybrid(ids, ent, mask, DELIM, 0.8, 1)[0],
        segment_hybrid(ids[0], ent[0], mask[0], DELIM, 0.8, 1),
    )


# ---------------------------------------------------------------- segment_ends


def test_segment_ends_hand_example():
    seg = L([[0, 0, 1, 1, 1, 2, -1], [-1, 0, 0, 0, 1, -1, -1], [-1] * 7])
    ends, valid = segment_ends(seg)
    assert torch.equal(ends, L([[1, 4, 5], [3, 4, 0], [0, 0, 0]]))
    assert torch.equal(valid, B([[1, 1, 1], [1, 1, 0], [0, 0, 0]]))
    ends5, valid5 = segment_ends(seg, num_segments=5)
    assert ends5.shape == (3, 5) and torch.equal(valid5[:, :3], valid)
    assert not bool(valid5[:, 3:].any())
    with pytest.raises(ValueError):
        segment_ends(seg, num_segments=2)


# ---------------------------------------------------------------- redistribute

VALUES = [[0.2, 0.3, 0.5, NAN], [0.4, 0.1, 0.9, 0.6]]
VALID = [[1, 1, 0], [1, 1, 1]]
RETURNS = [1.0, 0.0]


def test_redistribute_hand_example():
    r = redistribute(t(VALUES), B(VALID), t(RETURNS))
    # row 0: 0.3-0.2, R-0.3 (V after the last segment := return); row 1: -0.3, 0.8, 0-0.9
    assert_close(r, t([[0.1, 0.7, 0.0], [-0.3, 0.8, -0.9]]))
    rb = redistribute(t(VALUES), B(VALID), t(RETURNS), include_baseline=True)
    assert_close(rb, t([[0.3, 0.7, 0.0], [0.1, 0.8, -0.9]]))


def test_redistribute_sums_to_return():
    gen = torch.Generator().manual_seed(1)
    values = torch.rand(5, 7, generator=gen, dtype=F64)
    n = L([6, 1, 3, 0, 4])
    valid = torch.arange(6).unsqueeze(0) < n.unsqueeze(1)
    returns = torch.rand(5, generator=gen, dtype=F64)
    r = redistribute(values, valid, returns)
    has = n > 0
    assert_close(r.sum(1)[has], (returns - values[:, 0])[has])
    assert_close(redistribute(values, valid, returns, True).sum(1)[has], returns[has])
    assert torch.equal(r[~has], torch.zeros(1, 6, dtype=F64))


def test_redistribute_padding_does_not_matter():
    r = redistribute(t(VALUES), B(VALID), t(RETURNS))
    values = torch.cat([t(VALUES), torch.full((2, 2), NAN, dtype=F64)], 1)
    valid = torch.cat([B(VALID), torch.zeros(2, 2, dtype=torch.bool)], 1)
    r_pad = redistribute(values, valid, t(RETURNS))
    assert_close(r_pad[:, :3], r) and torch.equal(r_pad[:, 3:], torch.zeros(2, 2, dtype=F64))


def test_redistribute_rejects_holes_and_bad_shapes():
    with pytest.raises(ValueError, match="left-aligned"):
        redistribute(t([[0.0, 0.1, 0.2]]), B([[0, 1]]), t([1.0]))
    with pytest.raises(ValueError):
        redistribute(t([[0.0, 0.1]]), B([[1, 1]]), t([1.0]))


# ---------------------------------------------------------------- segment_advantages

SEG_R = [[0.1, 0.7, 0.0], [0.5, -0.5, 0.2]]
SEG_VALID = [[1, 1, 0], [1, 1, 1]]
# reward-to-go: [0.8, 0.7 | 0.2, -0.3, 0.2]; group mean 1.6 / 5 = 0.32
CENTRED = [[0.48, 0.38, 0.0], [-0.12, -0.62, -0.12]]
GROUP_STD = math.sqrt((0.48**2 + 0.38**2 + 0.12**2 + 0.62**2 + 0.12**2) / 4)


def test_segment_advantages_hand_example():
    out = segment_advantages(t(SEG_R), B(SEG_VALID), L([0, 0]), scale="none")
    assert_close(out, t(CENTRED))
    out = segment_advantages(t(SEG_R), B(SEG_VALID), L([0, 0]))
    assert_close(out, t(CENTRED) / (GROUP_STD + 1e-6))


def test_segment_advantages_groups_are_independent():
    seg_r = t(SEG_R + [[3.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    valid = B(SEG_VALID + [[1, 1, 0], [1, 0, 0]])
    out = segment_advantages(seg_r, valid, L([7, 7, 3, 3]), scale="none")
    assert_close(out[:2], t(CENTRED))
    # group 3: rtg [4, 1 | 1], mean 2
    assert_close(out[2:], t([[2.0, -1.0, 0.0], [-1.0, 0.0, 0.0]]))


def test_segment_advantages_constant_group_and_padding():
    out = segment_advantages(t([[0.0, 0.5], [0.5, 0.0]]), B([[1, 1], [1, 0]]), L([0, 0]))
    assert torch.equal(out, torch.zeros(2, 2, dtype=F64))  # rtg all 0.5 -> exact zeros
    padded = torch.cat([t(SEG_R), t([[NAN], [NAN]])], 1)
    valid = torch.cat([B(SEG_VALID), B([[0], [0]])], 1)
    out = segment_advantages(padded, valid, L([0, 0]), scale="none")
    assert_close(out[:, :3], t(CENTRED)) and torch.equal(out[:, 3], torch.zeros(2, dtype=F64))


def test_token_advantages_from_segments():
    seg_adv = t([[1.0, -2.0, 0.0], [0.5, 0.0, 0.0]])
    seg_id = L([[0, 0, 1, 1, -1], [-1, 0, 0, -1, -1]])
    out = token_advantages_from_segments(seg_adv, seg_id)
    assert_close(out, t([[1.0, 1.0, -2.0, -2.0, 0.0], [0.0, 0.5, 0.5, 0.0, 0.0]]))


def test_pipeline_end_to_end():
    ids = L([[1, 9, 1, 1, 9, 1, 0], [0, 0, 1, 1, 9, 1, 1]])
    mask = B([[1, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1]])
    seg = segment_by_delimiters(ids, mask, DELIM)
    ends, valid = segment_ends(seg)
    assert torch.equal(ends, L([[1, 4, 5], [4, 6, 0]]))
    values = t([[0.5, 0.6, 0.8, NAN], [0.5, 0.2, NAN, NAN]])
    r = redistribute(values, valid, t([1.0, 0.0]))
    assert_close(r, t([[0.1, 0.2, 0.2], [-0.3, -0.2, 0.0]]))
    adv = segment_advantages(r, valid, L([0, 0]), scale="none")
    tok = token_advantages_from_segments(adv, seg)
    assert torch.equal(tok[~mask], torch.zeros(3, dtype=F64))
    assert_close(tok[0, :2], adv[0, 0].expand(2))


# ---------------------------------------------------------------- value estimators


def test_answer_prob_values():
    logp = t([[math.log(0.5), math.log(0.25)]])
    assert_close(answer_prob_values(logp), t([[0.5, 0.25]]))
    # geometric mean over 2 tokens
    assert_close(answer_prob_values(logp, 2, length_normalize=True), t([[0.5**0.5, 0.5]]))
    assert_close(answer_prob_values(logp, t([[1.0, 2.0]]), length_normalize=True), t([[0.5, 0.5]]))
    with pytest.raises(ValueError):
        answer_prob_values(logp, length_normalize=True)


def test_importance_values_self_normalized():
    # prefix 0: weights .25/.75; prefix 1: weights .5/.5 (shifted by a constant -> same weights)
    logp = t([[[math.log(0.25), math.log(0.75)], [3.0, 3.0]]])  # [1, 2, 2]
    rewards = t([[1.0, 0.0]])
    assert_close(importance_values(logp, rewards), t([[0.25, 0.5]]))
    assert_close(importance_values(logp + 7.0, rewards), t([[0.25, 0.5]]))
    # a masked continuation is excluded, an all-masked row gives 0
    logp3 = torch.cat([logp, t([[[10.0], [10.0]]])], dim=2)  # [1, 2, 3]
    rewards3 = t([[1.0, 0.0, 1.0]])
    assert_close(importance_values(logp3, rewards3, cont_mask=B([[1, 1, 0]])), t([[0.25, 0.5]]))
    mask3 = B([[[0, 0, 0], [1, 1, 0]]])
    assert_close(importance_values(logp3, rewards3, cont_mask=mask3), t([[0.0, 0.5]]))


def test_importance_values_with_proposal():
    logp = t([[[math.log(0.2), math.log(0.6)]]])  # [1, 1, 2]
    q = t([[math.log(0.5), math.log(0.5)]])
    rewards = t([[1.0, 3.0]])
    # w = [.4, 1.2]; ordinary IS: mean(w R) = (.4 + 3.6) / 2; self-normalized: 4.0 / 1.6
    ordinary = importance_values(logp, rewards, self_normalize=False, proposal_logp=q)
    assert_close(ordinary, t([[2.0]]))
    assert_close(importance_values(logp, rewards, proposal_logp=q), t([[2.5]]))
    with pytest.raises(ValueError, match="proposal"):
        importance_values(logp, rewards, self_normalize=False)


def test_correlation():
    x = t([1.0, 2.0, 3.0, 4.0])
    assert_close(correlation(x, 2 * x + 1), t(1.0))
    assert_close(correlation(x, -x), t(-1.0))
    # x centred [-1.5, -.5, .5, 1.5], y centred [-.5, .5, -.5, .5]: cov 1, norms sqrt(5), 1
    assert_close(correlation(x, t([0.0, 1.0, 0.0, 1.0])), t(1 / math.sqrt(5)))
    x2, y2 = t([[1.0, 9.0], [2.0, 9.0]]), t([[2.0, 0.0], [4.0, 5.0]])
    assert_close(correlation(x2, y2, B([[1, 0], [1, 0]])), t(1.0))  # masked entries ignored
    assert math.isnan(float(correlation(x, torch.ones(4, dtype=F64))))
