"""The training loop: rollout -> rewards -> advantages -> loss -> optimizer step.

Reads top to bottom. Each step samples a K x M tree per prompt (GRPO-MA, arXiv 2509.24494;
flat GRPO when M = 1), scores every leaf with the configured rewards, computes thought and
continuation advantages with the pure functions of :mod:`vlm_treegrpo.core.advantages`, packs
each tree into one row (prompt once, each thought once) and applies the policy loss of
:mod:`vlm_treegrpo.core.losses` (GRPO's clipped surrogate or RGRA's ``-A * logp``).

Departures from the papers, on purpose:
- A thought is a prefix cut at a branch delimiter or a token budget, not necessarily a full
  ``<think>`` block; a thought that already ended with EOS is a complete answer whose M leaves
  share one reward.
- With ``updates_per_batch = 1`` the update is on-policy: the old log-probs equal the current
  ones (detached), so no separate old-log-prob pass is run and GRPO's gradient equals RGRA's.

Theory as features: every step logs the within-prompt reward-std statistics of arXiv 2601.23135
(mean, spread, zero-std fraction); every ``algo.diag_every`` steps :func:`gradient_diagnostics`
adds the norm of the update with and without the std scaling and the mean pairwise cosine of
per-prompt gradients (on a small parameter subset, :mod:`vlm_treegrpo.scores`). With
``algo.credit: rredcot`` the rollout's advantages are replaced by RREDCoT's per-segment ones
(arXiv 2606.06475, :mod:`vlm_treegrpo.credit`).

Checkpoints (``log.checkpoint_every``, and on SIGTERM / Ctrl-C) and ``log.resume`` let a stopped
run go on exactly where it stopped (:mod:`vlm_treegrpo.checkpoint`, :mod:`vlm_treegrpo.interrupt`).

With ``sft.steps > 0`` a supervised warm start (:mod:`vlm_treegrpo.sft`) runs between the
``eval_before`` and the first GRPO step; its greedy accuracy is reported as ``eval_warm``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from vlm_treegrpo import checkpoint
from vlm_treegrpo.config import ConfigError, ModelConfig, TrainConfig, resolve_autocast
from vlm_treegrpo.core.advantages import group_advantages, tree_advantages
from vlm_treegrpo.core.diagnostics import mean_pairwise_cosine, reward_std_stats, update_norms
from vlm_treegrpo.core.losses import kl_penalty, masked_mean, policy_loss, policy_loss_metrics
from vlm_treegrpo.data.sources import Task, task_from_config
from vlm_treegrpo.distributed import Dist, from_env, pool_metrics
from vlm_treegrpo.evaluate import SAMPLED, evaluate_held_out
from vlm_treegrpo.interrupt import StopRequests
from vlm_treegrpo.optim import adamw, clipped_step, lr_schedule
from vlm_treegrpo.policy import Policy, TextPolicy, TrainBatch, make_policy
from vlm_treegrpo.rewards import RewardSet
from vlm_treegrpo.rollout.attention import enable_activation_checkpointing
from vlm_treegrpo.rollout.logprobs import collect_entropy
from vlm_treegrpo.rollout.tree import SamplingParams, Tree
from vlm_treegrpo.scores import token_score_features, weighted_row_sums
from vlm_treegrpo.sft import warm_start


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


GPU_HOST_THREADS = 4
"""torch CPU threads by default when the model runs on a GPU. There the host only runs small
bookkeeping ops and launches kernels, and more threads cost wake-ups: on an H200 host (16 cores)
our SmolLM2-shaped step sampled in 1.13-1.18 s with 4 threads against 1.27-1.88 s with 16."""


def set_threads(threads: int, device: torch.device) -> None:
    """torch's CPU threads for ``model.threads``: that many when set; else all cores on the CPU
    (torch's default, left alone) and :data:`GPU_HOST_THREADS` when the model is on a GPU."""
    if threads:
        torch.set_num_threads(threads)
    elif device.type != "cpu":
        torch.set_num_threads(min(GPU_HOST_THREADS, torch.get_num_threads()))


def autocast_ctx(device: torch.device, kind: str):
    """bf16 autocast for the training forward when asked (``model.autocast``; ``auto`` is bf16 on
    a GPU: :func:`~vlm_treegrpo.config.resolve_autocast`). About 2x faster on CPUs with
    AVX512-BF16/AMX."""
    if resolve_autocast(kind, device.type) == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def lora_config(r: int, alpha: float, targets: list[str]):
    """The peft ``LoraConfig`` of ``model.lora_r / lora_alpha / lora_targets`` (no dropout)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)


def apply_lora(model, r: int, alpha: float, targets: list[str]):
    """Wrap the policy with LoRA adapters (peft); only the adapters train."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(r, alpha, targets))


def build_policy(m: ModelConfig, device, dtype: str, attn_implementation: str) -> Policy:
    """The policy ``model.*`` describes, in ``dtype``: LoRA adapters when ``lora_r`` > 0, and
    activation checkpointing when ``gradient_checkpointing`` is on."""
    policy = make_policy(m.name, device, dtype, attn_implementation)
    if m.lora_r > 0:
        policy.model = apply_lora(policy.model, m.lora_r, m.lora_alpha, m.lora_targets)
    if m.gradient_checkpointing:
        enable_activation_checkpointing(policy.model)
    return policy


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


@dataclass
class StepData:
    """What one rollout produced, before the update."""

    trees: list[Tree]
    rewards: torch.Tensor  # [N, K, M]
    thought_adv: torch.Tensor  # [N, K]
    answer_adv: torch.Tensor  # [N, K, M]
    packed: TrainBatch
    metrics: dict


def leaf_texts(policy: Policy, trees: list[Tree], K: int, M: int) -> list[str]:
    """Decoded completion of every leaf, in (prompt, thought, continuation) order."""
    return policy.decode([t.leaf_ids(k, m) for t in trees for k in range(K) for m in range(M)])


def compute_advantages(rewards: torch.Tensor, cfg: TrainConfig, scale: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``rewards [N, K, M]`` -> ``(thought_adv [N, K], answer_adv [N, K, M])``; ``scale`` overrides ``algo.scale``."""
    a = cfg.algo
    scale = scale or a.scale
    if cfg.rollout.M == 1:
        flat = group_advantages(rewards[:, :, 0], scale=scale, baseline=a.baseline, eps=a.eps)  # [N, K]
        return flat, torch.zeros_like(rewards)
    return tree_advantages(rewards, scale=scale, answer_scope=a.answer_scope, eps=a.eps)


def rollout_step(policy: Policy, examples, prompts, reward_set: RewardSet, cfg: TrainConfig, credit=None) -> StepData:
    """Sample trees, score leaves, compute advantages and pack the batch.

    ``credit`` (a :class:`vlm_treegrpo.credit.RRedCoT`, or None for outcome credit) replaces the
    packed per-token advantages after packing.
    """
    r = cfg.rollout
    N, K, M = len(examples), r.K, r.M
    t0 = time.time()
    policy.model.eval()
    sampling = SamplingParams.of(r)
    with autocast_ctx(next(policy.model.parameters()).device, cfg.model.autocast):
        trees = policy.sample(prompts, K, M, r.thought_max_tokens, r.answer_max_tokens, sampling, r.branch_delimiters)
    t_gen = time.time() - t0

    t1 = time.time()
    texts = leaf_texts(policy, trees, K, M)
    leaf_examples = [ex for ex in examples for _ in range(K * M)]
    scored = reward_set(texts, leaf_examples)
    rewards = scored.total.view(N, K, M)  # [N, K, M]
    thought_adv, answer_adv = compute_advantages(rewards, cfg)
    t_reward = time.time() - t1

    packed = policy.pack(trees, thought_adv, answer_adv)
    credit_metrics = {}
    if credit is not None:
        with autocast_ctx(next(policy.model.parameters()).device, cfg.model.autocast):
            packed, credit_metrics = credit(policy, trees, examples, rewards, packed, texts)
    std_stats = reward_std_stats(rewards.view(N, K * M))  # over all K*M leaves of each prompt
    thought_lens = [len(th) for t in trees for th in t.thoughts]
    leaf_lens = [len(t.leaf_ids(k, m)) for t in trees for k in range(K) for m in range(M)]
    metrics = {
        "reward": rewards.mean().item(),
        "reward_std_within": std_stats["mean_std"],
        "reward_std_spread": std_stats["spread"],
        "zero_std_frac": std_stats["zero_std_frac"],
        "thought_value_std": rewards.mean(-1).std(-1).mean().item() if K > 1 else 0.0,
        "completion_tokens": sum(leaf_lens) / len(leaf_lens),
        "thought_tokens": sum(thought_lens) / len(thought_lens),
        "thoughts_finished_frac": sum(sum(t.thought_done) for t in trees) / (N * K) if M > 1 else 1.0,
        "packed_tokens": int(packed.input_ids.numel()),
        "unpacked_tokens": sum(len(t.prompt_ids) for t in trees for _ in range(K * M)) + sum(leaf_lens),
        "time_generate": t_gen,
        "time_reward": t_reward,
        **credit_metrics,
    }
    for name, values in scored.per_fn.items():
        metrics[f"reward/{name}"] = values.mean().item()
    for name, count in scored.failures.items():
        metrics[f"reward_failures/{name}"] = count
    if scored.errors:
        metrics["reward_errors"] = scored.errors[:3]
    return StepData(trees, rewards, thought_adv, answer_adv, packed, metrics)


NONFINITE = "nonfinite_gradients"
"""``stopped_by`` of a run stopped by ``optim.max_nonfinite_steps``."""


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def gradient_diagnostics(policy: Policy, data: StepData, cfg: TrainConfig, device) -> dict:
    """Per-prompt gradient diagnostics of std normalization (arXiv 2601.23135), at the current weights.

    For each prompt p, ``g_p`` is the gradient of its token-mean policy-gradient loss with GRPO's
    *outcome* advantages (whatever ``algo.credit`` is) restricted to the per-channel gain of the
    final hidden state (:mod:`vlm_treegrpo.scores`; H numbers), computed twice: with std-scaled
    advantages and with centred, unscaled ones (same baseline). Logged: the norms of
    ``sum_p g_p`` both ways and their ratio (``norm/update_with_std``, ``norm/update_without_std``,
    ``norm/update_ratio``) and the mean pairwise cosine between the unscaled ``g_p``
    (``norm/grad_cosine``; zero-std prompts excluded). ``None`` where undefined (e.g. every
    prompt has zero std). Text policies only; others get ``{}``.
    """
    if not isinstance(policy, TextPolicy):
        return {}
    t0 = time.time()
    packs = {s: policy.pack(data.trees, *compute_advantages(data.rewards, cfg, scale=s)) for s in ("std", "none")}
    batch = packs["std"].to(device)
    with autocast_ctx(device, cfg.model.autocast):
        psi = token_score_features(policy.model, batch, cfg.rollout.temperature)  # [N, L, H]
    total = batch.target_mask.sum().clamp(min=1)
    g_std = weighted_row_sums(psi, batch.advantages) / total  # [N, H]
    g_none = weighted_row_sums(psi, packs["none"].advantages.to(device)) / total  # [N, H]
    norms = update_norms(g_std, g_none)
    return {
        "norm/update_with_std": norms["norm_with_std"],
        "norm/update_without_std": norms["norm_without_std"],
        "norm/update_ratio": _finite_or_none(norms["ratio"]),
        "norm/grad_cosine": _finite_or_none(mean_pairwise_cosine(g_none)),
        "norm/diag_seconds": time.time() - t0,
    }


def update_step(policy: Policy, ref_policy: Policy | None, optimizer, scheduler, data: StepData, cfg: TrainConfig, device,
                dist: Dist = Dist()) -> dict:
    """One optimizer step (or ``updates_per_batch`` of them) on a packed rollout batch.

    Under data parallelism (``dist``, :mod:`vlm_treegrpo.distributed`) ``data`` is this process's
    share of the step: the loss's normalizers are the step's (summed over the processes, the
    packed width their maximum) and the gradients are summed before clipping, so every process
    makes the update one process would make on the whole step."""
    a, o = cfg.algo, cfg.optim
    t0 = time.time()
    model = policy.model
    model.train()
    batch = data.packed
    max_len = int(dist.max([batch.input_ids.shape[1]])[0])
    # A tree whose advantages are all zero (every leaf got the same reward) adds exactly zero
    # policy gradient; without a KL term it is skipped. The normalizers still count it, so the
    # gradient is identical to the unskipped one.
    counts = [batch.target_mask.sum(), (batch.target_mask.sum(-1) > 0).sum()]
    live = ((batch.advantages != 0) & (batch.target_mask > 0)).any(-1)  # [N]
    if a.beta == 0:
        batch = batch.rows(live)
    N = batch.input_ids.shape[0]
    total_tokens, rows_with_tokens, live_tokens = (max(x, 1.0) for x in dist.sum([*counts, batch.target_mask.sum()]))
    chunks = [slice(i, i + o.micro_batch) for i in range(0, N, o.micro_batch)]

    def ref_logp(mb: TrainBatch) -> torch.Tensor:
        with torch.no_grad(), autocast_ctx(device, cfg.model.autocast):
            if ref_policy is not None:
                return ref_policy.logp(mb, cfg.rollout.temperature)
            with model.disable_adapter():  # LoRA: the base model is the reference
                return policy.logp(mb, cfg.rollout.temperature)

    old = None
    if a.updates_per_batch > 1:
        with torch.no_grad(), autocast_ctx(device, cfg.model.autocast):
            old = [policy.logp(batch.rows(c).to(device), cfg.rollout.temperature) for c in chunks]
    refs = [ref_logp(batch.rows(c).to(device)) for c in chunks] if a.beta > 0 else None

    stats: dict[str, float] = {}
    entropy: list[tuple[float, float]] = []
    skipped = 0
    for u in range(a.updates_per_batch):
        optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "ratio_mean": 0.0}
        for ci, c in enumerate(chunks):
            mb = batch.rows(c).to(device)
            if mb.target_mask.sum() == 0:
                continue
            with autocast_ctx(device, cfg.model.autocast), collect_entropy() if u == 0 else contextlib.nullcontext() as ent:
                logp = policy.logp(mb, cfg.rollout.temperature)  # [n, L]
            entropy += ent or []
            old_logp = old[ci] if old is not None else logp.detach()
            loss = policy_loss(logp, old_logp, mb.advantages, mb.target_mask, kind=a.loss, clip_eps=a.clip_eps, agg=a.agg, max_len=max_len)
            if a.agg == "token_mean":
                weight = mb.target_mask.sum() / total_tokens
            else:
                weight = (mb.target_mask.sum(-1) > 0).sum() / rows_with_tokens
            loss = loss * weight
            if a.beta > 0:
                kl = masked_mean(kl_penalty(logp, refs[ci], a.kl_kind), mb.target_mask)
                loss = loss + a.beta * kl * weight
                sums["kl"] += (kl * weight).item()
            loss.backward()
            sums["loss"] += loss.item()
            m = policy_loss_metrics(logp.detach(), old_logp, mb.advantages, mb.target_mask, a.clip_eps)
            share = float(mb.target_mask.sum() / live_tokens)  # metrics average over updated tokens
            sums["clip_frac"] += m["clip_frac"] * share
            sums["ratio_mean"] += m["ratio_mean"] * share
        params = [p for p in model.parameters() if p.requires_grad]
        dist.sum_grads(params)
        gn, stepped = clipped_step(optimizer, params, o.max_grad_norm)  # (the same on every process: summed gradients)
        skipped += not stepped
        *pooled, trees, ent_sum, ent_weight = dist.sum([*sums.values(), N, sum(e for e, _ in entropy), sum(w for _, w in entropy)])
        stats = dict(zip(sums, pooled), grad_norm=gn, trees_updated=int(trees), skipped_updates=skipped)
        # the policy's entropy at the updated tokens, before this step's update (None: nothing updated)
        stats["entropy"] = ent_sum / ent_weight if ent_weight else None
    stats["lr"] = optimizer.param_groups[0]["lr"]  # (the rate this step used)
    if skipped < a.updates_per_batch:  # (the schedule counts the updates made, as transformers' Trainer does)
        scheduler.step()
    stats["time_update"] = time.time() - t0
    return stats


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
    (:mod:`vlm_treegrpo.distributed`): each process samples and scores its share of each step's
    ``rollout.prompts_per_step`` prompts, the update is the one of the whole step, and process 0
    writes the logs, samples and checkpoint."""
    t_start = time.time()
    dist, device = from_env(resolve_device(cfg.model.device))
    try:
        return _train(cfg, quiet, dist, device, t_start)
    finally:
        dist.close()


def _check_shares(cfg: TrainConfig, world: int) -> None:
    """Each process gets an equal share of a step's prompts (and of a warm-start batch)."""
    if cfg.rollout.prompts_per_step % world:
        raise ConfigError(f"rollout.prompts_per_step: {cfg.rollout.prompts_per_step} prompts do not split over {world} processes")
    if cfg.sft.steps > 0 and cfg.sft.batch_size % world:
        raise ConfigError(f"sft.batch_size: {cfg.sft.batch_size} examples do not split over {world} processes")


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


def _train(cfg: TrainConfig, quiet: bool, dist: Dist, device: torch.device, t_start: float) -> dict:
    _check_shares(cfg, dist.world)
    run = cfg.log.path
    resume_from = _resume_point(cfg)
    if dist.main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    torch.manual_seed(cfg.optim.seed)
    set_threads(cfg.model.threads, device)

    policy = build_policy(cfg.model, device, cfg.model.training_dtype(device.type), cfg.model.attn_implementation)
    model = policy.model
    dist.broadcast_params(model)
    if dist.rank:
        torch.manual_seed(dist.seed(cfg.optim.seed))
    credit = None
    if cfg.algo.credit == "rredcot":
        from vlm_treegrpo.credit import rredcot_for

        credit = rredcot_for(policy, cfg.algo, cfg.rollout.temperature)

    task = task_from_config(cfg.data)
    reward_set = RewardSet.from_config(cfg.algo.rewards, cfg.algo.reward_timeout_s)
    train_prompts = [policy.encode(ex, task.instruction) for ex in task.train]
    test_prompts = [policy.encode(ex, task.instruction) for ex in task.test]

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay)
    scheduler = lr_schedule(optimizer, cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.steps)
    sampler = PromptSampler(len(task.train), cfg.optim.seed)

    bar = None
    if cfg.log.progress and not quiet and dist.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.optim.steps, desc="train", dynamic_ncols=True)
    summary: dict = {"run": str(run), "model": cfg.model.name, "K": cfg.rollout.K, "M": cfg.rollout.M, "data_skipped": task.skipped}
    if dist.active:
        summary["processes"] = dist.world
    best: dict = {}

    def keep_if_best(ev: dict, step: int) -> None:
        """``log.save_best``: the weights behind ``ev`` when its accuracy beats the best so far."""
        if cfg.log.save_best and ev["accuracy"] > best.get("accuracy", -1.0):
            best.update(step=step, accuracy=ev["accuracy"])
            if dist.main:
                checkpoint.save_best(run, model, cfg, step, ev["accuracy"])

    if cfg.eval.before and resume_from is None:
        summary["eval_before"] = evaluate_held_out(policy, task, test_prompts, cfg, "before", bar, dist)
        keep_if_best(summary["eval_before"], 0)
    if cfg.sft.steps > 0 and resume_from is None:
        summary.update(_sft(policy, task, train_prompts, cfg, device, run, bar, dist))
        summary["eval_warm"] = evaluate_held_out(policy, task, test_prompts, cfg, "warm", bar, dist)
        keep_if_best(summary["eval_warm"], 0)
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
    with StopRequests() as stop:
        for step in range(state.step + 1, last + 1):
            idx = dist.shard(sampler.take(cfg.rollout.prompts_per_step))  # (every process draws the same, keeps its share)
            data = rollout_step(policy, [task.train[i] for i in idx], [train_prompts[i] for i in idx], reward_set, cfg, credit)
            diag = {}
            if cfg.algo.diag_every and (step - 1) % cfg.algo.diag_every == 0 and dist.main:  # (on process 0's share)
                diag = gradient_diagnostics(policy, data, cfg, device)
                last_diag.update(diag)
            stats = update_step(policy, ref_policy, optimizer, scheduler, data, cfg, device, dist)
            updates_skipped += stats["skipped_updates"]
            nonfinite_in_a_row = nonfinite_in_a_row + 1 if stats["skipped_updates"] == cfg.algo.updates_per_batch else 0
            diverged = bool(cfg.optim.max_nonfinite_steps) and nonfinite_in_a_row >= cfg.optim.max_nonfinite_steps
            metrics = pool_metrics(dist.gather(data.metrics)) if dist.active else data.metrics
            row = {"step": step, **metrics, **diag, **stats, "elapsed": round(time.time() - t_start, 2)}
            for k, v in row.items():
                if k.startswith("reward_failures/"):
                    failures_total[k.split("/", 1)[1]] = failures_total.get(k.split("/", 1)[1], 0) + v
            if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.optim.steps:
                ev = evaluate_held_out(policy, task, test_prompts, cfg, f"step {step}", bar, dist)
                row["eval_accuracy"] = ev["accuracy"]
                row.update({f"eval_{k}": v for k, v in ev.items() if k.startswith(SAMPLED)})
                keep_if_best(ev, step)
            if dist.main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            if cfg.log.samples_every and step % cfg.log.samples_every == 0 and dist.main:
                texts = leaf_texts(policy, data.trees[:1], cfg.rollout.K, cfg.rollout.M)
                with samples_path.open("a") as f:
                    f.write(json.dumps({"step": step, "prompt": task.train[idx[0]].prompt, "answer": task.train[idx[0]].answer,
                                        "rewards": data.rewards[0].flatten().tolist(), "completions": texts}) + "\n")
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
    if cfg.eval.after and stopped_by is None:
        summary["eval_after"] = evaluate_held_out(policy, task, test_prompts, cfg, "after", bar, dist)
        keep_if_best(summary["eval_after"], steps_run)
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
    return summary
