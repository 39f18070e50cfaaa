"""Hand-computed checks for vlm_treegrpo.core.diagnostics."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from vlm_treegrpo.core.diagnostics import (
    mean_pairwise_cosine,
    random_projection,
    reward_std_stats,
    update_norm_ratio,
)

F64 = torch.float64


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def test_reward_std_stats_hand_example():
    # unbiased stds: sqrt(1/3), 0, 2 sqrt(1/3); their mean sqrt(1/3), their std sqrt(1/3) * 1
    s = math.sqrt(1 / 3)
    out = reward_std_stats(t([[1, 0, 0, 1], [1, 1, 1, 1], [2, 0, 2, 0]]))
    assert out.keys() == {"mean_std", "spread", "zero_std_frac"}
    assert_close(out["mean_std"], s)
    assert_close(out["spread"], s)
    assert_close(out["zero_std_frac"], 1 / 3)


def test_reward_std_stats_edge_cases():
    # 0.1 is not exactly representable: a constant group must still count as zero-std
    out = reward_std_stats(torch.full((2, 5), 0.1))
    assert out == {"mean_std": 0.0, "spread": 0.0, "zero_std_frac": 1.0}
    out = reward_std_stats(torch.tensor([[1], [0]]))  # G == 1, int rewards
    assert out == {"mean_std": 0.0, "spread": 0.0, "zero_std_frac": 1.0}
    out = reward_std_stats(t([[1.0, 0.0]]))  # N == 1
    assert_close(out["mean_std"], math.sqrt(0.5))
    assert out["spread"] == 0.0


def test_update_norm_ratio_hand_example():
    grads = t([[1.0, 0.0], [0.0, 2.0]])
    out = update_norm_ratio(grads, t([0.5, 2.0]), eps=0.0)
    # with: [2, 1]; without: [1, 2] -> both sqrt(5)
    assert_close(out["norm_with_std"], math.sqrt(5))
    assert_close(out["norm_without_std"], math.sqrt(5))
    assert_close(out["ratio"], 1.0)
    # a zero-std prompt has a zero gradient and adds nothing, even with a tiny eps
    grads = t([[3.0, 4.0], [0.0, 0.0]])
    out = update_norm_ratio(grads, t([0.5, 0.0]), eps=1e-6)
    assert_close(out["norm_with_std"], 5.0 / (0.5 + 1e-6))
    assert_close(out["ratio"], 1.0 / (0.5 + 1e-6))


def test_update_norm_ratio_zero_update_is_nan():
    out = update_norm_ratio(torch.zeros(3, 4), torch.ones(3))
    assert out["norm_with_std"] == 0.0 and math.isnan(out["ratio"])
    with pytest.raises(ValueError):
        update_norm_ratio(torch.zeros(3, 4), torch.ones(2))


def test_mean_pairwise_cosine_hand_example():
    # pairs: (a, b) 0, (a, c) 1/sqrt2, (b, c) 1/sqrt2; the zero row is ignored
    grads = t([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0], [0.0, 0.0]])
    assert_close(mean_pairwise_cosine(grads), math.sqrt(2) / 3)
    # row scaling does not matter
    assert_close(mean_pairwise_cosine(grads * t([[5.0], [0.1], [2.0], [1.0]])), math.sqrt(2) / 3)
    assert_close(mean_pairwise_cosine(t([[1.0, 1.0], [-2.0, -2.0]])), -1.0)
    assert math.isnan(mean_pairwise_cosine(t([[1.0, 0.0], [0.0, 0.0]])))


def test_random_projection_seeded_and_norm_preserving():
    state = torch.random.get_rng_state()
    p = random_projection(64, 2048, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert p.shape == (64, 2048) and p.dtype == torch.float32
    assert torch.equal(p, random_projection(64, 2048, seed=3))
    assert not torch.equal(p, random_projection(64, 2048, seed=4))
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    ratio = (x @ p).norm(dim=1) / x.norm(dim=1)
    assert bool(((ratio - 1).abs() < 0.1).all())
    # cosines survive the projection
    cos = torch.nn.functional.cosine_similarity(x[:4], x[4:], dim=1)
    cos_p = torch.nn.functional.cosine_similarity((x @ p)[:4], (x @ p)[4:], dim=1)
    assert_close(cos_p, cos, atol=0.1, rtol=0.0)


def test_update_norms_on_a_hand_example_and_agreement_with_update_norm_ratio():
    from vlm_treegrpo.core.diagnostics import update_norm_ratio, update_norms

    unscaled = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # two prompts
    scaled = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # sigma = 3 and 2
    out = update_norms(scaled, unscaled)
    assert out["norm_without_std"] == pytest.approx(5.0)
    assert out["norm_with_std"] == pytest.approx(5.0**0.5)
    assert out["ratio"] == pytest.approx(5.0**0.5 / 5.0)
    ref = update_norm_ratio(unscaled, torch.tensor([3.0, 2.0]), eps=0.0)
    assert ref == pytest.approx(out)
    assert math.isnan(update_norms(torch.zeros(2, 2), torch.zeros(2, 2))["ratio"])
