"""Dynamic sampling (``rollout.refill_rounds``, DAPO): prompts whose rewards all agree are
replaced by drawn ones, in place, for a bounded number of rounds; off, nothing is drawn."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch

from vlm_treegrpo.config import ConfigError, load_config
from vlm_treegrpo.data.types import Example
from vlm_treegrpo.policy.factory import make_policy
from vlm_treegrpo.rewards.functions import RewardSet
from vlm_treegrpo.train.step import no_signal, rollout_step
from vlm_treegrpo.train.loop import train


def even_is_flat(completion: str, example: Example) -> float:
    """No signal on a prompt with an even answer (every leaf 0.5); on an odd one, a reward that
    differs between completions."""
    if int(example.answer) % 2 == 0:
        return 0.5
    return zlib.crc32(completion.encode()) % 5 / 4


def _setup(refill_rounds: int):
    cfg = load_config(None, ["rollout.K=2", "rollout.M=2", "rollout.thought_max_tokens=4", "rollout.answer_max_tokens=4",
                             f"rollout.refill_rounds={refill_rounds}"])
    torch.manual_seed(0)
    policy = make_policy("tiny-llama", "cpu", "float32")
    examples = [Example(prompt=f"what is {a} - 0?", answer=str(a)) for a in (2, 3, 4, 5)]
    return cfg, policy, examples, [policy.encode(ex, "Answer:") for ex in examples]


class Draws:
    """``draw(k)``: the next ``k`` examples of ``answers`` (cycled), encoded, with the calls kept;
    None for ``k = 0``, as the trainer's draw of one process."""

    def __init__(self, policy, answers):
        self.policy, self.answers, self.calls, self.n = policy, answers, [], 0

    def __call__(self, k: int):
        self.calls.append(k)
        if k == 0:
            return None  # (one process: nobody asks for prompts)
        exs = [Example(prompt=f"what is {a} + 0?", answer=str(a)) for a in (self.answers[(self.n + i) % len(self.answers)] for i in range(k))]
        self.n += k
        return exs, [self.policy.encode(ex, "Answer:") for ex in exs]


def test_prompts_without_signal_are_replaced_in_place_by_drawn_ones():
    cfg, policy, examples, prompts = _setup(refill_rounds=2)
    draw = Draws(policy, [7, 9, 11])
    data = rollout_step(policy, examples, prompts, RewardSet([("r", even_is_flat, 1.0)]), cfg, draw=draw)
    assert draw.calls == [2, 0]  # one round sufficed: both replacements have signal
    assert [ex.answer for ex in data.examples] == ["7", "3", "9", "5"]
    assert [ex.answer for ex in examples] == ["2", "3", "4", "5"]  # (the caller's list is left alone)
    assert data.trees[0].prompt_ids == list(policy.encode(data.examples[0], "Answer:"))  # (the tree of the drawn prompt)
    assert not no_signal(data.rewards.view(4, -1)).any()
    assert data.metrics["refilled_prompts"] == 2 and data.metrics["zero_std_frac"] == 0.0
    assert data.metrics["reward/r"] == pytest.approx(data.rewards.mean().item())


def test_the_rounds_are_bounded_and_a_prompt_still_without_signal_stays():
    cfg, policy, examples, prompts = _setup(refill_rounds=2)
    draw = Draws(policy, [6, 8, 10, 12])
    data = rollout_step(policy, examples, prompts, RewardSet([("r", even_is_flat, 1.0)]), cfg, draw=draw)
    assert draw.calls == [2, 2]
    assert [ex.answer for ex in data.examples] == ["10", "3", "12", "5"]
    assert no_signal(data.rewards.view(4, -1)).tolist() == [True, False, True, False]
    assert data.metrics["refilled_prompts"] == 4 and data.metrics["zero_std_frac"] == 0.5


def test_off_nothing_is_drawn_and_the_step_is_the_plain_one():
    cfg, policy, examples, prompts = _setup(refill_rounds=0)
    draw = Draws(policy, [7])
    torch.manual_seed(1)
    data = rollout_step(policy, examples, prompts, RewardSet([("r", even_is_flat, 1.0)]), cfg, draw=draw)
    torch.manual_seed(1)
    plain = rollout_step(policy, examples, prompts, RewardSet([("r", even_is_flat, 1.0)]), cfg)
    assert draw.calls == [] and "refilled_prompts" not in data.metrics
    assert torch.equal(data.rewards, plain.rewards) and torch.equal(data.packed.input_ids, plain.packed.input_ids)
    assert [ex.answer for ex in data.examples] == ["2", "3", "4", "5"]


def test_refill_is_a_checked_field():
    with pytest.raises(ConfigError, match=r"^rollout\.refill_rounds: must be >= 0"):
        load_config(None, ["rollout.refill_rounds=-1"])


def test_a_run_with_refill_logs_the_prompt_each_sample_came_from(tmp_path):
    cfg = load_config(None, [f"log.run_dir={tmp_path}", "log.name=run", "log.progress=false", "optim.steps=2", "eval.before=false",
                             "eval.after=false", "rollout.thought_max_tokens=3", "rollout.answer_max_tokens=3",
                             "rollout.refill_rounds=2", "log.samples_every=1", "algo.rewards=[test_refill:even_is_flat]"])
    train(cfg, quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["refilled_prompts"] >= 0 for r in rows) and sum(r["refilled_prompts"] for r in rows) > 0
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2
    for s in samples:  # the logged answer is the sampled tree's: an even one's leaves all scored 0.5
        assert (set(s["rewards"]) == {0.5}) == (int(s["answer"]) % 2 == 0)


def test_a_vlm_run_refills_too(tmp_path):
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/tiny-qwen2-vl.yaml", [f"log.run_dir={tmp_path}", "log.progress=false", "optim.steps=1",
                                                            "eval.before=false", "eval.after=false", "rollout.refill_rounds=2",
                                                            "algo.rewards=[test_refill:even_is_flat]", "data.n_train=16"])
    train(cfg, quiet=True)
    (row,) = [json.loads(x) for x in (tmp_path / cfg.log.name / "metrics.jsonl").read_text().splitlines()]
    assert row["refilled_prompts"] > 0 and "reward/test_refill:even_is_flat" in row
