"""Held-out evaluation: greedy accuracy by the correctness reward, plus format and length; and,
on request, pass@k and the majority vote maj@n over n sampled completions per prompt
(:func:`sample_tally`)."""
from __future__ import annotations

import contextlib
import math
import time

import torch

from vlm_treegrpo.data.types import Example
from vlm_treegrpo.train.distributed import Dist
from vlm_treegrpo.rewards.functions import correctness_reward, extract_final_answer, format_reward
from vlm_treegrpo.rollout.tree import SamplingParams


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode for the block, back in training mode after it if it was."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


@torch.no_grad()
def tally(policy, examples: list[Example], prompts: list[list[int]], max_new_tokens: int, batch_size: int = 50, progress=None) -> dict:
    """Greedy-decode every prompt once and score it: ``{"n", "correct", "formatted", "tokens",
    "samples"}``, sums over the prompts (``samples``: the first few (prompt, completion, answer,
    correct) for inspection)."""
    out = {"n": 0, "correct": 0.0, "formatted": 0.0, "tokens": 0, "samples": []}
    with eval_mode(policy.model):
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


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one prompt with ``c`` correct among ``n`` samples (Chen et al.,
    2021): ``1 - C(n - c, k) / C(n, k)``, the chance that k of the n drawn without replacement
    hold a correct one."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: k must be in [1, n={n}], got {k}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(n: int) -> list[int]:
    """The k reported for n samples: the powers of two below n, and n."""
    return [2**i for i in range(n.bit_length()) if 2**i < n] + [n]


def vote_key(completion: str) -> str:
    """The answer a completion votes for in maj@n: its final answer (:func:`extract_final_answer`)
    without spaces, thousands commas, a trailing full stop or case, so "1,000." and "1000" agree."""
    return extract_final_answer(completion).replace(" ", "").replace(",", "").rstrip(".").lower()


def majority_correct(keys: list[str], correct: list[bool]) -> bool:
    """Whether the most common non-empty answer among ``keys`` is correct (``correct[i]``: the
    correctness of sample i; samples with one key share it). A tie goes to the answer seen first;
    no answer at all is wrong."""
    counts: dict[str, int] = {}
    for key in keys:
        if key:
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return False
    best = max(counts, key=counts.__getitem__)  # (the first of the most common: dicts keep insertion order)
    return correct[keys.index(best)]


@torch.no_grad()
def sample_tally(policy, examples: list[Example], prompts: list, max_new_tokens: int, n: int, sampling,
                 batch_size: int = 50) -> dict:
    """Sample ``n`` completions per prompt (``sampling``, a
    :class:`~vlm_treegrpo.rollout.tree.SamplingParams`; flat, no branching) and sum, over the
    prompts, the unbiased pass@k of each k of :func:`pass_ks` and the majority vote
    (:func:`majority_correct`): ``{"prompts", "pass@<k>": sum, "maj@<n>": count}``.
    ``batch_size`` counts completions, so ``batch_size // n`` prompts go per batch."""
    out: dict = {"prompts": 0, **{f"pass@{k}": 0.0 for k in pass_ks(n)}, f"maj@{n}": 0}
    step = max(1, batch_size // n)
    with eval_mode(policy.model):
        for start in range(0, len(prompts), step):
            trees = policy.sample(prompts[start : start + step], n, 1, max_new_tokens, 0, sampling, [])
            texts = policy.decode([t.leaf_ids(k, 0) for t in trees for k in range(n)])
            for i in range(len(trees)):
                ex, samples = examples[start + i], texts[i * n : (i + 1) * n]
                correct = [correctness_reward(text, ex) >= 1.0 for text in samples]
                c = sum(correct)
                out["prompts"] += 1
                for k in pass_ks(n):
                    out[f"pass@{k}"] += pass_at_k(n, c, k)
                out[f"maj@{n}"] += majority_correct([vote_key(text) for text in samples], correct)
    return out


SAMPLED = ("pass@", "maj@")
"""Prefixes of the rates a sampled evaluation reports."""


def pass_rates(t: dict) -> dict:
    """``{"pass@<k>": rate, "maj@<n>": rate}`` of a :func:`sample_tally` (or of several summed)."""
    p = max(t["prompts"], 1)
    return {k: v / p for k, v in t.items() if k.startswith(SAMPLED)}


EVAL_SEED = 1_000_003
"""Sampled evaluations (``eval.samples``) draw from ``optim.seed + EVAL_SEED`` (per process), in
a forked generator: every evaluation of a run samples with the same seed, and training draws
what it would without them."""


def evaluate_held_out(policy, task, test_prompts: list, cfg, label: str = "", bar=None, dist: Dist = Dist()) -> dict:
    """The held-out evaluation a config asks for: greedy accuracy (:func:`evaluate`) and, with
    ``eval.samples``, pass@k and maj@n (:func:`sample_tally`) of ``task.test``. Under data parallelism
    each process scores a slice of the test set and the counts are summed (``samples``: process
    0's). ``bar``: a progress bar to label with ``label`` meanwhile."""
    budget = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    if bar is not None:
        bar.set_description(f"eval {label}")
    part = range(dist.rank, len(test_prompts), dist.world)  # (strided: a share for every process, any test-set size)
    examples, prompts = [task.test[i] for i in part], [test_prompts[i] for i in part]
    t0 = time.time()
    t = tally(policy, examples, prompts, budget, cfg.eval.batch_size)
    keys = ("n", "correct", "formatted", "tokens")  # (summed over the processes; as they are for one)
    res = rates({**t, **dict(zip(keys, dist.sum([t[k] for k in keys])))}, time.time() - t0)
    if cfg.eval.samples:
        t0 = time.time()
        device = next(policy.model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # (training draws as without)
            torch.manual_seed(dist.seed(cfg.optim.seed + EVAL_SEED))
            t = sample_tally(policy, examples, prompts, budget, cfg.eval.samples, SamplingParams.of(cfg.rollout), cfg.eval.batch_size)
        keys = list(t)  # (the same order on every process)
        res.update(pass_rates(dict(zip(keys, dist.sum([t[k] for k in keys])))), sampled_seconds=round(time.time() - t0, 2))
    if bar is not None:
        bar.set_description("train")
    return res
