"""Rewards in worker processes: the same values as in the trainer's process, in order; a call
past the limit is stopped whatever the function catches (a bare ``except:``) and counted; a
worker that dies costs its call only; a training run with such a reward goes on."""
from __future__ import annotations

import json
import os
import time

import pytest

from vlm_treegrpo.config import load_config
from vlm_treegrpo.data.types import Example
from vlm_treegrpo.rewards.functions import RewardSet
from vlm_treegrpo.rewards.workers import RewardWorkers

HANG_S = 30.0
"""How long a hanging reward would run if nothing stopped it."""


def length_reward(completion: str, example: Example) -> float:
    return len(completion) / 10 + float(example.answer)


def swallows_everything(completion: str, example: Example) -> float:
    """Hangs on completions that start with "hang", and catches every exception on the way,
    the time limit's too (a bare ``except:``)."""
    if completion.startswith("hang"):
        end = time.monotonic() + HANG_S
        while time.monotonic() < end:
            try:
                time.sleep(end - time.monotonic())
            except:  # noqa: E722 - the point of the test
                pass
    return 1.0


def misbehaves(completion: str, example: Example):
    if completion == "raise":
        raise ZeroDivisionError("boom")
    if completion == "text":
        return "seven"
    if completion == "die":
        os._exit(3)
    return 0.5


def _examples(n: int) -> list[Example]:
    return [Example(prompt=f"q{i}", answer=str(i)) for i in range(n)]


@pytest.mark.parametrize("workers", [1, 3])
def test_workers_give_the_values_of_the_trainers_process_in_order(workers):
    completions = [f"c{'x' * i}" for i in range(7)]
    with RewardSet.from_config(["test_workers:length_reward", "format"], workers=workers) as pooled:
        assert set(pooled.pools) == {"test_workers:length_reward"}  # (the built-ins run in this process)
        got = pooled(completions, _examples(7))
    want = RewardSet.from_config(["test_workers:length_reward", "format"])(completions, _examples(7))
    assert got.total.tolist() == want.total.tolist()
    assert got.total.tolist() == pytest.approx([(i + 1) / 10 + i for i in range(7)])
    assert got.failures == want.failures == {"test_workers:length_reward": 0, "format": 0}


def test_a_reward_that_catches_everything_is_still_stopped_at_its_limit_and_counted():
    completions = ["ok", "hang 1", "ok", "hang 2", "ok"]
    t0 = time.monotonic()
    with RewardSet.from_config(["test_workers:swallows_everything"], timeout_s=0.3, workers=2) as rewards:
        out = rewards(completions, _examples(5))
        again = rewards(["ok"] * 3, _examples(3))  # (the killed workers were replaced)
    assert time.monotonic() - t0 < HANG_S  # (not one hanging call ran to its end)
    assert out.total.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert out.failures == {"test_workers:swallows_everything": 2}
    assert out.errors[0].startswith("reward 'test_workers:swallows_everything' on sample 1: CallTimeout: took longer than 0.3 s")
    assert again.total.tolist() == [1.0] * 3 and again.failures == {"test_workers:swallows_everything": 0}


def test_a_raise_a_non_number_and_a_dead_worker_fail_their_call_only():
    pool = RewardWorkers(misbehaves, 1, timeout_s=10)
    try:
        out = pool(["a", "raise", "text", "die", "b"], _examples(5))
    finally:
        pool.close()
    assert out[0] == (0.5, None) and out[4] == (0.5, None)
    assert out[1] == (None, "ZeroDivisionError: boom")
    assert out[2] == (None, "returned 'seven', not a finite number")
    assert out[3][0] is None and out[3][1].startswith("WorkerDied: the reward's process ended (exit code 3)")


def test_a_training_run_with_a_reward_that_swallows_its_timeout_goes_on_and_counts_it(tmp_path):
    from vlm_treegrpo.train.loop import train

    cfg = load_config(None, [f"log.run_dir={tmp_path}", "log.name=run", "log.progress=false", "optim.steps=1", "eval.before=false",
                             "eval.after=false", "rollout.thought_max_tokens=3", "rollout.answer_max_tokens=3",
                             "algo.rewards=[test_workers:hangs_on_every_third]", "algo.reward_timeout_s=0.3"])
    summary = train(cfg, quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    leaves = cfg.rollout.prompts_per_step * cfg.rollout.K * cfg.rollout.M
    assert rows[0]["reward_failures/test_workers:hangs_on_every_third"] == leaves // 3
    assert summary["reward_failures"] == {"test_workers:hangs_on_every_third": leaves // 3}


CALLS = {"n": 0}


def hangs_on_every_third(completion: str, example: Example) -> float:
    """Every third call of a worker hangs, swallowing whatever is raised in it (a worker killed
    at its limit is replaced by a fresh fork, whose count starts again from the trainer's 0)."""
    CALLS["n"] += 1
    if CALLS["n"] % 3 == 0:
        return swallows_everything("hang", example)
    return 0.5
