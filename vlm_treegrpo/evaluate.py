"""Greedy held-out evaluation: accuracy by the correctness reward, plus format and length."""
from __future__ import annotations

import time

import torch

from vlm_treegrpo.data.types import Example
from vlm_treegrpo.rewards import correctness_reward, format_reward


@torch.no_grad()
def tally(policy, examples: list[Example], prompts: list[list[int]], max_new_tokens: int, batch_size: int = 50, progress=None) -> dict:
    """Greedy-decode every prompt once and score it: ``{"n", "correct", "formatted", "tokens",
    "samples"}``, sums over the prompts (``samples``: the first few (prompt, completion, answer,
    correct) for inspection)."""
    model = policy.model
    was_training = model.training
    model.eval()
    out = {"n": 0, "correct": 0.0, "formatted": 0.0, "tokens": 0, "samples": []}
    for start in range(0, len(prompts), batch_size):
        outs = policy.greedy(prompts[start : start + batch_size], max_new_tokens)
        for j, (ids, text) in enumerate(zip(outs, policy.decode(outs))):
            ex = examples[start + j]
            ok = correctness_reward(text, ex)
            out["n"] += 1
            out["correct"] += ok
            out["formatted"] += format_reward(text, ex)
            out["tokens"] += len(ids)
            if len(out["samples"]) < 5:
                out["samples"].append({"prompt": ex.prompt, "completion": text, "answer": ex.answer, "correct": ok})
        if progress is not None:
            progress(min(start + batch_size, len(prompts)), len(prompts))
    if was_training:
        model.train()
    return out


def rates(t: dict, seconds: float) -> dict:
    """``{"accuracy", "format_rate", "mean_completion_tokens", "n", "seconds", "samples"}`` of a
    :func:`tally` (or of several summed)."""
    n = max(t["n"], 1)
    return {"accuracy": t["correct"] / n, "format_rate": t["formatted"] / n, "mean_completion_tokens": t["tokens"] / n,
            "n": int(t["n"]), "seconds": round(seconds, 2), "samples": t["samples"]}


def evaluate(policy, examples: list[Example], prompts: list[list[int]], max_new_tokens: int, batch_size: int = 50,
             progress=None) -> dict:
    """Greedy held-out evaluation: the :func:`rates` of a :func:`tally` of every prompt."""
    t0 = time.time()
    return rates(tally(policy, examples, prompts, max_new_tokens, batch_size, progress), time.time() - t0)
