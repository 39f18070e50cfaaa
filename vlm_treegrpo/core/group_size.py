"""Group-size advisor: GRPO's gradient as a U-statistic, and the MSE it implies.

Pure tensor functions on per-sample (projected) score features; no model, no config, no I/O.

Reference
---------
* arXiv:2603.01162, GRPO read as a U-statistic: with a mean baseline a sample's advantage is an
  average of pairwise differences ``R_i - R_j``, so the per-prompt gradient is a U-statistic of
  order 2, with a closed-form MSE and a scaling law for the group size. Our reading of the rule
  (docs/algorithms.md section 3): at rollout budget ``B = N * G`` the gradient variance is
  ``(G * s_between + c1 + c2 / G) / B``, minimised at ``G* ~ sqrt(c2 / s_between)``.
* GRPO-MA, arXiv:2509.24494, for the tree split (thought-value noise ``p (1 - p) / M``).

Derivation (ours; the paper's text is not available to us)
----------------------------------------------------------
Per prompt x draw G i.i.d. samples ``z_i = (R_i, phi_i)``, ``phi_i`` the (projected) score
``grad log pi(y_i | x)``. The mean-baseline gradient is
``(1/G) sum_i (R_i - Rbar) phi_i = (1/G^2) sum_{i<j} (R_i - R_j)(phi_i - phi_j)
= ((G-1)/G) U``, with ``U = C(G,2)^-1 sum_{i<j} h(z_i, z_j)`` and the symmetric kernel
``h(z, z') = (R - R')(phi - phi') / 2``. ``E h = Cov(R, phi) = g(x)``, the exact per-prompt
policy gradient (``E phi = 0`` is not needed). ``U`` equals RLOO's gradient; GRPO's mean
baseline shrinks it by ``(G-1)/G``, a scale we leave to the learning rate. We analyse ``U``.
The std division of GRPO is not modelled (it is a per-prompt weight; see ``core.diagnostics``).

Hoeffding's variance of an order-2 U-statistic (traces of covariances, so "variance" is the
expected squared error summed over coordinates)::

    Var(U | x) = (4 (G-2) zeta1 + 2 zeta2) / (G (G-1)) = (c1 + c2 / (G-1)) / G,
    zeta1 = Var(h1(z)),  h1(z) = E[h(z, Z')],   zeta2 = Var(h(Z, Z')),
    c1 = 4 zeta1,   c2 = 2 zeta2 - 4 zeta1  (= 2 Var of the degenerate part, so >= 0).

Averaging N i.i.d. prompts, with ``s_between = E_x ||g(x) - gbar||^2`` and ``N = B / G``::

    MSE(G) = (G s_between + c1 + c2 / (G - 1)) / B          (exact, G >= 2)
           ~ (G s_between + c1 + c2 / G) / B                (docs/algorithms.md form, leading order)

minimised at ``G* = 1 + sqrt(c2 / s_between)`` (exact) or ``sqrt(c2 / s_between)`` (leading
form); ``c1`` does not move the optimum, and neither does the budget.

Estimators. With ``T2 = E||h(Z1,Z2)||^2``, ``T1 = E<h(Z1,Z2), h(Z1,Z3)>``,
``T0 = E<h(Z1,Z2), h(Z3,Z4)> = ||g||^2`` (distinct indices), ``zeta2 = T2 - T0`` and
``zeta1 = T1 - T0``. Each T is estimated without bias by averaging over all distinct index
tuples of one prompt, in closed form from ``H_ij = h(z_i, z_j)`` (``H_ii = 0``), its row sums
``r_i`` and total ``S``: ``sum_{i!=j} ||H_ij||^2 = Q``, triples ``sum_i ||r_i||^2 - Q``,
quadruples ``||S||^2 - 4 sum_i ||r_i||^2 + 2 Q`` (inclusion-exclusion over coinciding indices).
``||gbar||^2`` is estimated by ``sum_{n != m} <U_n, U_m> / (N (N-1))``. All components are
unbiased; ``s_between`` and ``c2`` can come out negative on small batches (then read as 0).

Trees (K thoughts x M answers; our extension with GRPO-MA's accounting). Treat thoughts as the
samples, with reward ``V_k = mean_m R_km = p_k + eps_k``, ``Var(eps_k | thought) =
sigma_k^2 / M`` (``p_k (1 - p_k) / M`` for 0/1 rewards). Substituting into ``h``::

    c1(M) = c1_inf + nu1 / M,   c2(M) = c2_inf + nu2 / M,   s_between unchanged,
    nu1 = E[sigma_k^2 ||phi_k - mu_phi||^2],   nu2 = E[sigma_k^2] E||phi_k - mu_phi||^2,
    MSE_thought(K, M) = (G / B) (s_between + (c1_inf + nu1/M) / K + (c2_inf + nu2/M) / (K (K-1))).

At a fixed leaves-per-prompt ``G = K M`` the noise term ``nu1 / (M K) = nu1 / G`` is the same
for every split and every other term falls with K, so this accounting always prefers M = 1
for the *thought-token gradient*. What a tree buys is elsewhere: a more accurate advantage per
thought (``analysis.variance_sim``), and cheaper leaves when thoughts cost more tokens than
answers -- neither is in this curve.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

F64 = torch.float64


def _check(phi: Tensor, rewards: Tensor, min_g: int) -> tuple[Tensor, Tensor]:
    if phi.dim() != 3 or rewards.shape != phi.shape[:2]:
        raise ValueError(
            f"need phi [N, G, D] and rewards [N, G], got {tuple(phi.shape)}, {tuple(rewards.shape)}"
        )
    if phi.shape[1] < min_g:
        raise ValueError(f"need a group size G >= {min_g}, got G={phi.shape[1]}")
    return phi.to(F64), rewards.to(F64)


def u_statistic_gradient(phi: Tensor, rewards: Tensor) -> Tensor:
    """Per-prompt U-statistic gradient ``U = (1/G) sum_i (R_i - mean_{j != i} R_j) phi_i``.

    Equal to the pairwise average of ``h`` and to RLOO's gradient; ``G / (G-1)`` times the
    mean-baseline (Dr. GRPO) gradient. Computed in float64.

    Args:
        phi: ``[N, G, D]`` per-sample score features.
        rewards: ``[N, G]``.

    Returns:
        ``[N, D]``.
    """
    phi, r = _check(phi, rewards, 2)
    g = phi.shape[1]
    s_rphi = (r.unsqueeze(-1) * phi).sum(dim=1)  # [N, D]
    return (g * s_rphi - r.sum(dim=1, keepdim=True) * phi.sum(dim=1)) / (g * (g - 1))  # [N, D]


def pairwise_kernel_moments(phi: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unbiased per-prompt estimates of ``(T2, T1, T0)`` (module docstring), each ``[N]``.

    ``T2 = E||h(Z1,Z2)||^2``, ``T1 = E<h(Z1,Z2), h(Z1,Z3)>``, ``T0 = E<h(Z1,Z2), h(Z3,Z4)>``,
    as averages over all ordered tuples of distinct samples of the prompt. Memory
    ``O(N G^2 + N G D)``; float64. Needs G >= 4.
    """
    phi, r = _check(phi, rewards, 4)
    g = phi.shape[1]
    s_r = r.sum(dim=1, keepdim=True)  # [N, 1]
    s_phi = phi.sum(dim=1, keepdim=True)  # [N, 1, D]
    s_rphi = (r.unsqueeze(-1) * phi).sum(dim=1, keepdim=True)  # [N, 1, D]
    rr = r.unsqueeze(-1)  # [N, G, 1]
    # r_i = sum_j h(z_i, z_j) = (G R_i phi_i - R_i sum phi - phi_i sum R + sum R phi) / 2
    rows = 0.5 * (g * rr * phi - rr * s_phi - s_r.unsqueeze(-1) * phi + s_rphi)  # [N, G, D]
    total = rows.sum(dim=1)  # [N, D]
    sq = (phi * phi).sum(dim=-1)  # [N, G]
    gram = phi @ phi.transpose(1, 2)  # [N, G, G]
    dist = sq.unsqueeze(2) + sq.unsqueeze(1) - 2 * gram  # [N, G, G] ||phi_i - phi_j||^2
    dr = r.unsqueeze(2) - r.unsqueeze(1)  # [N, G, G]
    q = 0.25 * (dr * dr * dist).sum(dim=(1, 2))  # [N] sum_{i != j} ||H_ij||^2
    rows_sq = (rows * rows).sum(dim=(1, 2))  # [N]
    t2 = q / (g * (g - 1))
    t1 = (rows_sq - q) / (g * (g - 1) * (g - 2))
    t0 = ((total * total).sum(dim=1) - 4 * rows_sq + 2 * q) / (g * (g - 1) * (g - 2) * (g - 3))
    return t2, t1, t0


def estimate_components(phi: Tensor, rewards: Tensor) -> dict[str, float]:
    """Estimate ``s_between``, ``c1``, ``c2`` of ``MSE(G) = (G s_between + c1 + c2/(G-1)) / B``.

    Args:
        phi: ``[N, G, D]`` per-sample score features (e.g. ``grad log pi`` of each completion
            through ``core.diagnostics.random_projection``), N >= 2 prompts, G >= 4.
        rewards: ``[N, G]``.

    Returns:
        ``s_between``, ``c1``, ``c2``, ``zeta1``, ``zeta2``, ``mean_grad_sq`` (``||gbar||^2``),
        plus ``N`` and ``G`` as floats. The components describe the policy and prompt
        distribution, not the G they were measured at.
    """
    n = phi.shape[0]
    if n < 2:
        raise ValueError(f"need N >= 2 prompts to separate between-prompt variance, got {n}")
    t2, t1, t0 = pairwise_kernel_moments(phi, rewards)  # [N] each
    u = u_statistic_gradient(phi, rewards)  # [N, D]
    gbar_sq = ((u.sum(dim=0) ** 2).sum() - (u * u).sum()) / (n * (n - 1))
    zeta2 = (t2 - t0).mean()
    zeta1 = (t1 - t0).mean()
    return {
        "s_between": float(t0.mean() - gbar_sq),
        "c1": float(4 * zeta1),
        "c2": float(2 * zeta2 - 4 * zeta1),
        "zeta1": float(zeta1),
        "zeta2": float(zeta2),
        "mean_grad_sq": float(gbar_sq),
        "N": float(n),
        "G": float(phi.shape[1]),
    }


def gradient_mse_curve(
    components: dict[str, float],
    budget: float,
    G_values: Tensor | list[int],
    exact: bool = True,
) -> Tensor:
    """Predicted gradient MSE at rollout budget ``B = N * G`` for each group size.

    ``exact=True``: ``(G s_between + c1 + c2 / (G - 1)) / B`` (Hoeffding; ``inf`` at G = 1, where
    no group baseline exists). ``exact=False``: the docs/algorithms.md form ``(G s_between + c1 + c2 / G)
    / B``.

    Returns:
        float64 tensor shaped like ``G_values``.
    """
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    g = torch.as_tensor(G_values, dtype=F64)
    if bool((g < 1).any()):
        raise ValueError("group sizes must be >= 1")
    s, c1, c2 = components["s_between"], components["c1"], components["c2"]
    if exact:
        tail = torch.where(g > 1, c2 / (g - 1).clamp_min(1), torch.full_like(g, math.inf))
    else:
        tail = c2 / g
    return (g * s + c1 + tail) / budget


def best_group_size(components: dict[str, float], exact: bool = True) -> float:
    """Group size minimising :func:`gradient_mse_curve` (continuous; the curve is flat near it).

    ``exact=True``: ``1 + sqrt(c2 / s_between)``; ``exact=False``: ``sqrt(c2 / s_between)``
    (docs/algorithms.md). Clamped to ``>= 2``; ``inf`` when ``s_between <= 0`` (no measurable
    between-prompt variance: spend the budget on few prompts); a negative ``c2`` reads as 0.
    """
    s, c2 = components["s_between"], max(components["c2"], 0.0)
    if s <= 0:
        return math.inf
    g = math.sqrt(c2 / s) + (1.0 if exact else 0.0)
    return max(g, 2.0)


def thought_noise(phi: Tensor, rewards: Tensor) -> dict[str, float]:
    """Estimate ``nu1``, ``nu2`` (module docstring) from a tree batch.

    Uses the within-thought unbiased reward variance ``s_k^2`` (``E s_k^2 = sigma_k^2``) and
    ``E[s_k^2 |phi_k - phi_j|^2 / 2] = (nu1 + nu2) / 2``, ``E[s_k^2 |phi_j - phi_l|^2 / 2] = nu2``
    for distinct k, j, l; unbiased.

    Args:
        phi: ``[N, K, D]`` thought-token score features, K >= 3.
        rewards: ``[N, K, M]``, M >= 2.

    Returns:
        ``{"nu1": ..., "nu2": ...}``.
    """
    if rewards.dim() != 3 or rewards.shape[-1] < 2:
        raise ValueError(f"rewards must be [N, K, M] with M >= 2, got {tuple(rewards.shape)}")
    phi, _ = _check(phi, rewards[..., 0], 3)
    k = phi.shape[1]
    s2 = rewards.to(F64).var(dim=-1)  # [N, K] unbiased within-thought variance
    sq = (phi * phi).sum(dim=-1)  # [N, K]
    half_dist = 0.5 * (sq.unsqueeze(2) + sq.unsqueeze(1) - 2 * phi @ phi.transpose(1, 2))  # [N,K,K]
    row = half_dist.sum(dim=2)  # [N, K]
    total = row.sum(dim=1, keepdim=True)  # [N, 1]
    pair = (s2 * row).sum(dim=1) / (k * (k - 1))  # [N]
    nu2 = (s2 * (total - 2 * row)).sum(dim=1) / (k * (k - 1) * (k - 2))  # [N]
    return {"nu1": float((2 * pair - nu2).mean()), "nu2": float(nu2.mean())}


def tree_components(phi: Tensor, rewards: Tensor) -> dict[str, float]:
    """Noise-free thought-level components from a K x M tree batch.

    :func:`estimate_components` on ``(phi, V = mean_m R)`` measures ``c(M)``; subtracting
    ``nu / M`` (:func:`thought_noise`) gives the ``M -> inf`` components ``c1``, ``c2``, returned
    with ``s_between``, ``nu1``, ``nu2`` for :func:`tree_mse_curve`.

    Args:
        phi: ``[N, K, D]`` thought-token score features, K >= 4.
        rewards: ``[N, K, M]``, M >= 2.
    """
    m = rewards.shape[-1]
    comp = estimate_components(phi, rewards.to(F64).mean(dim=-1))
    noise = thought_noise(phi, rewards)
    comp["c1"] -= noise["nu1"] / m
    comp["c2"] -= noise["nu2"] / m
    comp.update(noise)
    comp["M"] = float(m)
    return comp


def tree_mse_curve(
    components: dict[str, float],
    budget: float,
    leaves_per_prompt: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Thought-gradient MSE over the splits ``K x M = leaves_per_prompt`` (K >= 2), fixed budget.

    ``MSE = (G / B) (s_between + (c1 + nu1/M) / K + (c2 + nu2/M) / (K (K-1)))`` with noise-free
    ``c1``, ``c2`` and the noise ``nu1``, ``nu2`` from :func:`tree_components` (module docstring).
    At ``M = 1`` it equals :func:`gradient_mse_curve` with ``c + nu``. Under this accounting the
    minimum is always at ``M = 1`` (see module docstring for why, and what it leaves out).

    Returns:
        ``(K [S] long, M [S] long, mse [S] float64)`` over the divisor splits, K increasing.
    """
    g = int(leaves_per_prompt)
    if g < 2 or budget <= 0:
        raise ValueError(f"need leaves_per_prompt >= 2 and budget > 0, got {g}, {budget}")
    k = torch.tensor([d for d in range(2, g + 1) if g % d == 0], dtype=torch.long)  # [S] divisors
    m = g // k  # [S]
    kf, mf = k.to(F64), m.to(F64)
    s, c1, c2 = components["s_between"], components["c1"], components["c2"]
    nu1, nu2 = components["nu1"], components["nu2"]
    mse = (g / budget) * (s + (c1 + nu1 / mf) / kf + (c2 + nu2 / mf) / (kf * (kf - 1)))  # [S]
    return k, m, mse
