"""How noisy is GRPO-MA's thought advantage as K (thoughts) and M (continuations) grow?

GRPO-MA (arXiv 2509.24494) claims, by the delta method, that the error of the estimated thought
advantage falls as 1/M and does NOT vanish as K grows with M fixed. Two checks:

(a) simulation (``vlm_treegrpo.analysis.variance_sim``): ``p_k ~ Beta(a, b)``, ``R_km ~ Bernoulli(p_k)``,
    mean squared error of the std-scaled thought advantage against the one computed from the true
    ``p_k``, over K in {2,4,8,16,32} and M in {1,2,4,8}, next to ``delta_method_prediction``;
(b) real rollouts: one big K_max x M_max tree per prompt from the policy (arithmetic task,
    ``configs/demo-smollm2.yaml`` rollout settings), then for every smaller K x M: draw K of the
    thoughts, bootstrap M of each thought's M_max continuations (with replacement), recompute the
    thought advantages, and report their variance over bootstrap draws (the part of the error that
    comes from continuation noise), averaged over thoughts, thought subsets and prompts; plus the
    mean squared difference to the advantage of the same K thoughts from all M_max continuations.
    Both for GRPO's std-scaled advantage and the centred-only one (``scale=none``, whose
    continuation variance is exactly ``(1 - 1/K) E[sigma^2] / M``).
    The bootstrap variance is that of resampling M_max observed continuations, a (M_max-1)/M_max
    underestimate of the true sampling variance; finished thoughts (EOS inside the thought) have
    identical leaves and contribute zero.

Writes ``runs/variance_study/variance_study.{json,png}``.

    .venv/bin/python scripts/variance_study.py                                  # SmolLM2, 8 prompts, 8 x 8
    .venv/bin/python scripts/variance_study.py --quick --model tiny-llama       # seconds; a smoke test
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vlm_treegrpo.config import load_config
from vlm_treegrpo.analysis.records import script_command, write_record
from vlm_treegrpo.core.advantages import tree_advantages
from vlm_treegrpo.analysis.variance_sim import delta_method_prediction, simulate_thought_advantage_error

ROOT = Path(__file__).resolve().parents[1]
SIM_K = (2, 4, 8, 16, 32)
SIM_M = (1, 2, 4, 8)


def simulation(a: float, b: float, trials: int, seed: int) -> list[dict]:
    rows = []
    for K in SIM_K:
        for M in SIM_M:
            sim = simulate_thought_advantage_error(K, M, a, b, trials, seed + 1000 * K + M, scale="std")
            rows.append({"K": K, "M": M, "mse": sim["mse"], "degenerate_frac": sim["degenerate_frac"],
                         "delta": delta_method_prediction(K, M, a, b, "std"),
                         "delta_small_noise": delta_method_prediction(K, M, a, b, "std", small_noise=True)})
    return rows


def sample_big_trees(cfg, n_prompts: int, K_max: int, M_max: int):
    """One K_max x M_max tree per prompt with the configured model; returns ``(rewards [N, K, M], info)``."""
    from vlm_treegrpo.data.sources import task_from_config
    from vlm_treegrpo.policy.factory import make_policy
    from vlm_treegrpo.rewards.functions import RewardSet
    from vlm_treegrpo.rollout.tree import SamplingParams
    from vlm_treegrpo.train.runtime import autocast_ctx, resolve_device
    from vlm_treegrpo.train.step import leaf_texts
    from vlm_treegrpo.train.loop import PromptSampler

    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    torch.manual_seed(cfg.optim.seed)
    device = resolve_device(cfg.model.device)
    policy = make_policy(cfg.model.name, device, cfg.model.dtype, cfg.model.attn_implementation)
    policy.model.eval()
    r = cfg.rollout
    task = task_from_config(cfg.data)
    idx = PromptSampler(len(task.train), cfg.optim.seed).take(n_prompts)
    examples = [task.train[i] for i in idx]
    prompts = [policy.encode(ex, task.instruction) for ex in examples]
    t0 = time.time()
    with autocast_ctx(device, cfg.model.autocast):
        trees = policy.sample(prompts, K_max, M_max, r.thought_max_tokens, r.answer_max_tokens,
                              SamplingParams.of(r), r.branch_delimiters)
    t_gen = time.time() - t0
    texts = leaf_texts(policy, trees, K_max, M_max)
    scored = RewardSet.from_config(cfg.algo.rewards, cfg.algo.reward_timeout_s)(texts, [ex for ex in examples for _ in range(K_max * M_max)])
    rewards = scored.total.view(n_prompts, K_max, M_max)
    info = {"seconds_generate": t_gen, "reward_mean": float(rewards.mean()),
            "thoughts_finished_frac": sum(sum(t.thought_done) for t in trees) / (n_prompts * K_max),
            "example_leaf": texts[0]}
    return rewards, info


def bootstrap(rewards: torch.Tensor, K: int, M: int, subsets: int, draws: int, seed: int) -> dict:
    """Bootstrap variance of the thought advantage at K x M from big trees ``rewards [N, Kmax, Mmax]``."""
    N, K_max, M_max = rewards.shape
    gen = torch.Generator().manual_seed(seed)
    S = 1 if K == K_max else subsets
    th = torch.stack([torch.randperm(K_max, generator=gen)[:K] for _ in range(N * S)]).view(N, S, K)  # [N, S, K]
    R = rewards.double()
    R_sub = R[torch.arange(N)[:, None, None], th]  # [N, S, K, Mmax]
    picks = torch.randint(0, M_max, (N, S, draws, K, M), generator=gen)  # [N, S, B, K, M]
    R_boot = R_sub.unsqueeze(2).expand(N, S, draws, K, M_max).gather(-1, picks)  # [N, S, B, K, M]
    out = {"K": K, "M": M}
    for scale, suffix in (("std", ""), ("none", "_unscaled")):
        ref, _ = tree_advantages(R_sub.reshape(N * S, K, M_max), scale=scale)  # [N*S, K] all continuations
        est, _ = tree_advantages(R_boot.reshape(-1, K, M), scale=scale)  # [N*S*B, K]
        est = est.view(N, S, draws, K)
        out["boot_var" + suffix] = float(est.var(dim=2).mean())  # variance over bootstrap draws, averaged
        out["mse_vs_all_continuations" + suffix] = float((est - ref.view(N, S, 1, K)).pow(2).mean())
    return out


def plot(sim: list[dict], real: list[dict], path: Path, title_model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4 if real else 2, figsize=(20 if real else 11, 4.5))
    cmap = plt.get_cmap("viridis")
    for i, M in enumerate(SIM_M):
        rows = [r for r in sim if r["M"] == M]
        c = cmap(i / max(len(SIM_M) - 1, 1))
        axes[0].plot([r["K"] for r in rows], [r["mse"] for r in rows], "o", color=c, label=f"M={M} sim")
        axes[0].plot([r["K"] for r in rows], [r["delta"] for r in rows], "-", color=c, alpha=0.7)
    axes[0].set(xscale="log", yscale="log", xlabel="K thoughts", ylabel="MSE of thought advantage",
                title="simulation vs delta method (lines): flat in K")
    axes[0].legend(fontsize=8)
    for i, K in enumerate(SIM_K):
        rows = [r for r in sim if r["K"] == K]
        c = cmap(i / max(len(SIM_K) - 1, 1))
        axes[1].plot([r["M"] for r in rows], [r["mse"] for r in rows], "o", color=c, label=f"K={K} sim")
        axes[1].plot([r["M"] for r in rows], [r["delta"] for r in rows], "-", color=c, alpha=0.7)
    axes[1].set(xscale="log", yscale="log", xlabel="M continuations per thought", title="falls with M")
    axes[1].legend(fontsize=8)
    ks, ms = sorted({r["K"] for r in real}), sorted({r["M"] for r in real})
    for ax, key, what in ((axes[2], "boot_var", "std-scaled (GRPO)") if real else (None, "", ""),
                          (axes[3], "boot_var_unscaled", "centred only") if real else (None, "", "")):
        if ax is None:
            continue
        for i, K in enumerate(ks):
            rows = [r for r in real if r["K"] == K and r[key] > 0]
            ax.plot([r["M"] for r in rows], [r[key] for r in rows], "o-", color=cmap(i / max(len(ks) - 1, 1)), label=f"K={K}")
        first = [r for r in real if r["K"] == ks[-1] and r["M"] == ms[0]]
        if first and first[0][key] > 0:
            ax.plot(ms, [first[0][key] * ms[0] / m for m in ms], "k--", alpha=0.5, label="1/M")
        ax.set(xlabel="M continuations per thought", ylabel="bootstrap variance", title=f"real ({title_model}), {what}")
        if any(r[key] > 0 for r in real):
            ax.set(xscale="log", yscale="log")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no reward variance in the sampled trees", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or path (tiny-llama for a smoke run)")
    ap.add_argument("--config", default=str(ROOT / "configs/demo-smollm2.yaml"), help="rollout/data/reward settings")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--K-max", type=int, default=8)
    ap.add_argument("--M-max", type=int, default=8)
    ap.add_argument("--a", type=float, default=2.0, help="Beta(a, b) prior of the simulation")
    ap.add_argument("--b", type=float, default=2.0)
    ap.add_argument("--trials", type=int, default=4000, help="simulated prompts per (K, M)")
    ap.add_argument("--subsets", type=int, default=20, help="thought subsets per prompt (real part)")
    ap.add_argument("--draws", type=int, default=200, help="bootstrap draws per subset (real part)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-real", action="store_true", help="simulation only")
    ap.add_argument("--quick", action="store_true", help="few trials, 2 prompts, 4 x 4 trees, short budgets")
    ap.add_argument("--out", default="runs/variance_study")
    ap.add_argument("--no-record", action="store_true", help="write no record under benchmarks/records/")
    ap.add_argument("overrides", nargs="*", help="config overrides section.field=value")
    args = ap.parse_args(argv)
    if args.quick:
        args.trials, args.prompts, args.K_max, args.M_max, args.subsets, args.draws = 200, 2, 4, 4, 4, 30
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result: dict = {"a": args.a, "b": args.b, "trials": args.trials, "simulation": simulation(args.a, args.b, args.trials, args.seed)}
    real: list[dict] = []
    if not args.skip_real:
        extra = ["rollout.thought_max_tokens=6", "rollout.answer_max_tokens=6"] if args.quick else []
        cfg = load_config(args.config, [f"model.name={args.model}", f"optim.seed={args.seed}", *extra, *args.overrides])
        rewards, info = sample_big_trees(cfg, args.prompts, args.K_max, args.M_max)
        Ks = [k for k in (2, 4, 8, 16) if k <= args.K_max]
        Ms = [m for m in (1, 2, 4, 8, 16) if m <= args.M_max]
        real = [bootstrap(rewards, K, M, args.subsets, args.draws, args.seed + 10 * K + M) for K in Ks for M in Ms]
        result["real"] = {"model": args.model, "prompts": args.prompts, "K_max": args.K_max, "M_max": args.M_max,
                          "rewards": rewards.tolist(), **info, "bootstrap": real}
    result["seconds"] = round(time.time() - t0, 2)
    (out / "variance_study.json").write_text(json.dumps(result, indent=2))
    plot(result["simulation"], real, out / "variance_study.png", args.model)
    for r in result["simulation"]:
        print(f"sim K={r['K']:>2} M={r['M']}: mse={r['mse']:.4f} delta={r['delta']:.4f}")
    for r in real:
        print(f"real K={r['K']} M={r['M']}: boot_var={r['boot_var']:.4f} (unscaled {r['boot_var_unscaled']:.4f}) "
              f"mse_vs_all={r['mse_vs_all_continuations']:.4f}")
    print(f"wrote {out / 'variance_study.json'} and {out / 'variance_study.png'} in {result['seconds']:.0f}s")
    if not args.no_record:
        name = "variance-study" + ("-quick" if args.quick else "")
        record = write_record(name, result, command=script_command(__file__, argv))
        print(f"wrote {record}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
