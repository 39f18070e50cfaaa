"""GRPO-MA's variance claim for thought advantages: a simulation and its closed-form prediction.

Reference
---------
* GRPO-MA, arXiv:2509.24494 (our notes: docs/algorithms.md section 1). Claim (delta
  method): the error of the estimated thought advantage has a leading term that falls as 1/M
  (M answers per thought) and does not vanish as the number of thoughts K grows.

Setting (the paper's check): ``p_k ~ Beta(a, b)``, ``R_km ~ Bernoulli(p_k)``; compare the thought
advantage of ``core.advantages.tree_advantages`` (from ``V_k = mean_m R_km``) with the
advantage computed the same way from the true ``p_k`` of the same K thoughts.

Derivation of :func:`delta_method_prediction` (ours)
-----------------------------------------------------
Write ``V_k = p_k + eps_k`` with ``E[eps_k | p_k] = 0``, ``Var(eps_k | p_k) = p_k (1 - p_k) / M``.

``scale="none"`` (centred only): ``Ahat_k - A_k = eps_k - mean_j eps_j``, so exactly
``E (Ahat_k - A_k)^2 = (1 - 1/K) E[p (1 - p)] / M``.

``scale="std"`` (GRPO): with unbiased stds over the K thoughts (``eps`` of the advantage
ignored) ``sum_k Ahat_k^2 = sum_k A_k^2 = K - 1``, hence the exact identity
``mean_k (Ahat_k - A_k)^2 = 2 (K-1)/K (1 - rhohat_K)``, where ``rhohat_K`` is the sample
correlation of ``(V_k)`` and ``(p_k)``. ``rhohat_K`` is a smooth function of sample moments; by
the delta method it is ``rho + O_p(K^-1/2)`` with ``E rhohat_K = rho + O(1/K)``, and
``rho = Cov(V, p) / sqrt(Var V Var p) = 1 / sqrt(1 + r)``, with the noise-to-signal ratio
``r = E[p (1 - p)] / (M Var p)`` (``= (a + b) / M`` for a Beta(a, b) prior). Keeping the leading
order in 1/K::

    MSE(K, M) ~ 2 (K-1)/K (1 - 1 / sqrt(1 + r))  ~  (K-1)/K * E[p(1-p)] / (M Var p)  (small r)

The small-r term falls as 1/M and tends to a nonzero constant as K grows. For larger r (few
answers, or a Beta prior with little spread) the ``1 / sqrt(1 + r)`` form is the one to use: the
error then falls more slowly than 1/M. Not modelled: groups where all ``V_k`` are equal
(``Ahat = 0``), rare for moderate K.
"""
from __future__ import annotations

import math

import torch

from vlm_treegrpo.core.advantages import SCALES, group_advantages, tree_advantages


def simulate_thought_advantage_error(
    K: int,
    M: int,
    a: float,
    b: float,
    n_trials: int,
    seed: int,
    scale: str = "std",
    eps: float = 1e-6,
) -> dict[str, float]:
    """Monte Carlo error of GRPO-MA's thought advantage, vectorized over trials.

    Each trial is one prompt: ``p [T, K] ~ Beta(a, b)``, ``R [T, K, M] ~ Bernoulli(p)``;
    ``Ahat = tree_advantages(R)[0]`` and ``A = group_advantages(p)`` with the same ``scale`` and
    ``eps`` (mean baseline). The seed drives a forked RNG; the caller's global RNG is untouched.

    Returns:
        ``var_est_minus_true``: unbiased variance of ``Ahat - A`` over all trials and thoughts;
        ``mse``: mean of ``(Ahat - A)^2``; ``bias``: mean of ``Ahat - A`` (0 up to rounding, since
        both sum to 0 over a group); ``signal``: mean of ``A^2``; ``degenerate_frac``: fraction of
        trials whose K thought values are all equal.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if K < 2 or M < 1 or n_trials < 1 or a <= 0 or b <= 0:
        raise ValueError(
            f"need K >= 2, M >= 1, n_trials >= 1, a, b > 0; got {(K, M, n_trials, a, b)}"
        )
    dtype = torch.float64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        beta = torch.distributions.Beta(torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype))
        p = beta.sample((n_trials, K))  # [T, K]
        rewards = torch.bernoulli(p.unsqueeze(-1).expand(n_trials, K, M))  # [T, K, M]
    est, _ = tree_advantages(rewards, scale=scale, eps=eps)  # [T, K]
    true = group_advantages(p, scale=scale, baseline="mean", eps=eps)  # [T, K]
    err = est - true  # [T, K]
    values = rewards.mean(dim=-1)  # [T, K]
    degenerate = (values == values[:, :1]).all(dim=1)  # [T]
    return {
        "var_est_minus_true": float(err.var()) if err.numel() > 1 else 0.0,
        "mse": float(err.pow(2).mean()),
        "bias": float(err.mean()),
        "signal": float(true.pow(2).mean()),
        "degenerate_frac": float(degenerate.to(dtype).mean()),
    }


def delta_method_prediction(
    K: int,
    M: int,
    a: float,
    b: float,
    scale: str = "std",
    small_noise: bool = False,
) -> float:
    """Predicted ``E (Ahat_k - A_k)^2`` for ``p ~ Beta(a, b)`` (derivation: module docstring).

    ``scale="std"``: ``2 (K-1)/K (1 - 1/sqrt(1 + r))`` with ``r = (a + b) / M``, or with
    ``small_noise=True`` its leading term ``(K-1)/K * r = (K-1)/K * E[p(1-p)] / (M Var p)``.
    ``scale="none"``: exactly ``(K-1)/K * E[p(1-p)] / M`` (``small_noise`` is ignored).
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if K < 2 or M < 1 or a <= 0 or b <= 0:
        raise ValueError(f"need K >= 2, M >= 1, a, b > 0; got {K, M, a, b}")
    s = a + b
    mean_pq = a * b / (s * (s + 1))  # E[p (1 - p)]
    var_p = a * b / (s * s * (s + 1))  # Var p
    shrink = (K - 1) / K
    if scale == "none":
        return shrink * mean_pq / M
    r = mean_pq / (M * var_p)  # = (a + b) / M
    if small_noise:
        return shrink * r
    return 2 * shrink * (1 - 1 / math.sqrt(1 + r))
