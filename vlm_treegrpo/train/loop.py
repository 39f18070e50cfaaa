"""The training loop: rollout -> rewards -> advantages -> loss -> optimizer step, with the
evaluations, checkpoints and logs around it. The step itself is :mod:`vlm_treegrpo.train.step`; the
device, precision and policy set-up is :mod:`vlm_treegrpo.train.runtime`.

Reads top to bottom. Each step samples a K x M tree per prompt (GRPO-MA, arXiv 2509.24494;
flat GRPO when M = 1), scores every leaf with the configured rewards, computes thought and
continuation advantages with the pure functions of :mod:`vlm_treegrpo.core.advantages`, packs
each tree into one row (prompt once, each thought once) and applies the policy loss of
:mod:`vlm_treegrpo.core.losses` (GRPO's clipped surrogate, GSPO, CISPO or RGRA's ``-A * logp``;
docs/losses.md).

Departures from the papers, on purpose:
- A thought is a prefix cut at a branch delimiter or a token budget, not necessarily a full
  ``<think>`` block; a thought that already ended with EOS is a complete answer whose M leaves
  share one reward.
- With ``updates_per_batch = 1`` the update is on-policy: the old log-probs equal the current
  ones (detached), so no separate old-log-prob pass is run and GRPO's gradient equals RGRA's.

Theory as features: every step logs the within-prompt reward-std statistics of arXiv 2601.23135
(mean, spread, zero-std fraction); every ``algo.diag_every`` steps :func:`gradient_diagnostics`
adds the norm of the update with and without the std scaling and the mean pairwise cosine of
per-prompt gradients (on a small parameter subset, :mod:`vlm_treegrpo.rollout.scores`). With
``algo.credit: rredcot`` the rollout's advantages are replaced by RREDCoT's per-segment ones
(arXiv 2606.06475, :mod:`vlm_treegrpo.credit.rredcot`).

Checkpoints (``log.checkpoint_every``, and on SIGTERM / Ctrl-C) and ``log.resume`` let a stopped
run go on exactly where it stopped (:mod:`vlm_treegrpo.train.checkpoint`, :mod:`vlm_treegrpo.train.interrupt`).

With ``sft.steps > 0`` a supervised warm start (:mod:`vlm_treegrpo.train.sft`) runs between the
``eval_before`` and the first GRPO step; its greedy accuracy is reported as ``eval_warm``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import signal
import sys
import time
from pathlib import Path

import torch
import yaml

from vlm_treegrpo.train import checkpoint
from vlm_treegrpo.config import ConfigError, TrainConfig
from vlm_treegrpo.data.loaders import DataError
from vlm_treegrpo.data.sources import Task, task_from_config
from vlm_treegrpo.train.distributed import Dist, from_env, pool_metrics
from vlm_treegrpo.train.throughput import device_peak, throughput
from vlm_treegrpo.train.evaluate import SAMPLED, evaluate_held_out
from vlm_treegrpo.train.interrupt import StopRequests
from vlm_treegrpo.train.optim import adamw, lr_schedule
from vlm_treegrpo.train.preflight import check_inputs, data_fits_model
from vlm_treegrpo.train.prompts import EncodedPrompts
from vlm_treegrpo.policy.base import Policy
from vlm_treegrpo.rewards.functions import RewardSet
from vlm_treegrpo.policy.factory import build_policy, limit_pixels
from vlm_treegrpo.train.runtime import autocast_ctx, resolve_device, setup
from vlm_treegrpo.train.sft import warm_start
from vlm_treegrpo.train.step import gradient_diagnostics, leaf_texts, rollout_step, update_step
from vlm_treegrpo.train.run_name import with_run_name
from vlm_treegrpo.train.trackers import Trackers, sample_rows
from vlm_treegrpo.credit.rredcot import rredcot_for


class PromptSampler:
    """Cycles through the training set in a fresh seeded order each epoch."""

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise ValueError("data: the training set is empty")
        self.n, self.gen, self.order, self.pos = n, torch.Generator().manual_seed(seed), [], 0

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= len(self.order):
                self.order, self.pos = torch.randperm(self.n, generator=self.gen).tolist(), 0
            out.append(self.order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "order": list(self.order), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.order, self.pos = list(state["order"]), state["pos"]


NONFINITE = "nonfinite_gradients"
"""``stopped_by`` of a run stopped by ``optim.max_nonfinite_steps``."""
NONFINITE_WEIGHTS = "nonfinite_weights"
"""``stopped_by`` of a run whose weights were not finite after an update (stopped at once, the
broken weights not checkpointed)."""


def _sft(policy: Policy, task: Task, train_prompts, cfg: TrainConfig, device, run: Path, bar, dist: Dist = Dist()) -> dict:
    """The supervised warm start; writes ``sft.jsonl`` and returns its summary fields."""
    s, device_ctx = cfg.sft, lambda: autocast_ctx(device, cfg.model.autocast)
    path = run / "sft.jsonl"
    if dist.main:
        path.write_text("")

    def log(row: dict) -> None:
        if not dist.main:
            return
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if bar is not None:
            bar.set_description(f"sft {row['step']}/{s.steps}")
            bar.set_postfix(nll=f"{row['nll']:.3f}")

    t0 = time.time()
    sampler = PromptSampler(len(task.train), cfg.optim.seed + 1)
    rows = warm_start(policy, task.train, train_prompts, sampler, s.steps, s.lr, s.batch_size, s.target,
                      cfg.optim.micro_batch, cfg.optim.max_grad_norm, device, device_ctx, log, dist)
    if bar is not None:
        bar.set_description("train")
    return {"sft_steps": s.steps, "sft_seconds": round(time.time() - t0, 2), "sft_final_nll": rows[-1]["nll"]}


def train(cfg: TrainConfig, quiet: bool = False) -> dict:
    """Run a whole job; returns (and writes) the summary.

    Under ``torchrun`` with several processes it trains data-parallel
    (:mod:`vlm_treegrpo.train.distributed`): each process samples and scores its share of each step's
    ``rollout.prompts_per_step`` prompts, the update is the one of the whole step, and process 0
    writes the logs, samples and checkpoint."""
    t_start = time.time()
    dist, device = from_env(resolve_device(cfg.model.device))
    try:
        with contextlib.ExitStack() as closing:  # (the reward workers end with the run, however it ends)
            return _train(with_run_name(cfg, dist), quiet, dist, device, t_start, closing)
    finally:
        dist.close()


def _check_shares(cfg: TrainConfig, world: int) -> None:
    """Each process gets an equal share of a step's prompts (and of a warm-start batch)."""
    if cfg.rollout.prompts_per_step % world:
        raise ConfigError(f"rollout.prompts_per_step: {cfg.rollout.prompts_per_step} prompts do not split over {world} processes")
    if cfg.sft.steps > 0 and cfg.sft.batch_size % world:
        raise ConfigError(f"sft.batch_size: {cfg.sft.batch_size} examples do not split over {world} processes")


def check_splits(task: Task, cfg: TrainConfig, quiet: bool = False) -> None:
    """An empty training set is a :class:`DataError`; so is an empty test set with an evaluation
    to make (its accuracy would read as 0.0), unless ``eval.allow_empty``: a warning then, and no
    evaluation."""
    if not task.train:
        raise DataError(f"data.source: the training set of {cfg.data.source!r} is empty"
                        + (f" ({task.skipped} bad records skipped by data.skip_bad)" if task.skipped else ""))
    if task.test or not (cfg.eval.before or cfg.eval.after or cfg.eval.every):
        return
    where = cfg.data.test_source or cfg.data.source
    if not cfg.eval.allow_empty:
        raise DataError(f"data: the test set of {where!r} is empty, so there is nothing to evaluate "
                        "(set data.test_source, or eval.allow_empty=true to train without evaluating)")
    if not quiet:
        print(f"warning: the test set of {where!r} is empty; no evaluation (eval.allow_empty)", file=sys.stderr, flush=True)


def _resume_point(cfg: TrainConfig) -> Path | None:
    """The checkpoint ``log.resume`` continues from (checked against ``cfg``), or None."""
    if cfg.log.resume == "off":
        return None
    found = checkpoint.find(cfg.log.path)
    if found is None:
        if cfg.log.resume == "must":
            raise ConfigError(f"log.resume: no checkpoint in {cfg.log.path / checkpoint.DIR} (log.resume=auto starts afresh then)")
        return None
    checkpoint.check_compatible(checkpoint.read_meta(found)["config"], cfg, found)
    return found


def _train(cfg: TrainConfig, quiet: bool, dist: Dist, device: torch.device, t_start: float, closing: contextlib.ExitStack) -> dict:
    _check_shares(cfg, dist.world)
    run = cfg.log.path
    resume_from = _resume_point(cfg)
    check_inputs(cfg)  # (the model name, the data and the rewards are checked before any model loads)
    task = task_from_config(cfg.data)
    check_splits(task, cfg, quiet)
    data_fits_model(task, cfg.model.name)
    try:
        reward_set = closing.enter_context(RewardSet.from_config(cfg.algo.rewards, cfg.algo.reward_timeout_s, cfg.algo.reward_workers))
    except ValueError as err:
        raise ConfigError(f"algo.rewards: {err}") from err
    if dist.main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    trackers = Trackers.open(cfg.log.report_to if dist.main else [], run, cfg.log.name, cfg.log.project, cfg.to_dict())
    torch.manual_seed(cfg.optim.seed)
    setup(cfg.model, device)

    policy = build_policy(cfg.model, device, cfg.model.training_dtype(device.type), cfg.model.attn_implementation)
    limit_pixels(policy, cfg.data.min_pixels, cfg.data.max_pixels, cfg.model.name)
    model = policy.model
    dist.broadcast_params(model)
    if dist.rank:
        torch.manual_seed(dist.seed(cfg.optim.seed))
    credit = None
    if cfg.algo.credit == "rredcot":
        credit = rredcot_for(policy, cfg.algo, cfg.rollout.temperature)

    if task.held_out and dist.main:  # (no test split: say which training records evaluation holds out)
        (run / "held_out.json").write_text(json.dumps({"source": cfg.data.source, "records": task.held_out}))
        if not quiet:
            print(f"data: {task.note} (all listed in {run / 'held_out.json'})", file=sys.stderr, flush=True)
    train_prompts = EncodedPrompts(policy, task.train, task.instruction, "train")  # (encoded when drawn: images decoded then)
    test_prompts = EncodedPrompts(policy, task.test, task.instruction, "test")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay)
    scheduler = lr_schedule(optimizer, cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.steps)
    sampler = PromptSampler(len(task.train), cfg.optim.seed)

    bar = None
    if cfg.log.progress and not quiet and dist.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.optim.steps, desc="train", dynamic_ncols=True)
    summary: dict = {"run": str(run), "model": cfg.model.name, "K": cfg.rollout.K, "M": cfg.rollout.M, "data_skipped": task.skipped}
    if task.held_out:
        summary["data_held_out"] = len(task.held_out)
    n_params = sum(p.numel() for p in model.parameters())
    peak = device_peak(device)
    summary["throughput_peak"] = {**peak, "params": n_params}  # (what update_mfu divides by)
    if dist.active:
        summary["processes"] = dist.world
    best: dict = {}

    def keep_if_best(ev: dict, step: int) -> None:
        """``log.save_best``: the weights behind ``ev`` when its accuracy beats the best so far."""
        if cfg.log.save_best and ev["accuracy"] > best.get("accuracy", -1.0):
            best.update(step=step, accuracy=ev["accuracy"])
            if dist.main:
                checkpoint.save_best(run, model, cfg, step, ev["accuracy"])

    if cfg.eval.before and resume_from is None and task.test:
        summary["eval_before"] = evaluate_held_out(policy, task, test_prompts, cfg, "before", bar, dist)
        keep_if_best(summary["eval_before"], 0)
        trackers.log_metrics({"eval_accuracy": summary["eval_before"]["accuracy"]}, 0)
    if cfg.sft.steps > 0 and resume_from is None:
        summary.update(_sft(policy, task, train_prompts, cfg, device, run, bar, dist))
        if task.test:
            summary["eval_warm"] = evaluate_held_out(policy, task, test_prompts, cfg, "warm", bar, dist)
            keep_if_best(summary["eval_warm"], 0)
    elif getattr(policy, "warm_start", None) and "eval_before" in summary and resume_from is None:
        summary["warm_start"] = policy.warm_start  # (warm-started before this run, e.g. an aligned VLM: GRPO starts here)
        summary["eval_warm"] = summary["eval_before"]
    ref_policy = None  # the KL reference: the policy GRPO starts from (after any warm start)
    if cfg.algo.beta > 0 and cfg.model.lora_r == 0:  # LoRA: the base model, adapters disabled
        ref_policy = copy.copy(policy)
        ref_policy.model = copy.deepcopy(policy.model).eval().requires_grad_(False)
    ref_model = ref_policy.model if ref_policy is not None else None
    metrics_path, samples_path = run / "metrics.jsonl", run / "samples.jsonl"
    state = checkpoint.TrainerState(step=0, sampler={}, summary=dict(summary), run_id=checkpoint.new_run_id())
    if resume_from is not None:
        state, rng_restored = checkpoint.load(resume_from, model, optimizer, scheduler, ref_model, device, dist)
        state.run_id = state.run_id or checkpoint.new_run_id()  # (a checkpoint from before run ids)
        best.update(state.best)
        sampler.load_state_dict(state.sampler)
        summary.update({k: v for k, v in state.summary.items() if k not in summary})  # (eval_before, the warm start's)
        summary["resumed_from_step"] = state.step
        if dist.main and not quiet:
            print(f"resuming from step {state.step} of {resume_from}", file=sys.stderr, flush=True)
        if not rng_restored:  # (written by fewer processes: this one draws a fresh stream)
            torch.manual_seed(dist.seed(cfg.optim.seed) + state.step)
            summary["resume_rng"] = "reseeded"
        if dist.main:
            checkpoint.keep_rows(metrics_path, state.step)
            checkpoint.keep_rows(samples_path, state.step)
        if bar is not None:
            bar.update(state.step)
    elif dist.main:
        metrics_path.write_text("")
        samples_path.write_text("")
    pre_loop = state.summary
    failures_total: dict[str, int] = dict(state.failures_total)
    last_diag: dict = dict(state.last_diag)
    t_train, seconds_before = time.time(), state.train_seconds
    steps_run, stopped_by, saves = state.step, None, {"written": 0, "seconds": 0.0}
    updates_skipped, nonfinite_in_a_row = state.updates_skipped, 0
    every = cfg.log.checkpoint_every
    last = cfg.optim.steps
    if cfg.optim.time_budget_s and seconds_before >= cfg.optim.time_budget_s:
        last = state.step  # (resumed with its time budget already spent: no more steps)

    def draw(k: int) -> tuple[list, list] | None:
        """``k`` more prompts of the training order for this process (``rollout.refill_rounds``),
        or None when no process asks for any. Every process calls it in each round: all take the
        prompts every process asked for, in rank order, so their samplers stay the same."""
        wanted = [int(n) for n in dist.gather(k)]
        if not sum(wanted):
            return None
        more = sampler.take(sum(wanted))
        mine = more[sum(wanted[: dist.rank]) : sum(wanted[: dist.rank + 1])]
        return [task.train[i] for i in mine], [train_prompts[i] for i in mine]

    with StopRequests() as stop:
        for step in range(state.step + 1, last + 1):
            idx = dist.shard(sampler.take(cfg.rollout.prompts_per_step))  # (every process draws the same, keeps its share)
            t_step = time.time()
            data = rollout_step(policy, [task.train[i] for i in idx], [train_prompts[i] for i in idx], reward_set, cfg, credit, draw)
            diag = {}
            if cfg.algo.diag_every and (step - 1) % cfg.algo.diag_every == 0 and dist.main:  # (on process 0's share)
                diag = gradient_diagnostics(policy, data, cfg, device)
                last_diag.update(diag)
            stats = update_step(policy, ref_policy, optimizer, scheduler, data, cfg, device, dist)
            stats.update(throughput(data.metrics["unpacked_tokens"], data.metrics["generated_tokens"], stats["update_tokens"],
                                    time.time() - t_step, data.metrics["time_generate"], stats["time_update"], n_params, peak["peak_tflops"]))
            updates_skipped += stats["skipped_updates"]
            nonfinite_in_a_row = nonfinite_in_a_row + 1 if stats["skipped_updates"] == cfg.algo.updates_per_batch else 0
            diverged = bool(cfg.optim.max_nonfinite_steps) and nonfinite_in_a_row >= cfg.optim.max_nonfinite_steps
            broken = bool(stats["nonfinite_weights"])
            metrics = pool_metrics(dist.gather(data.metrics)) if dist.active else data.metrics
            row = {"step": step, **metrics, **diag, **stats, "elapsed": round(time.time() - t_start, 2)}
            for k, v in row.items():
                if k.startswith("reward_failures/"):
                    failures_total[k.split("/", 1)[1]] = failures_total.get(k.split("/", 1)[1], 0) + v
            if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.optim.steps and not broken and task.test:
                ev = evaluate_held_out(policy, task, test_prompts, cfg, f"step {step}", bar, dist)
                row["eval_accuracy"] = ev["accuracy"]
                row.update({f"eval_{k}": v for k, v in ev.items() if k.startswith(SAMPLED)})
                keep_if_best(ev, step)
            if dist.main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                trackers.log_metrics(row, step)
            if cfg.log.samples_every and step % cfg.log.samples_every == 0 and dist.main:
                texts = leaf_texts(policy, data.trees[:1], cfg.rollout.K, cfg.rollout.M)
                with samples_path.open("a") as f:
                    f.write(json.dumps({"step": step, "prompt": data.examples[0].prompt, "answer": data.examples[0].answer,
                                        "rewards": data.rewards[0].flatten().tolist(), "completions": texts}) + "\n")
                trackers.log_samples(sample_rows(step, data.examples[0].prompt, data.examples[0].answer,
                                                 data.rewards[0].flatten().tolist(), texts), step)
            if bar is not None:
                bar.update(1)
                cos = last_diag.get("norm/grad_cosine")
                bar.set_postfix(reward=f"{row['reward']:.3f}", std=f"{row['reward_std_within']:.2f}", zero=f"{row['zero_std_frac']:.2f}",
                                cos="-" if cos is None else f"{cos:.2f}", len=f"{row['completion_tokens']:.0f}",
                                ent="-" if row.get("entropy") is None else f"{row['entropy']:.2f}",
                                loss=f"{row['loss']:.4f}", gen=f"{row['time_generate']:.1f}s", upd=f"{row['time_update']:.1f}s")
            steps_run = step
            over_budget = bool(cfg.optim.time_budget_s) and seconds_before + time.time() - t_train >= cfg.optim.time_budget_s
            over_budget, signalled = dist.max([over_budget, stop.signal or 0])  # (all stop together, on any process's signal)
            if broken:
                stopped_by = NONFINITE_WEIGHTS
                if dist.main and not quiet:
                    kept = checkpoint.find(run)
                    print(f"step {step}: a weight was not finite (NaN or inf) after the update; stopped without checkpointing it"
                          + (f" (the checkpoint in {kept} holds step {checkpoint.read_meta(kept)['step']})" if kept else "")
                          + ". A lower optim.lr, optim.max_grad_norm or model.autocast=none may help", file=sys.stderr, flush=True)
                break
            if signalled or diverged or (every and (step % every == 0 or step == cfg.optim.steps or over_budget)):
                state = checkpoint.TrainerState(step, sampler.state_dict(), pre_loop, failures_total, last_diag,
                                                seconds_before + time.time() - t_train, dict(best), state.run_id, updates_skipped)
                saves["seconds"] += checkpoint.save(run, state, model, optimizer, scheduler, ref_model, cfg, device, dist)
                saves["written"] += 1
            if signalled:
                stopped_by = signal.Signals(int(signalled)).name
                if dist.main and not quiet:
                    print(f"{stopped_by}: stopped after step {step}, checkpoint in {run / checkpoint.DIR} "
                          "(the same command with log.resume=auto goes on)", file=sys.stderr, flush=True)
                break
            if diverged:
                stopped_by = NONFINITE
                if dist.main and not quiet:
                    print(f"step {step}: the gradient was not finite (NaN or inf) in {nonfinite_in_a_row} steps in a row, so the weights "
                          f"are those after step {step - nonfinite_in_a_row}; stopped, checkpoint in {run / checkpoint.DIR}. A lower "
                          "optim.lr, optim.max_grad_norm or model.autocast=none may help", file=sys.stderr, flush=True)
                break
            if over_budget:
                break
    train_seconds = seconds_before + time.time() - t_train
    if cfg.eval.after and stopped_by is None and task.test:
        summary["eval_after"] = evaluate_held_out(policy, task, test_prompts, cfg, "after", bar, dist)
        keep_if_best(summary["eval_after"], steps_run)
        trackers.log_metrics({"eval_accuracy": summary["eval_after"]["accuracy"]}, steps_run)
    if bar is not None:
        bar.close()
    if dist.active:
        summary["replicas_in_sync"] = dist.in_sync(model)
    if cfg.log.save_model and dist.main and stopped_by is None:
        policy.save(run / "model")
    dist.barrier()
    summary.update(
        steps=steps_run,
        train_seconds=round(train_seconds, 2),
        wall_seconds=round(time.time() - t_start, 2),
        reward_failures=failures_total,
        updates_skipped=updates_skipped,
    )
    if saves["written"]:
        summary["checkpoints"] = {"written": saves["written"], "seconds": round(saves["seconds"], 2), "path": str(run / checkpoint.DIR)}
    if best:
        summary["best"] = {**best, "path": str(run / checkpoint.BEST)}
    if stopped_by is not None:
        summary["stopped_by"] = stopped_by  # (no final evaluation or model save: go on with log.resume=auto)
    if "eval_before" in summary and "eval_after" in summary:
        summary["accuracy_gain"] = summary["eval_after"]["accuracy"] - summary["eval_before"]["accuracy"]
    if "eval_warm" in summary and "eval_after" in summary:
        summary["rl_gain"] = summary["eval_after"]["accuracy"] - summary["eval_warm"]["accuracy"]
    if dist.main:
        (run / "summary.json").write_text(json.dumps(summary, indent=2))
    trackers.close()
    return summary
