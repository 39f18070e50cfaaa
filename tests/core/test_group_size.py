"""Checks for vlm_treegrpo.core.group_size: brute force on small groups, closed forms on
synthetic data with known components, and a simulation of the MSE curve."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from vlm_treegrpo.core.advantages import group_advantages
from vlm_treegrpo.core.group_size import (
    best_group_size,
    estimate_components,
    gradient_mse_curve,
    pairwise_kernel_moments,
    thought_noise,
    tree_components,
    tree_mse_curve,
    u_statistic_gradient,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster, and light on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# Synthetic policy: per prompt a(x) = MU + TAU * xi, xi ~ N(0, I_D); per sample phi ~ N(0, I_D),
# R = <a(x), phi> + offset(x) + SIGMA * noise. Then g(x) = Cov(R, phi) = a(x), and (module
# docstring, Isserlis) zeta1 = ((D+1)|a|^2 + D SIGMA^2) / 4, zeta2 = 4 zeta1, so
# c1 = c2 = (D+1) E|a|^2 + D SIGMA^2 and s_between = D TAU^2.
D = 2
MU = torch.tensor([1.0, 0.0], dtype=F64)
TAU, SIGMA = 0.5, 1.0
S_TRUE = D * TAU**2  # 0.5
C_TRUE = (D + 1) * (MU.pow(2).sum().item() + D * TAU**2) + D * SIGMA**2  # 6.5
TRUE = {"s_between": S_TRUE, "c1": C_TRUE, "c2": C_TRUE}


def synth(n: int, g: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    a = MU + TAU * torch.randn(n, 1, D, generator=gen, dtype=F64)  # [N, 1, D]
    phi = torch.randn(n, g, D, generator=gen, dtype=F64)  # [N, G, D]
    offset = torch.randn(n, 1, generator=gen, dtype=F64)  # [N, 1]
    rewards = (a * phi).sum(-1) + offset + SIGMA * torch.randn(n, g, generator=gen, dtype=F64)
    return phi, rewards


def kernel(phi, r, i, j):
    return 0.5 * (r[i] - r[j]) * (phi[i] - phi[j])


# ---------------------------------------------------------------- exact algebra


def test_u_statistic_gradient_is_pairwise_mean_and_rloo():
    gen = torch.Generator().manual_seed(0)
    phi = torch.randn(3, 5, 4, generator=gen, dtype=F64)
    r = torch.rand(3, 5, generator=gen, dtype=F64)
    u = u_statistic_gradient(phi, r)
    for n in range(3):
        pairs = [kernel(phi[n], r[n], i, j) for i, j in itertools.combinations(range(5), 2)]
        assert_close(u[n], torch.stack(pairs).mean(0))
    # G / (G-1) times the mean-baseline (Dr. GRPO) gradient
    adv = group_advantages(r, scale="none")  # [N, G]
    assert_close(u, 5 / 4 * (adv.unsqueeze(-1) * phi).mean(1))


def test_kernel_moments_match_brute_force():
    gen = torch.Generator().manual_seed(1)
    phi = torch.randn(2, 5, 3, generator=gen, dtype=F64)
    r = torch.randn(2, 5, generator=gen, dtype=F64)
    t2, t1, t0 = pairwise_kernel_moments(phi, r)
    for n in range(2):
        h = {(i, j): kernel(phi[n], r[n], i, j) for i in range(5) for j in range(5)}
        perm = itertools.permutations
        b2 = torch.stack([h[i, j] @ h[i, j] for i, j in perm(range(5), 2)]).mean()
        b1 = torch.stack([h[i, j] @ h[i, k] for i, j, k in perm(range(5), 3)]).mean()
        b0 = torch.stack([h[i, j] @ h[k, m] for i, j, k, m in perm(range(5), 4)]).mean()
        assert_close(torch.stack([t2[n], t1[n], t0[n]]), torch.stack([b2, b1, b0]))


def test_components_are_shift_invariant_and_validate():
    gen = torch.Generator().manual_seed(2)
    phi, r = synth(50, 6, gen)
    c = estimate_components(phi, r)
    c_shift = estimate_components(phi, r + torch.randn(50, 1, generator=gen, dtype=F64))
    for key in ("s_between", "c1", "c2"):
        assert_close(c_shift[key], c[key])
    with pytest.raises(ValueError, match="G >= 4"):
        estimate_components(phi[:, :3], r[:, :3])
    with pytest.raises(ValueError, match="N >= 2"):
        estimate_components(phi[:1], r[:1])


# ---------------------------------------------------------------- known components


def test_estimate_components_recovers_closed_form():
    phi, r = synth(6000, 6, torch.Generator().manual_seed(0))
    c = estimate_components(phi, r)
    assert c["s_between"] == pytest.approx(S_TRUE, rel=0.2)
    assert c["c1"] == pytest.approx(C_TRUE, rel=0.1)
    assert c["c2"] == pytest.approx(C_TRUE, rel=0.1)
    assert c["mean_grad_sq"] == pytest.approx(1.0, rel=0.1)  # |MU|^2
    # G* = 1 + sqrt(c2 / s_between) = 1 + sqrt(13)
    assert best_group_size(c) == pytest.approx(1 + math.sqrt(13), rel=0.1)


def test_mse_curve_matches_simulation():
    budget, trials = 48, 3000
    gen = torch.Generator().manual_seed(0)
    pred = gradient_mse_curve(TRUE, budget, [2, 4, 8])
    lead = gradient_mse_curve(TRUE, budget, [2, 4, 8], exact=False)
    for i, g in enumerate([2, 4, 8]):
        n = budget // g
        phi, r = synth(trials * n, g, gen)
        grad = u_statistic_gradient(phi, r).view(trials, n, D).mean(1)  # [T, D] batch gradients
        mse = (grad - MU).pow(2).sum(-1).mean().item()
        assert mse == pytest.approx(pred[i].item(), rel=0.1)
        if g == 2:  # c2 / (G-1) vs c2 / G differ by 2x here; the exact form is the right one
            assert abs(mse - lead[i].item()) > 3 * abs(mse - pred[i].item())


def test_best_group_size_formulas():
    comp = {"s_between": 0.5, "c1": 3.0, "c2": 8.0}
    assert best_group_size(comp) == pytest.approx(5.0)  # 1 + sqrt(8 / 0.5)
    assert best_group_size(comp, exact=False) == pytest.approx(4.0)  # sqrt(8 / 0.5)
    grid = torch.linspace(1.5, 20, 18501, dtype=F64)
    for exact in (True, False):
        curve = gradient_mse_curve(comp, 64, grid, exact=exact)
        assert grid[curve.argmin()].item() == pytest.approx(best_group_size(comp, exact), abs=1e-3)
    # the budget rescales the curve and does not move the optimum
    assert_close(gradient_mse_curve(comp, 640, [2, 5]) * 10, gradient_mse_curve(comp, 64, [2, 5]))
    assert math.isinf(gradient_mse_curve(comp, 64, [1]).item())
    assert best_group_size({"s_between": 1.0, "c1": 0.0, "c2": 0.25}) == 2.0  # clamped
    assert best_group_size({"s_between": 1.0, "c1": 0.0, "c2": -1.0}) == 2.0
    assert math.isinf(best_group_size({"s_between": -0.1, "c1": 1.0, "c2": 1.0}))


# ---------------------------------------------------------------- trees


def tree_synth(n: int, k: int, m: int, gen: torch.Generator):
    a = torch.tensor([1.5, 0.0], dtype=F64) + 0.7 * torch.randn(n, 1, D, generator=gen, dtype=F64)
    phi = torch.randn(n, k, D, generator=gen, dtype=F64)  # [N, K, D] thought features
    p = torch.sigmoid((a * phi).sum(-1) + 0.5 * torch.randn(n, 1, generator=gen, dtype=F64))
    rewards = torch.bernoulli(p.unsqueeze(-1).expand(n, k, m), generator=gen)  # [N, K, M]
    return phi, p, rewards


def test_tree_components_remove_answer_noise():
    phi, p, rewards = tree_synth(8000, 6, 4, torch.Generator().manual_seed(0))
    clean = estimate_components(phi, p)  # rewards = true thought values: no answer noise
    noisy = estimate_components(phi, rewards.mean(-1))
    tree = tree_components(phi, rewards)
    for key in ("s_between", "c1", "c2"):
        assert tree[key] == pytest.approx(clean[key], rel=0.1)
    assert noisy["c1"] > 1.25 * clean["c1"] and noisy["c2"] > 1.25 * clean["c2"]
    # nu against its definition with the known mu_phi = 0 and tr Cov(phi) = D
    var = p * (1 - p)
    assert tree["nu1"] == pytest.approx((var * phi.pow(2).sum(-1)).mean().item(), rel=0.05)
    assert tree["nu2"] == pytest.approx(var.mean().item() * D, rel=0.05)
    assert tree["M"] == 4.0


def test_thought_noise_zero_without_answer_noise():
    phi = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    rewards = torch.tensor([0.0, 1.0], dtype=F64).repeat(4, 5, 1)[..., :1].expand(4, 5, 3)
    assert thought_noise(phi, rewards) == {"nu1": 0.0, "nu2": 0.0}
    with pytest.raises(ValueError, match="M >= 2"):
        thought_noise(phi, rewards[..., :1])


def test_tree_mse_curve_splits_and_flat_limit():
    comp = {"s_between": 0.02, "c1": 0.16, "c2": 0.22, "nu1": 0.26, "nu2": 0.33}
    k, m, mse = tree_mse_curve(comp, budget=96, leaves_per_prompt=12)
    assert torch.equal(k, torch.tensor([2, 3, 4, 6, 12]))
    assert torch.equal(m, torch.tensor([6, 4, 3, 2, 1]))
    # K x 1 is flat GRPO whose measured components carry the M = 1 noise
    flat = {"s_between": 0.02, "c1": 0.16 + 0.26, "c2": 0.22 + 0.33}
    assert_close(mse[-1], gradient_mse_curve(flat, 96, [12])[0])
    # hand value at K = 2, M = 6: (12/96) (0.02 + (0.16 + 0.26/6)/2 + (0.22 + 0.33/6)/2)
    hand = (12 / 96) * (0.02 + (0.16 + 0.26 / 6) / 2 + (0.22 + 0.33 / 6) / 2)
    assert_close(mse[0], torch.tensor(hand, dtype=F64))
    # at fixed leaves the thought-gradient MSE falls with K (module docstring)
    assert bool((mse.diff() < 0).all())
