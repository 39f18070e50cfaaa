"""Hand-computed checks for vlm_treegrpo.core.advantages."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from vlm_treegrpo.core.advantages import group_advantages, thought_values, tree_advantages

EPS = 1e-6
F64 = torch.float64


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


# ---------------------------------------------------------------- group_advantages


def test_grpo_std_mean_hand_example():
    # mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = sqrt(1/3) = 0.57735...
    a = 0.5 / (math.sqrt(1 / 3) + EPS)
    assert_close(group_advantages(t([[1.0, 0.0, 0.0, 1.0]])), t([[a, -a, -a, a]]))


def test_grpo_float32_default_and_int_rewards():
    a = 0.5 / (math.sqrt(1 / 3) + EPS)
    out = group_advantages(torch.tensor([[1, 0, 0, 1]]))
    assert out.dtype == torch.get_default_dtype()
    assert_close(out, torch.tensor([[a, -a, -a, a]]))


def test_scale_none_is_dr_grpo():
    out = group_advantages(t([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]]), scale="none")
    assert_close(out, t([[0.5, -0.5, -0.5, 0.5], [1.0, -1.0, 0.0, 0.0]]))


def test_rloo_hand_example():
    # r_i - mean(others): 1 - 0 = 1; 0 - 1/3 = -1/3
    out = group_advantages(t([[1.0, 0.0, 0.0, 0.0]]), scale="none", baseline="rloo")
    assert_close(out, t([[1.0, -1 / 3, -1 / 3, -1 / 3]]))
    # 3 - 1.5 = 1.5; 1 - 2.5 = -1.5; 2 - 2 = 0
    out = group_advantages(t([[3.0, 1.0, 2.0]]), scale="none", baseline="rloo")
    assert_close(out, t([[1.5, -1.5, 0.0]]))


def test_rloo_with_std():
    # unbiased std of [1,0,0,0]: mean .25, sum sq dev = .5625 + 3*.0625 = .75, var .25, std .5
    s = 0.5 + EPS
    out = group_advantages(t([[1.0, 0.0, 0.0, 0.0]]), baseline="rloo")
    assert_close(out, t([[1.0 / s, -1 / 3 / s, -1 / 3 / s, -1 / 3 / s]]))


def test_rloo_needs_two():
    with pytest.raises(ValueError, match="rloo"):
        group_advantages(t([[1.0], [0.0]]), baseline="rloo")


def test_baseline_none():
    r = t([[1.0, 0.0, 0.0, 1.0]])
    assert_close(group_advantages(r, scale="none", baseline="none"), r)
    assert_close(group_advantages(r, baseline="none"), r / (math.sqrt(1 / 3) + EPS))


@pytest.mark.parametrize("baseline", ["mean", "rloo"])
@pytest.mark.parametrize("scale", ["std", "none"])
def test_constant_rewards_exact_zero(scale, baseline):
    # 0.1 and 0.7 are not exactly representable: the mean may round, the guard must still give 0.
    for dtype in (torch.float32, F64):
        r = torch.tensor([[0.1] * 7, [0.7] * 7, [1.0] * 7], dtype=dtype)
        out = group_advantages(r, scale=scale, baseline=baseline)
        assert torch.equal(out, torch.zeros_like(r))


def test_group_size_one_no_nan():
    r = t([[0.7], [2.0], [0.0]])
    for scale in ("std", "none"):
        out = group_advantages(r, scale=scale)
        assert torch.equal(out, torch.zeros_like(r))
    out = group_advantages(r, baseline="none")  # std treated as 0 -> r / eps, finite
    assert torch.isfinite(out).all()
    assert_close(out, r / EPS)


def test_no_nan_in_mixed_batch():
    r = t([[1.0, 1.0, 1.0], [0.0, 1.0, 0.5]])
    out = group_advantages(r)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("baseline", ["mean", "rloo"])
def test_invariances(baseline):
    g = torch.Generator().manual_seed(0)
    r = torch.rand(5, 6, generator=g, dtype=F64)
    base = group_advantages(r, baseline=baseline)
    assert_close(group_advantages(r + 3.7, baseline=baseline), base)
    # eps makes rescaling invariance approximate: ~eps / std relative error
    assert_close(group_advantages(r * 2.5, baseline=baseline), base, rtol=1e-5, atol=1e-5)
    base_none = group_advantages(r, scale="none", baseline=baseline)
    assert_close(group_advantages(r - 11.0, scale="none", baseline=baseline), base_none)
    assert_close(group_advantages(r * 2.5, scale="none", baseline=baseline), 2.5 * base_none)


def test_group_invalid_names():
    r = t([[1.0, 0.0]])
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, scale="mad")
    with pytest.raises(ValueError, match="baseline"):
        group_advantages(r, baseline="median")
    with pytest.raises(ValueError):
        group_advantages(t([1.0, 0.0]))


# ---------------------------------------------------------------- tree_advantages


R_TREE = [[[1.0, 0.0], [1.0, 1.0]]]  # N=1, K=2, M=2


def test_thought_values():
    assert_close(thought_values(t(R_TREE)), t([[0.5, 1.0]]))


def test_tree_hand_example_group_scope():
    thought_adv, answer_adv = tree_advantages(t(R_TREE), answer_scope="group")
    # V = [.5, 1], mean .75, unbiased std = sqrt(2 * .0625 / 1) = 0.353553...
    a = 0.25 / (math.sqrt(0.125) + EPS)
    assert_close(thought_adv, t([[-a, a]]))
    # flat [1,0,1,1]: mean .75, unbiased var = (3*.0625 + .5625)/3 = .25, std .5
    s = 0.5 + EPS
    assert_close(answer_adv, t([[[0.25 / s, -0.75 / s], [0.25 / s, 0.25 / s]]]))


def test_tree_hand_example_thought_scope():
    thought_adv, answer_adv = tree_advantages(t(R_TREE), answer_scope="thought")
    a = 0.25 / (math.sqrt(0.125) + EPS)
    assert_close(thought_adv, t([[-a, a]]))
    # thought 0: [1, 0], mean .5, unbiased std sqrt(.5); thought 1: constant -> 0
    b = 0.5 / (math.sqrt(0.5) + EPS)
    assert_close(answer_adv, t([[[b, -b], [0.0, 0.0]]]))


def test_tree_scale_none():
    thought_adv, answer_adv = tree_advantages(t(R_TREE), scale="none")
    assert_close(thought_adv, t([[-0.25, 0.25]]))
    assert_close(answer_adv, t([[[0.25, -0.75], [0.25, 0.25]]]))


def test_tree_k_by_1_is_flat_grpo():
    g = torch.Generator().manual_seed(1)
    r = torch.rand(3, 5, 1, generator=g, dtype=F64)
    flat = group_advantages(r[:, :, 0])
    thought_adv, answer_adv = tree_advantages(r, answer_scope="group")
    assert_close(thought_adv, flat)
    assert_close(answer_adv[:, :, 0], flat)
    _, answer_thought = tree_advantages(r, answer_scope="thought")
    assert torch.equal(answer_thought, torch.zeros_like(r))  # one sibling: nothing to compare


@pytest.mark.parametrize("scope", ["group", "thought"])
def test_tree_invariances_and_shapes(scope):
    g = torch.Generator().manual_seed(2)
    r = torch.rand(4, 3, 5, generator=g, dtype=F64)
    th, an = tree_advantages(r, answer_scope=scope)
    assert th.shape == (4, 3) and an.shape == (4, 3, 5)
    th2, an2 = tree_advantages(r + 5.0, answer_scope=scope)
    assert_close(th2, th)
    assert_close(an2, an)
    th3, an3 = tree_advantages(r * 3.0, answer_scope=scope)
    assert_close(th3, th, rtol=1e-5, atol=1e-5)
    assert_close(an3, an, rtol=1e-5, atol=1e-5)


def test_tree_constant_no_nan():
    th, an = tree_advantages(torch.ones(2, 3, 4))
    assert torch.equal(th, torch.zeros(2, 3))
    assert torch.equal(an, torch.zeros(2, 3, 4))


def test_tree_invalid():
    with pytest.raises(ValueError, match="answer_scope"):
        tree_advantages(t(R_TREE), answer_scope="leaf")
    with pytest.raises(ValueError, match="scale"):
        tree_advantages(t(R_TREE), scale="max")
    with pytest.raises(ValueError):
        tree_advantages(t([[1.0, 0.0]]))
