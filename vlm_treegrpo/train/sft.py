"""Supervised warm start (SFT): teacher-forced NLL of a target completion, before GRPO.

A random-init or off-format policy rarely samples a correct, well-formed answer, so every
group reward is 0 and GRPO has no signal. A short supervised phase on the training split
(``sft.steps``) teaches the answer format and a first guess; GRPO then starts from there and
the run reports that starting point as ``eval_warm``.

The batch goes through the same :class:`~vlm_treegrpo.policy.base.Policy` methods as GRPO's, so
one code path serves text and vision-language policies: each example becomes a one-leaf
:class:`~vlm_treegrpo.rollout.tree.Tree` whose single, finished thought is the target
completion (``sft.target`` formatted with the reference answer, then EOS), ``policy.pack``
builds the training rows (a packed prompt tree for text, a leaf row with its images for a
VLM) and ``policy.logp`` scores them. With advantage 1 on every target token, the loss
:func:`sft_loss` is the token-mean negative log-likelihood of the targets.

Departure from usual SFT recipes: no loss on the prompt, no packing of several examples per
row, no schedule (constant learning rate, its own AdamW; GRPO's optimizer starts fresh).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import Tensor

from vlm_treegrpo.data.types import Example
from vlm_treegrpo.train.distributed import Dist
from vlm_treegrpo.train.optim import adamw, clipped_step
from vlm_treegrpo.policy.base import Policy, TrainBatch
from vlm_treegrpo.rollout.tree import Tree


def sft_loss(logp: Tensor, target_mask: Tensor) -> Tensor:
    """Token-mean NLL: ``-sum(w * logp) / sum(w)`` over target tokens.

    ``logp [N, L]`` per-token log-probs, ``target_mask [N, L]`` float weights (0 off target).
    Returns a scalar (0 when there is no target token).
    """
    total = target_mask.sum()  # []
    return -(logp * target_mask).sum() / total.clamp(min=1e-8)


def target_ids(tokenizer, example: Example, template: str) -> list[int]:
    """Token ids of ``template.format(answer=example.answer)`` followed by EOS (no BOS)."""
    ids = tokenizer(template.format(answer=example.answer), add_special_tokens=False)["input_ids"]
    return list(ids) + [tokenizer.eos_token_id]


def _ids_of(prompt) -> list[int]:
    """Token ids of an encoded prompt: the id list itself (text) or its ``input_ids`` tensor (VLM)."""
    return [int(i) for i in getattr(prompt, "input_ids", prompt)]


def sft_batch(policy: Policy, prompts: list, targets: list[list[int]]) -> TrainBatch:
    """The training batch of (prompt, target) pairs with advantage 1 on every target token.

    Each pair is a tree with one finished thought (the target) and no continuation, so
    ``policy.pack`` puts it in one row with weight 1 on each target token.
    """
    trees = [
        Tree(prompt_ids=_ids_of(p), thoughts=[t], thought_done=[True], answers=[[[]]], prompt=p)
        for p, t in zip(prompts, targets)
    ]
    N = len(trees)
    return policy.pack(trees, torch.ones(N, 1), torch.zeros(N, 1, 1))  # thought_adv [N, 1], answer_adv [N, 1, 1]


def sft_step(policy: Policy, batch: TrainBatch, optimizer, micro_batch: int, max_grad_norm: float, device,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext, dist: Dist = Dist()) -> dict:
    """One optimizer step on ``batch`` (gradient accumulation over ``micro_batch`` rows);
    returns ``{"nll", "grad_norm"}`` (the token-mean NLL before the step). Under data
    parallelism ``batch`` is this process's share: token-mean over the whole batch, gradients
    summed over the processes."""
    model = policy.model
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total = max(dist.sum([batch.target_mask.sum()])[0], 1.0)
    N = batch.input_ids.shape[0]
    nll = 0.0
    for start in range(0, N, micro_batch):
        mb = batch.rows(slice(start, start + micro_batch)).to(device)
        with autocast():
            logp = policy.logp(mb)  # [n, L]
        weight = mb.target_mask.sum() / total
        loss = sft_loss(logp, mb.target_mask) * weight
        loss.backward()
        nll += loss.item()
    params = [p for p in model.parameters() if p.requires_grad]
    dist.sum_grads(params)
    norm, _ = clipped_step(optimizer, params, max_grad_norm)  # (a non-finite gradient makes no step)
    return {"nll": dist.sum([nll])[0], "grad_norm": norm}


def warm_start(
    policy: Policy,
    examples: list[Example],
    prompts: list,
    sampler,
    steps: int,
    lr: float,
    batch_size: int,
    template: str,
    micro_batch: int,
    max_grad_norm: float,
    device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    on_step: Callable[[dict], None] | None = None,
    dist: Dist = Dist(),
) -> list[dict]:
    """Run ``steps`` SFT steps on ``examples`` (encoded as ``prompts``), ``batch_size`` drawn per
    step by ``sampler.take(n)`` (each process of a data-parallel job keeps its share,
    :mod:`vlm_treegrpo.train.distributed`); returns one metrics row per step (``step``, ``nll``,
    ``grad_norm``, ``seconds``), each also passed to ``on_step``."""
    targets = [target_ids(policy.tokenizer, ex, template) for ex in examples]
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr)
    rows = []
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = dist.shard(sampler.take(batch_size))
        batch = sft_batch(policy, [prompts[i] for i in idx], [targets[i] for i in idx])
        stats = sft_step(policy, batch, optimizer, micro_batch, max_grad_norm, device, autocast, dist)
        row = {"step": step, **stats, "seconds": round(time.time() - t0, 2)}
        rows.append(row)
        if on_step is not None:
            on_step(row)
    policy.model.eval()
    return rows
