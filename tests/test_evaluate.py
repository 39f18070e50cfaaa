"""Greedy evaluation: the rates of tallies summed over shards of the test set (as data-parallel
processes sum them) equal the evaluation of the whole set."""
from __future__ import annotations

import torch

from vlm_treegrpo.data.arithmetic import make_arithmetic
from vlm_treegrpo.data.types import Example
from vlm_treegrpo.evaluate import evaluate, rates, tally
from vlm_treegrpo.policy import make_policy


class EchoPolicy:
    """Answers each prompt with a fixed text, so the scores are known in advance."""

    def __init__(self, texts: list[str]):
        self.model, self.texts = torch.nn.Linear(1, 1), texts

    def greedy(self, prompts, max_new_tokens):
        return [list(range(len(self.texts[p[0]].split()))) + [p[0]] for p in prompts]

    def decode(self, outs):
        return [self.texts[ids[-1]] for ids in outs]


def test_tally_counts_and_rates_divide():
    examples = [Example(prompt=f"q{i}", answer=str(i)) for i in range(3)]
    texts = ["Answer: 0", "the answer is 5", "Answer: 2"]
    got = evaluate(EchoPolicy(texts), examples, [[i] for i in range(3)], 8, batch_size=2)
    assert got["n"] == 3 and got["accuracy"] == 2 / 3
    assert got["mean_completion_tokens"] == (3 + 5 + 3) / 3
    assert [s["correct"] for s in got["samples"]] == [1.0, 0.0, 1.0]
    empty = rates(tally(EchoPolicy(texts), [], [], 8), 0.0)  # (a process with no share of a tiny test set)
    assert empty["n"] == 0 and empty["accuracy"] == 0.0


def test_summed_shard_tallies_equal_the_whole_evaluation():
    torch.manual_seed(0)
    policy = make_policy("tiny-llama", torch.device("cpu"), "float32")
    examples = make_arithmetic(5, seed=3)
    prompts = [policy.encode(ex, "") for ex in examples]
    whole = evaluate(policy, examples, prompts, 6, batch_size=2)
    parts = [tally(policy, examples[r::2], prompts[r::2], 6, batch_size=2) for r in range(2)]
    summed = {k: sum(p[k] for p in parts) for k in ("n", "correct", "formatted", "tokens")}
    pooled = rates({**summed, "samples": parts[0]["samples"]}, 0.0)
    for key in ("n", "accuracy", "format_rate", "mean_completion_tokens"):
        assert pooled[key] == whole[key], key
