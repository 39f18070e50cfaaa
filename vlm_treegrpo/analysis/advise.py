"""Group-size advisor: ``vlm-treegrpo advise`` (GRPO as a U-statistic, arXiv 2603.01162).

Samples one batch of K x M trees with the configured model, builds per-sample score features
``phi`` (each leaf's ``grad log pi`` on the H-dimensional final-hidden-state gain of
:mod:`vlm_treegrpo.rollout.scores`; no backward through the model), and hands them to the pure
estimators of :mod:`vlm_treegrpo.core.group_size`:

* flat group size: the leaves ``(k, 0)`` (one continuation per thought; i.i.d. samples of the
  sampling policy) give ``s_between``, ``c1``, ``c2`` and the curve
  ``MSE(G) = (G s_between + c1 + c2 / (G - 1)) / B`` at the config's rollout budget
  ``B = prompts_per_step * K * M``; the advice is ``G* = 1 + sqrt(c2 / s_between)``.
* K x M split (sampled M >= 2, K >= 4): the thought-level components with the continuation
  noise separated (:func:`core.group_size.tree_components`) give the thought-gradient MSE of
  every split of the config's leaves per prompt, at equal leaves (``tree_mse_curve``) and, our
  addition, at equal *generated tokens* (a continuation costs only its own tokens, a thought is
  shared by M leaves; lengths measured on the batch). Also shown per split: GRPO-MA's predicted
  error of the thought advantage, ``2 (K-1)/K (1 - 1/sqrt(1 + r))`` with the noise-to-signal
  ratio ``r = E[within-thought reward variance] / (M Var p)`` measured on the batch
  (:mod:`vlm_treegrpo.analysis.variance_sim` derives it).

Writes ``<run_dir>/<name>/advise.json`` and prints a table. One batch is a noisy measurement:
rerun with ``--prompts`` larger than ``prompts_per_step`` for steadier components.
"""
from __future__ import annotations

import json
import math
import time

import torch

from vlm_treegrpo.config import ConfigError, TrainConfig
from vlm_treegrpo.core.group_size import best_group_size, estimate_components, gradient_mse_curve, tree_components, tree_mse_curve
from vlm_treegrpo.data.sources import task_from_config
from vlm_treegrpo.policy.factory import make_policy
from vlm_treegrpo.policy.text import TextPolicy
from vlm_treegrpo.rewards.functions import RewardSet
from vlm_treegrpo.rollout.tree import SamplingParams, Tree
from vlm_treegrpo.rollout.scores import check_spans, token_score_features
from vlm_treegrpo.train.runtime import autocast_ctx, resolve_device, setup
from vlm_treegrpo.train.step import leaf_texts
from vlm_treegrpo.train.loop import PromptSampler

G_GRID = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
FEATURE = ("grad of each leaf's summed token log-prob w.r.t. a per-channel gain on the final hidden state "
           "(H numbers; = final RMSNorm weight gradient x weight), closed form, vlm_treegrpo.rollout.scores")


def leaf_features(policy, trees: list[Tree], K: int, M: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(phi_thought [N, K, H], phi_leaf [N, K, M, H])``: score features of thoughts and whole leaves."""
    device = next(policy.model.parameters()).device
    N = len(trees)
    batch = policy.pack(trees, torch.zeros(N, K), torch.zeros(N, K, M))
    psi = token_score_features(policy.model, batch.to(device), temperature).cpu()  # [N, L, H]
    H = psi.shape[-1]
    phi_th = torch.zeros(N, K, H, dtype=torch.float64)
    phi_leaf = torch.zeros(N, K, M, H, dtype=torch.float64)
    for n, tree in enumerate(trees):
        th, ans = check_spans(tree, batch.input_ids[n])
        for k, (a, b) in enumerate(th):
            phi_th[n, k] = psi[n, a:b].sum(0)
            for m, span in enumerate(ans[k]):
                phi_leaf[n, k, m] = phi_th[n, k] + (psi[n, span[0] : span[1]].sum(0) if span else 0.0)
    return phi_th, phi_leaf


def thought_advantage_error(K: int, M: int, noise: float, signal: float) -> float | None:
    """GRPO-MA's delta-method error of the std-scaled thought advantage (``analysis.variance_sim``)."""
    if signal <= 0:
        return None
    r = noise / (M * signal)
    return 2 * (K - 1) / K * (1 - 1 / math.sqrt(1 + r))


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def advise_from_batch(phi_th: torch.Tensor, phi_leaf: torch.Tensor, rewards: torch.Tensor, trees: list[Tree],
                      prompts_per_step: int) -> dict:
    """The advice (a JSON-ready dict) from one batch's features and rewards ``[N, K, M]``."""
    N, K, M = rewards.shape
    budget = prompts_per_step * K * M
    if N < 2 or K < 4:
        raise ConfigError(f"rollout.K: the advisor needs K >= 4 thoughts and >= 2 prompts, got K={K}, N={N}")
    comp = estimate_components(phi_leaf[:, :, 0], rewards[:, :, 0])
    grid = sorted({g for g in G_GRID if g <= budget} | {K * M})
    curve = gradient_mse_curve(comp, budget, grid)
    g_star = best_group_size(comp)
    rec = budget if not math.isfinite(g_star) else int(min(max(round(g_star), 2), budget))
    out = {
        "N": N, "K": K, "M": M, "budget": budget, "feature": FEATURE,
        "components": comp,
        "group_size": {
            "G_star": _finite(g_star), "G_star_leading": _finite(best_group_size(comp, exact=False)),
            "recommended_G": rec, "best_grid_G": grid[int(curve.argmin())], "current_G": K * M,
            "curve": [{"G": g, "mse": float(v)} for g, v in zip(grid, curve)],
        },
    }
    if M < 2:
        out["tree"] = {"skipped": "the sampled batch has M = 1; rerun with rollout.M >= 2 to compare K x M splits"}
        return out
    tcomp = tree_components(phi_th, rewards)
    r64 = rewards.double()
    noise = float(r64.var(dim=-1).mean())  # E within-thought reward variance
    signal = float((r64.mean(-1).var(dim=-1) - r64.var(dim=-1).mean(-1) / M).mean())  # Var p, noise removed
    lens_th = [len(th) for t in trees for th in t.thoughts]
    lens_ans = [len(a) for t in trees for row in t.answers for a in row if a]
    t_th = sum(lens_th) / len(lens_th)
    t_ans = sum(lens_ans) / len(lens_ans) if lens_ans else 0.0
    cost = lambda k, m: k * t_th + k * m * t_ans  # noqa: E731  generated tokens per prompt
    tokens = prompts_per_step * cost(K, M)  # the config's token spend per step
    ks, ms, mse = tree_mse_curve(tcomp, budget, K * M)
    splits = []
    for k, m, v in zip(ks.tolist(), ms.tolist(), mse.tolist()):
        per_prompt = v * budget / (K * M)  # MSE x prompts per step
        splits.append({"K": k, "M": m, "mse_equal_leaves": v, "mse_equal_tokens": per_prompt * cost(k, m) / tokens,
                       "thought_adv_error": thought_advantage_error(k, m, noise, signal)})
    best = lambda key: min(splits, key=lambda s: s[key])  # noqa: E731
    out["tree"] = {
        "components": tcomp, "reward_noise": noise, "thought_signal": signal,
        "thought_tokens": t_th, "answer_tokens": t_ans, "splits": splits,
        "recommended_equal_leaves": {k: best("mse_equal_leaves")[k] for k in ("K", "M")},
        "recommended_equal_tokens": {k: best("mse_equal_tokens")[k] for k in ("K", "M")},
    }
    return out


def format_table(adv: dict) -> str:
    """Human-readable tables of an advice dict."""
    c = adv["components"]
    gs = adv["group_size"]
    lines = [
        f"batch: N={adv['N']} prompts, K={adv['K']} x M={adv['M']}; budget B = {adv['budget']} rollouts/step",
        f"components: s_between={c['s_between']:.4g}  c1={c['c1']:.4g}  c2={c['c2']:.4g}",
        "", f"{'G':>5}  {'prompts/step':>12}  {'grad MSE':>12}",
    ]
    for row in gs["curve"]:
        mark = "  <- current" if row["G"] == gs["current_G"] else ""
        lines.append(f"{row['G']:>5}  {adv['budget'] / row['G']:>12.1f}  {row['mse']:>12.4g}{mark}")
    star = "inf (no measurable between-prompt variance)" if gs["G_star"] is None else f"{gs['G_star']:.2f}"
    lines += ["", f"G* = {star};  recommended G = {gs['recommended_G']} (best on the grid: {gs['best_grid_G']})"]
    tree = adv.get("tree", {})
    if "skipped" in tree:
        lines += ["", f"K x M: {tree['skipped']}"]
    elif tree:
        lines += ["", f"K x M splits of G = {adv['K'] * adv['M']} (thought {tree['thought_tokens']:.1f} tok, "
                  f"continuation {tree['answer_tokens']:.1f} tok):",
                  f"{'K':>4} {'M':>4}  {'MSE eq. leaves':>14}  {'MSE eq. tokens':>14}  {'thought-adv err':>15}"]
        for s in tree["splits"]:
            err = "-" if s["thought_adv_error"] is None else f"{s['thought_adv_error']:.3f}"
            lines.append(f"{s['K']:>4} {s['M']:>4}  {s['mse_equal_leaves']:>14.4g}  {s['mse_equal_tokens']:>14.4g}  {err:>15}")
        el, et = tree["recommended_equal_leaves"], tree["recommended_equal_tokens"]
        lines += ["", f"recommended K x M: {et['K']} x {et['M']} at equal generated tokens; {el['K']} x {el['M']} at equal leaves",
                  "(thought-gradient MSE only; a larger M also lowers the thought-advantage error, last column)"]
    return "\n".join(lines)


def advise(cfg: TrainConfig, prompts: int = 0) -> dict:
    """Sample one batch with ``cfg``'s model and rollout settings and return (and write) the advice."""
    t0 = time.time()
    torch.manual_seed(cfg.optim.seed)
    device = resolve_device(cfg.model.device)
    setup(cfg.model, device)
    policy = make_policy(cfg.model.name, device, cfg.model.dtype, cfg.model.attn_implementation)
    if not isinstance(policy, TextPolicy):
        raise ConfigError("model.name: the advisor's score features are implemented for text policies")
    r = cfg.rollout
    task = task_from_config(cfg.data)
    N = prompts or r.prompts_per_step
    idx = PromptSampler(len(task.train), cfg.optim.seed).take(N)
    examples = [task.train[i] for i in idx]
    encoded = [policy.encode(ex, task.instruction) for ex in examples]
    policy.model.eval()
    sampling = SamplingParams.of(r)
    with autocast_ctx(device, cfg.model.autocast):
        trees = policy.sample(encoded, r.K, r.M, r.thought_max_tokens, r.answer_max_tokens, sampling, r.branch_delimiters)
    texts = leaf_texts(policy, trees, r.K, r.M)
    scored = RewardSet.from_config(cfg.algo.rewards, cfg.algo.reward_timeout_s)(texts, [ex for ex in examples for _ in range(r.G)])
    rewards = scored.total.view(N, r.K, r.M)
    with autocast_ctx(device, cfg.model.autocast):
        phi_th, phi_leaf = leaf_features(policy, trees, r.K, r.M, r.temperature)
    out = {"model": cfg.model.name, **advise_from_batch(phi_th, phi_leaf, rewards, trees, r.prompts_per_step),
           "reward_mean": float(rewards.mean()), "seconds": round(time.time() - t0, 2)}
    cfg.log.path.mkdir(parents=True, exist_ok=True)
    (cfg.log.path / "advise.json").write_text(json.dumps(out, indent=2))
    return out
