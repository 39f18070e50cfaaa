"""One GRPO step in two halves, as the training loop (:mod:`vlm_treegrpo.train.loop`) and the
benchmark run them: :func:`rollout_step` samples a K x M tree per prompt, scores every leaf,
computes the thought and continuation advantages and packs the trees; :func:`update_step` makes
the optimizer step(s) on that batch. :func:`gradient_diagnostics` adds the per-prompt gradient
diagnostics of std normalization (arXiv 2601.23135).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch

from vlm_treegrpo.config import TrainConfig
from vlm_treegrpo.core.advantages import group_advantages, tree_advantages
from vlm_treegrpo.core.diagnostics import mean_pairwise_cosine, reward_std_stats, update_norms
from vlm_treegrpo.core.losses import kl_penalty, masked_mean, policy_loss, policy_loss_metrics, resolve_agg
from vlm_treegrpo.train.distributed import Dist
from vlm_treegrpo.train.optim import clipped_step, weights_finite
from vlm_treegrpo.policy.base import Policy, TrainBatch
from vlm_treegrpo.policy.text import TextPolicy
from vlm_treegrpo.rewards.functions import RewardSet
from vlm_treegrpo.rollout.logprobs import collect_entropy
from vlm_treegrpo.rollout.tree import SamplingParams, Tree
from vlm_treegrpo.train.runtime import autocast_ctx
from vlm_treegrpo.rollout.scores import token_score_features, weighted_row_sums


@dataclass
class StepData:
    """What one rollout produced, before the update."""

    trees: list[Tree]
    rewards: torch.Tensor  # [N, K, M]
    thought_adv: torch.Tensor  # [N, K]
    answer_adv: torch.Tensor  # [N, K, M]
    packed: TrainBatch
    metrics: dict
    examples: list = field(default_factory=list)
    """The example of each tree (after any refill, :func:`rollout_step`)."""


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


def sample_and_score(policy: Policy, examples, prompts, reward_set: RewardSet, cfg: TrainConfig):
    """K x M trees of ``prompts`` and the rewards of their leaves: ``(trees, scored, texts,
    seconds sampling, seconds scoring)``."""
    r = cfg.rollout
    t0 = time.time()
    policy.model.eval()
    with autocast_ctx(next(policy.model.parameters()).device, cfg.model.autocast):
        trees = policy.sample(prompts, r.K, r.M, r.thought_max_tokens, r.answer_max_tokens, SamplingParams.of(r), r.branch_delimiters)
    t1 = time.time()
    texts = leaf_texts(policy, trees, r.K, r.M)
    scored = reward_set(texts, [ex for ex in examples for _ in range(r.K * r.M)])
    return trees, scored, texts, t1 - t0, time.time() - t1


def no_signal(rewards: torch.Tensor) -> torch.Tensor:
    """``rewards [N, G]`` -> ``[N]`` bool: the prompts whose G rewards all agree (all their
    group-relative advantages are 0, so they add no policy gradient)."""
    return (rewards == rewards[:, :1]).all(-1)


def rollout_step(policy: Policy, examples, prompts, reward_set: RewardSet, cfg: TrainConfig, credit=None, draw=None) -> StepData:
    """Sample trees, score leaves, compute advantages and pack the batch.

    ``credit`` (a :class:`vlm_treegrpo.credit.rredcot.RRedCoT`, or None for outcome credit) replaces the
    packed per-token advantages after packing. ``draw(k)`` gives ``k`` more ``(examples,
    prompts)``, or None when no process has a prompt to replace: with ``rollout.refill_rounds``,
    each prompt without signal (:func:`no_signal`) is replaced by a drawn one, sampled and scored,
    for up to that many rounds (DAPO's dynamic sampling, bounded).
    """
    r = cfg.rollout
    N, K, M = len(examples), r.K, r.M
    examples, prompts = list(examples), list(prompts)
    trees, scored, texts, t_gen, t_reward = sample_and_score(policy, examples, prompts, reward_set, cfg)
    G = K * M
    per_fn = {name: v.view(N, G) for name, v in scored.per_fn.items()}  # [N, G] each
    total = scored.total.view(N, G)  # [N, G]
    failures, errors = dict(scored.failures), list(scored.errors)
    refilled = 0
    for _ in range(r.refill_rounds if draw is not None else 0):
        idx = no_signal(total).nonzero().flatten().tolist()
        drawn = draw(len(idx))  # (under data parallelism every process calls it each round: it is collective)
        if drawn is None:  # no prompt without signal, on any process
            break
        if not idx:
            continue
        new_examples, new_prompts = drawn
        new_trees, new_scored, new_texts, tg, tr = sample_and_score(policy, new_examples, new_prompts, reward_set, cfg)
        t_gen, t_reward, refilled = t_gen + tg, t_reward + tr, refilled + len(idx)
        for j, i in enumerate(idx):
            examples[i], prompts[i], trees[i] = new_examples[j], new_prompts[j], new_trees[j]
            texts[i * G : (i + 1) * G] = new_texts[j * G : (j + 1) * G]
        total[idx] = new_scored.total.view(len(idx), G)
        for name, v in new_scored.per_fn.items():
            per_fn[name][idx] = v.view(len(idx), G)
        failures = {name: failures.get(name, 0) + n for name, n in new_scored.failures.items()}
        errors += new_scored.errors
    rewards = total.view(N, K, M)  # [N, K, M]
    t1 = time.time()
    thought_adv, answer_adv = compute_advantages(rewards, cfg)
    t_reward += time.time() - t1

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
        "generated_tokens": sum(thought_lens) + sum(len(a) for t in trees for answers in t.answers for a in answers),
        "time_generate": t_gen,
        "time_reward": t_reward,
        **credit_metrics,
    }
    if r.refill_rounds:
        metrics["refilled_prompts"] = refilled
    for name, values in per_fn.items():
        metrics[f"reward/{name}"] = values.mean().item()
    for name, count in failures.items():
        metrics[f"reward_failures/{name}"] = count
    if errors:
        metrics["reward_errors"] = errors[:3]
    return StepData(trees, rewards, thought_adv, answer_adv, packed, metrics, examples)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def gradient_diagnostics(policy: Policy, data: StepData, cfg: TrainConfig, device) -> dict:
    """Per-prompt gradient diagnostics of std normalization (arXiv 2601.23135), at the current weights.

    For each prompt p, ``g_p`` is the gradient of its token-mean policy-gradient loss with GRPO's
    *outcome* advantages (whatever ``algo.credit`` is) restricted to the per-channel gain of the
    final hidden state (:mod:`vlm_treegrpo.rollout.scores`; H numbers), computed twice: with std-scaled
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

    Under data parallelism (``dist``, :mod:`vlm_treegrpo.train.distributed`) ``data`` is this process's
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
    update_tokens = int(batch.input_ids.numel()) * a.updates_per_batch  # (what the forward computes, padding included)
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
        losses: list[torch.Tensor] = []  # (device scalars, read after the step: no device sync between micro-batches)
        kls: list[torch.Tensor] = []
        clipped: list[tuple[torch.Tensor, torch.Tensor]] = []  # (off-policy: each micro-batch's weighted clip fraction and ratio)
        for ci, c in enumerate(chunks):
            host = batch.rows(c)
            n_target = float(host.target_mask.sum())  # (read on the host: no device sync)
            if n_target == 0:
                continue
            mb = host.to(device)
            with autocast_ctx(device, cfg.model.autocast), collect_entropy() if u == 0 else contextlib.nullcontext() as ent:
                logp = policy.logp(mb, cfg.rollout.temperature)  # [n, L]
            entropy += ent or []
            old_logp = old[ci] if old is not None else logp.detach()
            loss = policy_loss(logp, old_logp, mb.advantages, mb.target_mask, kind=a.loss, clip_eps=a.clip_eps, agg=a.agg,
                               max_len=max_len, clip_eps_high=a.clip_eps_high, behav_logp=old[ci] if old is not None else None,
                               tis_cap=a.tis_cap)
            if resolve_agg(a.agg) == "token_mean":
                weight = n_target / total_tokens
            else:
                weight = float((host.target_mask.sum(-1) > 0).sum()) / rows_with_tokens
            loss = loss * weight
            if a.beta > 0:
                kl = masked_mean(kl_penalty(logp, refs[ci], a.kl_kind), mb.target_mask)
                loss = loss + a.beta * kl * weight
                kls.append((kl * weight).detach())
            loss.backward()
            losses.append(loss.detach())
            share = n_target / float(live_tokens)  # metrics average over updated tokens
            if old is None:  # on-policy: the ratio is exactly 1, nothing is clipped
                sums["ratio_mean"] += share
            else:
                m = policy_loss_metrics(logp.detach(), old_logp, mb.advantages, mb.target_mask, a.clip_eps, a.clip_eps_high)
                clipped.append((m["clip_frac"] * share, m["ratio_mean"] * share))
        params = [p for p in model.parameters() if p.requires_grad]
        dist.sum_grads(params)
        gn, stepped = clipped_step(optimizer, params, o.max_grad_norm)  # (the same on every process: summed gradients)
        skipped += not stepped
        broken = stepped and not weights_finite(params)  # (a finite gradient that still overflowed a weight)
        sums["loss"], sums["kl"] = sum(float(x) for x in losses), sum(float(x) for x in kls)
        sums["clip_frac"] += sum(float(c) for c, _ in clipped)
        sums["ratio_mean"] += sum(float(r) for _, r in clipped)
        *pooled, trees, ent_sum, ent_weight = dist.sum([*sums.values(), N, sum(e for e, _ in entropy), sum(w for _, w in entropy)])
        stats = dict(zip(sums, pooled), grad_norm=gn, trees_updated=int(trees), skipped_updates=skipped, nonfinite_weights=int(broken))
        # the policy's entropy at the updated tokens, before this step's update (None: nothing updated)
        stats["entropy"] = ent_sum / ent_weight if ent_weight else None
        if broken:  # (the loop stops the run; no further pass on broken weights)
            break
    stats["lr"] = optimizer.param_groups[0]["lr"]  # (the rate this step used)
    if skipped < a.updates_per_batch:  # (the schedule counts the updates made, as transformers' Trainer does)
        scheduler.step()
    stats["time_update"] = time.time() - t0
    stats["update_tokens"] = update_tokens
    return stats
