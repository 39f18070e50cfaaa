"""Greedy held-out evaluation: accuracy by the correctness reward, plus format and length."""
from __future__ import annotations

import time

import torch

from vlm_treegrpo.data.types import Example
from vlm_treegrpo.rewards import correctness_reward, format_reward


@torch.no_grad()
def evaluate(
    policy,
    examples: list[Example],
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 50,
    progress=None,
) -> dict:
    """Greedy-decode every prompt once and score it.

    Returns ``{"accuracy", "format_rate", "mean_completion_tokens", "n", "seconds", "samples"}``
    where ``samples`` holds the first few (prompt, completion, answer, correct) for inspection.
    """
    model = policy.model
    was_training = model.training
    model.eval()
    t0 = time.time()
    correct, formatted, lengths, samples = [], [], [], []
    for start in range(0, len(prompts), batch_size):
        outs = policy.greedy(prompts[start : start + batch_size], max_new_tokens)
        for j, (ids, text) in enumerate(zip(outs, policy.decode(outs))):
            ex = examples[start + j]
            ok = correctness_reward(text, ex)
            correct.append(ok)
            formatted.append(format_reward(text, ex))
            lengths.append(len(ids))
            if len(samples) < 5:
                samples.append({"prompt": ex.prompt, "completion": text, "answer": ex.answer, "correct": ok})
        if progress is not None:
            progress(min(start + batch_size, len(prompts)), len(prompts))
    if was_training:
        model.train()
    n = len(correct)
    return {
        "accuracy": sum(correct) / n,
        "format_rate": sum(formatted) / n,
        "mean_completion_tokens": sum(lengths) / n,
        "n": n,
        "seconds": round(time.time() - t0, 2),
        "samples": samples,
    }
