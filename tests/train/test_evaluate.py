"""Held-out evaluation: the rates of tallies summed over shards of the test set (as data-parallel
processes sum them) equal the evaluation of the whole set; pass@k over sampled completions."""
from __future__ import annotations

import json
import math

import pytest
import torch

from vlm_treegrpo.data.arithmetic import make_arithmetic
from vlm_treegrpo.data.types import Example
from vlm_treegrpo.train.evaluate import (evaluate, majority_correct, pass_at_k, pass_ks, pass_rates, rates, sample_tally, tally,
                                   vote_key)
from vlm_treegrpo.analysis.plots import timeless
from vlm_treegrpo.policy.factory import make_policy
from vlm_treegrpo.rollout.tree import SamplingParams, Tree


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


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(4, 1, 2) == 1 - 3 / 6  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 4) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(8, 3, 4) == pytest.approx(1 - math.comb(5, 4) / math.comb(8, 4))
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    assert pass_ks(8) == [1, 2, 4, 8] and pass_ks(6) == [1, 2, 4, 6] and pass_ks(1) == [1]


class ScriptedSampler(EchoPolicy):
    """``sample`` returns, for prompt ``p``, the n completions ``self.script[p]`` (texts)."""

    def __init__(self, script: dict[int, list[str]]):
        self.script = script
        texts = [t for p in sorted(script) for t in script[p]]
        super().__init__(texts)
        self.index = {(p, k): i for i, (p, k) in enumerate((p, k) for p in sorted(script) for k in range(len(script[p])))}

    def sample(self, prompts, K, M, thought_max_tokens, answer_max_tokens, sampling, branch_delimiters):
        assert M == 1 and answer_max_tokens == 0 and branch_delimiters == []  # flat: no branching
        trees = []
        for p in prompts:
            t = Tree(prompt_ids=list(p), prompt=p)
            t.thoughts = [[self.index[(p[0], k)]] for k in range(K)]
            t.thought_done, t.answers = [True] * K, [[[]] for _ in range(K)]
            trees.append(t)
        return trees


def test_sample_tally_sums_each_prompts_pass_at_k():
    examples = [Example(prompt=f"q{i}", answer=str(i)) for i in range(3)]
    script = {0: ["Answer: 0", "Answer: 9", "Answer: 9", "Answer: 9"],  # 1 of 4 correct
              1: ["Answer: 1"] * 4,  # 4 of 4
              2: ["Answer: 7"] * 4}  # 0 of 4
    got = sample_tally(ScriptedSampler(script), examples, [[i] for i in range(3)], 8, 4, SamplingParams(), batch_size=8)
    assert got["prompts"] == 3
    assert got["pass@1"] == pytest.approx(0.25 + 1 + 0)
    assert got["pass@2"] == pytest.approx(0.5 + 1 + 0)
    assert got["pass@4"] == pytest.approx(1 + 1 + 0)
    assert got["maj@4"] == 1  # prompt 0 votes 9 (wrong), prompt 1 votes 1 (right), prompt 2 votes 7 (wrong)
    assert pass_rates(got) == pytest.approx({"pass@1": 1.25 / 3, "pass@2": 1.5 / 3, "pass@4": 2 / 3, "maj@4": 1 / 3})


def test_the_majority_vote_counts_equal_answers_once_and_breaks_ties_by_first_seen():
    assert vote_key("so the total is Answer: 1,000.") == vote_key("\\boxed{1000}") == "1000"
    assert majority_correct(["9", "12", "12", "9"], [False, True, True, False]) is False  # (tie: 9 was first)
    assert majority_correct(["9", "12", "12"], [False, True, True]) is True
    assert majority_correct(["", "", "12"], [False, False, True]) is True  # (no answer casts no vote)
    assert majority_correct(["", ""], [False, False]) is False
    examples = [Example(prompt="q", answer="1000")]
    script = {0: ["Answer: 1,000", "Answer: 5", "\\boxed{1000}", "Answer: 5."]}  # 1000 and 5 tie at 2: 1000 came first
    got = sample_tally(ScriptedSampler(script), examples, [[0]], 8, 4, SamplingParams(), batch_size=8)
    assert got["maj@4"] == 1 and got["pass@1"] == pytest.approx(0.5)


def test_sampled_evaluations_leave_the_training_draws_alone(tmp_path):
    from vlm_treegrpo.config import load_config
    from vlm_treegrpo.train.loop import train

    rows = {}
    for samples in (0, 2):
        cfg = load_config(None, [f"log.run_dir={tmp_path}", f"log.name=s{samples}", "log.progress=false", "optim.steps=2",
                                 "eval.every=1", f"eval.samples={samples}", "data.n_test=3", "rollout.thought_max_tokens=4",
                                 "rollout.answer_max_tokens=4"])
        summary = train(cfg, quiet=True)
        lines = (tmp_path / f"s{samples}" / "metrics.jsonl").read_text().splitlines()
        rows[samples] = [{k: v for k, v in timeless(json.loads(x)).items() if not k.startswith(("eval_pass", "eval_maj"))}
                         for x in lines]
        if samples:
            assert {"eval_pass@1", "eval_maj@2"} <= set(json.loads(lines[0])) and {"pass@1", "pass@2", "maj@2"} <= set(summary["eval_after"])
            assert summary["eval_before"]["pass@2"] >= summary["eval_before"]["pass@1"]
    assert rows[0] == rows[2]  # the sampled evaluations drew from their own generator
