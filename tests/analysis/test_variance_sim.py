"""Checks for vlm_treegrpo.analysis.variance_sim: GRPO-MA's thought-advantage error."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vlm_treegrpo.core.advantages import group_advantages, tree_advantages
from vlm_treegrpo.analysis.variance_sim import (
    delta_method_prediction,
    simulate_thought_advantage_error,
)

TRIALS = 1000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster, and light on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sim(K, M, a, b, scale="std", seed=0):
    return simulate_thought_advantage_error(K, M, a, b, TRIALS, seed, scale=scale)


def test_exact_identity_behind_the_prediction():
    # mean_k (Ahat_k - A_k)^2 = 2 (K-1)/K (1 - corr(V, p)) for std scaling without eps
    p = torch.tensor([[0.1, 0.5, 0.8, 0.3]], dtype=torch.float64)
    rewards = torch.tensor([[[0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 0]]], dtype=torch.float64)
    est, _ = tree_advantages(rewards, eps=0.0)
    true = group_advantages(p, eps=0.0)
    rho = torch.corrcoef(torch.stack([rewards.mean(-1)[0], p[0]]))[0, 1]
    assert_close((est - true).pow(2).mean(), 2 * 3 / 4 * (1 - rho))


def test_reproducible_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = simulate_thought_advantage_error(8, 2, 1.0, 1.0, 200, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a == simulate_thought_advantage_error(8, 2, 1.0, 1.0, 200, seed=5)
    assert a != simulate_thought_advantage_error(8, 2, 1.0, 1.0, 200, seed=6)
    assert abs(a["bias"]) < 1e-12  # both advantages sum to 0 over a group
    assert a["var_est_minus_true"] == pytest.approx(a["mse"], rel=0.01)


def test_error_falls_like_one_over_m_at_fixed_k():
    # a + b = 0.4: noise-to-signal r = 0.4 / M, small for M >= 2 -> close to 1/M (3.6 predicted)
    mse = {m: sim(64, m, 0.2, 0.2)["mse"] for m in (1, 2, 4, 8)}
    assert 3.0 < mse[2] / mse[8] < 4.5
    # from M = 1 the fall is slower, as the 1/sqrt(1 + r) form predicts (~3.3, not 4)
    predicted = delta_method_prediction(64, 1, 0.2, 0.2) / delta_method_prediction(64, 4, 0.2, 0.2)
    assert mse[1] / mse[4] == pytest.approx(predicted, rel=0.06)
    assert mse[1] > mse[2] > mse[4] > mse[8]


def test_error_does_not_vanish_as_k_grows():
    mse = [sim(k, 4, 0.5, 0.5)["mse"] for k in (8, 16, 64)]
    assert 0.8 < mse[2] / mse[0] < 1.25  # flat, not ~1/8
    assert min(mse) > 0.15


@pytest.mark.parametrize("a, b, M", [(1.0, 1.0, 1), (0.5, 0.5, 4), (2.0, 0.5, 2)])
def test_simulation_matches_prediction_at_large_k(a, b, M):
    assert sim(64, M, a, b)["mse"] == pytest.approx(delta_method_prediction(64, M, a, b), rel=0.06)


def test_scale_none_prediction_is_exact():
    for K in (4, 32):
        got = sim(K, 2, 1.0, 1.0, scale="none")["mse"]
        assert got == pytest.approx(delta_method_prediction(K, 2, 1.0, 1.0, scale="none"), rel=0.08)


def test_prediction_closed_forms():
    # Beta(1, 1): E[p(1-p)] = 1/6, Var p = 1/12, r = 2 / M
    assert delta_method_prediction(4, 2, 1.0, 1.0, small_noise=True) == pytest.approx(0.75 * 1.0)
    assert delta_method_prediction(4, 2, 1.0, 1.0) == pytest.approx(1.5 * (1 - 2**-0.5))
    assert delta_method_prediction(4, 2, 1.0, 1.0, scale="none") == pytest.approx(0.75 / 12)
    # the small-noise term is the leading order of the full form
    full = delta_method_prediction(64, 1000, 1.0, 1.0)
    lead = delta_method_prediction(64, 1000, 1.0, 1.0, small_noise=True)
    assert full == pytest.approx(lead, rel=2e-3)
    with pytest.raises(ValueError):
        delta_method_prediction(1, 2, 1.0, 1.0)
