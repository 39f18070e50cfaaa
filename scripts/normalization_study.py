"""GRPO (std-normalized advantages) against unnormalized REINFORCE, from the same seed.

arXiv 2601.23135 reads GRPO's division by the within-prompt reward std as a per-prompt adaptive
step size and predicts faster progress than unnormalized REINFORCE, with the gain governed by
the average within-prompt std. This script runs both arms through the real trainer
(:func:`vlm_treegrpo.train.loop.train`) with configs built from ``configs/demo-smollm2.yaml``:

* ``grpo``:      ``algo.loss=grpo  algo.scale=std``  (the demo),
* ``reinforce``: ``algo.loss=rgra  algo.scale=none`` (REINFORCE with a group-mean baseline, RGRA
  arXiv 2603.18756, no std scaling),

same seed, same prompts order, same first rollout. Both log the normalization diagnostics every
``algo.diag_every`` steps (update norm with/without std scaling, per-prompt gradient cosine).
Note: AdamW normalizes the global gradient scale away, so what differs between the arms is the
*relative* weighting of prompts (``1 / sigma_p``) and the interaction with gradient clipping.

Writes ``runs/normalization_study/{grpo,reinforce}/`` (the trainer's usual run directories) and
``runs/normalization_study/normalization_study.{json,png}``: reward against step (raw and a
moving average), the mean within-prompt reward std, and the diagnostics.

    .venv/bin/python scripts/normalization_study.py --steps 40                 # SmolLM2, both arms
    .venv/bin/python scripts/normalization_study.py --quick --model tiny-llama # seconds; a smoke test
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vlm_treegrpo.config import load_config
from vlm_treegrpo.analysis.records import script_command, write_record

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"grpo": ["algo.loss=grpo", "algo.scale=std"], "reinforce": ["algo.loss=rgra", "algo.scale=none"]}
QUICK = ["rollout.prompts_per_step=2", "rollout.K=2", "rollout.M=2", "rollout.thought_max_tokens=6",
         "rollout.answer_max_tokens=6", "data.n_train=32", "optim.micro_batch=2", "algo.diag_every=1", "log.samples_every=0"]


def moving_average(xs: list[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def plot(result: dict, path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {"grpo": "tab:blue", "reinforce": "tab:orange"}
    for arm, res in result["arms"].items():
        c = colors.get(arm)
        axes[0].plot(res["step"], res["reward"], color=c, alpha=0.25)
        axes[0].plot(res["step"], moving_average(res["reward"], window), color=c, label=f"{arm} (avg {window})")
        axes[1].plot(res["step"], res["reward_std_within"], color=c, label=f"{arm}: mean std")
        axes[1].plot(res["step"], res["zero_std_frac"], color=c, ls=":", label=f"{arm}: zero-std frac")
        pts = [(s, r, q) for s, r, q in zip(res["step"], res["update_ratio"], res["grad_cosine"]) if r is not None]
        if pts:
            axes[2].plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=c, label=f"{arm}: |update std| / |update none|")
            axes[2].plot([p[0] for p in pts], [p[2] if p[2] is not None else float("nan") for p in pts], "s--", color=c,
                         label=f"{arm}: mean pairwise cosine")
    axes[0].set(xlabel="step", ylabel="mean reward", title="reward")
    axes[1].set(xlabel="step", title="within-prompt reward std")
    axes[2].set(xlabel="step", title="per-prompt gradient diagnostics")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from vlm_treegrpo.train.loop import train

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--config", default=str(ROOT / "configs/demo-smollm2.yaml"))
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default 40; 3 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-test", type=int, default=100, help="held-out problems for the before/after accuracy")
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out evaluations")
    ap.add_argument("--arms", default="grpo,reinforce", help=f"comma list of {list(ARMS)}")
    ap.add_argument("--quick", action="store_true", help="3 steps of 2 small trees, diagnostics every step, no evaluation")
    ap.add_argument("--out", default="runs/normalization_study")
    ap.add_argument("--no-record", action="store_true", help="write no record under benchmarks/records/")
    ap.add_argument("overrides", nargs="*", help="config overrides for both arms, section.field=value")
    args = ap.parse_args(argv)
    if args.quick:
        args.no_eval = True
    args.steps = args.steps or (3 if args.quick else 40)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"model": args.model, "steps": args.steps, "seed": args.seed, "arms": {}}
    t0 = time.time()
    for i, arm in enumerate(args.arms.split(",")):
        ev = ["eval.before=false", "eval.after=false"] if args.no_eval else [
            f"eval.before={'true' if i == 0 else 'false'}", "eval.after=true", f"data.n_test={args.n_test}"]
        overrides = [f"model.name={args.model}", f"optim.steps={args.steps}", f"optim.seed={args.seed}",
                     f"log.run_dir={out}", f"log.name={arm}", *ARMS[arm], *ev, *(QUICK if args.quick else []), *args.overrides]
        cfg = load_config(args.config, overrides)
        print(f"[{arm}] {' '.join(ARMS[arm])}", flush=True)
        summary = train(cfg)
        rows = [json.loads(line) for line in (cfg.log.path / "metrics.jsonl").read_text().splitlines()]
        get = lambda key: [r.get(key) for r in rows]  # noqa: E731
        result["arms"][arm] = {
            "overrides": ARMS[arm], "step": get("step"), "reward": get("reward"),
            "reward_std_within": get("reward_std_within"), "reward_std_spread": get("reward_std_spread"),
            "zero_std_frac": get("zero_std_frac"), "update_ratio": get("norm/update_ratio"),
            "grad_cosine": get("norm/grad_cosine"), "grad_norm": get("grad_norm"),
            "summary": {k: ({kk: vv for kk, vv in v.items() if kk != "samples"} if isinstance(v, dict) else v)
                        for k, v in summary.items()},
        }
    first = next(iter(result["arms"].values()))
    if "eval_before" in first["summary"]:
        result["eval_before_shared"] = first["summary"]["eval_before"]  # same initial model for every arm
    tail = max(1, args.steps // 4)
    result["comparison"] = {arm: {"reward_last_quarter": sum(r["reward"][-tail:]) / tail,
                                  "reward_mean": sum(r["reward"]) / len(r["reward"]),
                                  "mean_within_prompt_std": sum(r["reward_std_within"]) / len(r["reward_std_within"]),
                                  "accuracy_after": r["summary"].get("eval_after", {}).get("accuracy")}
                            for arm, r in result["arms"].items()}
    result["seconds"] = round(time.time() - t0, 2)
    (out / "normalization_study.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "normalization_study.png", window=max(1, min(5, args.steps // 4)))
    print(json.dumps(result["comparison"], indent=2))
    print(f"wrote {out / 'normalization_study.json'} and {out / 'normalization_study.png'} in {result['seconds']:.0f}s")
    if not args.no_record:
        name = "normalization-study" + ("-quick" if args.quick else "")
        record = write_record(name, result, command=script_command(__file__, argv))
        print(f"wrote {record}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
