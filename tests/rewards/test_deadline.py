"""Per-call time limits: a reward that hangs (asleep, in a Python loop, or swallowing exceptions)
is stopped and counted as a failure; fast calls are never cut; outside the main thread, or with
no limit, calls run as they are."""
from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from vlm_treegrpo.config import ConfigError, load_config
from vlm_treegrpo.data.types import Example
from vlm_treegrpo.rewards.deadline import SIGNAL, CallTimeout, Deadlines
from vlm_treegrpo.rewards.functions import RewardSet

EX = Example(prompt="p", answer="12")


def hangs_on_x(completion: str, example: Example) -> float:
    """Hangs on a completion with an x: asleep, busy, or swallowing every Exception."""
    if completion == "x-sleep":
        time.sleep(60)
    elif completion == "x-busy":
        while True:
            pass
    elif completion == "x-swallow":
        while True:
            try:
                time.sleep(60)
            except Exception:  # (a reward's own handler must not keep it alive)
                pass
    return 1.0


def test_a_hanging_reward_is_stopped_and_counted_and_the_next_calls_score():
    rs = RewardSet([("hang", hangs_on_x, 1.0)], timeout_s=0.3)
    completions = ["a", "x-sleep", "b", "x-busy", "x-swallow", "c"]
    t0 = time.monotonic()
    out = rs(completions, [EX] * len(completions))
    took = time.monotonic() - t0
    assert out.per_fn["hang"].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert out.failures == {"hang": 3}
    assert out.errors == [f"reward 'hang' on sample {i}: CallTimeout: took longer than 0.3 s" for i in (1, 3, 4)]
    assert 0.9 <= took < 10  # (three limits of 0.3 s, not 60 s each)
    assert signal.getsignal(SIGNAL) == signal.SIG_DFL  # the handler is the call's only


def test_fast_calls_are_never_cut_and_math_verify_keeps_its_own_timeouts():
    rs = RewardSet.from_config(["correctness", {"name": "format", "weight": 0.1}], timeout_s=0.5)
    completions = ["Answer: 12", "Answer: 13", "\\boxed{12}"] * 40
    RewardSet.from_config(["correctness"])(completions[:3], [EX] * 3)  # (math-verify's first calls import sympy: a second or so)
    for _ in range(3):
        out = rs(completions, [EX] * len(completions))
        assert out.failures == {"correctness": 0, "format": 0}
        assert out.per_fn["correctness"].tolist() == [1.0, 0.0, 1.0] * 40


def test_a_late_signal_raises_nothing_after_its_call_ended():
    with Deadlines(0.05) as d:
        with d.limit():
            pass
        d._fired = d._calls  # (as if the watchdog had signalled for the call just ended)
        signal.pthread_kill(threading.get_ident(), SIGNAL)
        time.sleep(0.01)  # the handler runs: no call is active, so nothing is raised
        with pytest.raises(CallTimeout):
            with d.limit():
                time.sleep(5)


def test_no_limit_outside_the_main_thread_or_when_zero():
    result = {}

    def worker():
        with Deadlines(0.01) as d:
            result["enabled"] = d.enabled
            with d.limit():
                time.sleep(0.1)  # (runs to its end)
        result["done"] = True

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert result == {"enabled": False, "done": True}
    with Deadlines(0) as d:
        assert not d.enabled


def test_the_timeout_is_a_checked_config_field():
    assert load_config(None, []).algo.reward_timeout_s == 60.0
    with pytest.raises(ConfigError, match=r"^algo\.reward_timeout_s: must be >= 0"):
        load_config(None, ["algo.reward_timeout_s=-1"])


CALLS = {"n": 0}


def hangs_every_fourth_call(completion: str, example: Example) -> float:
    CALLS["n"] += 1
    if CALLS["n"] % 4 == 0:
        time.sleep(60)
    return len(completion) % 3 / 2.0


def test_a_training_run_with_a_hanging_reward_goes_on_and_counts_it(tmp_path):
    from vlm_treegrpo.train.loop import train

    CALLS["n"] = 0
    cfg = load_config(None, [f"log.run_dir={tmp_path}", "log.name=run", "log.progress=false", "optim.steps=2", "eval.before=false",
                             "eval.after=false", "rollout.thought_max_tokens=3", "rollout.answer_max_tokens=3",
                             "algo.rewards=[test_deadline:hangs_every_fourth_call]", "algo.reward_timeout_s=0.2",
                             "algo.reward_workers=0"])  # (the in-process limit; rewards/test_workers.py tests the workers')
    summary = train(cfg, quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    leaves = cfg.rollout.prompts_per_step * cfg.rollout.K * cfg.rollout.M
    assert [r["reward_failures/test_deadline:hangs_every_fourth_call"] for r in rows] == [leaves // 4] * 2
    assert summary["steps"] == 2 and summary["reward_failures"] == {"test_deadline:hangs_every_fourth_call": leaves // 2}
    assert "CallTimeout: took longer than 0.2 s" in rows[0]["reward_errors"][0]
