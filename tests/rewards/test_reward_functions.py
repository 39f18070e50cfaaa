"""Tests for answer extraction, math-verify correctness, format reward and RewardSet."""
from __future__ import annotations

import threading

import pytest
import torch

from vlm_treegrpo.data.types import Example
from vlm_treegrpo.rewards.functions import (
    RewardOutput,
    RewardSet,
    correctness_reward,
    extract_final_answer,
    format_reward,
    resolve_reward,
)

EX12 = Example(prompt="p", answer="12")


def broken_reward(completion: str, example: Example) -> float:
    """A user reward that fails on one input."""
    if "boom" in completion:
        raise ZeroDivisionError("division by zero")
    return 0.5


def weird_reward(completion: str, example: Example) -> object:
    """A user reward that returns non-numbers / non-finite values."""
    return {"a": "not a number", "b": float("nan"), "c": True}.get(completion, 2.0)


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("work\nAnswer: 12", "12"),
        ("answer: 3\nmore\nANSWER:  $12$ \nbye", "$12$"),
        (r"Answer: 5, so \boxed{\frac{1}{2}} here", r"\frac{1}{2}"),
        (r"\boxed{1} then \boxed{12}", "12"),
        ("Answer:\n\n 42\n", "42"),
        ("just 7 things", "just 7 things"),
        ("", ""),
    ],
)
def test_extract_final_answer(completion: str, expected: str) -> None:
    assert extract_final_answer(completion) == expected


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("Answer: 12", 1.0),
        ("Answer: $12$", 1.0),
        ("Answer: 12 apples", 1.0),
        (r"\boxed{12}", 1.0),
        ("12.0", 1.0),
        ("3 + 9 = 12.\nAnswer: 12", 1.0),
        ("I first thought 12 but\nAnswer: 13", 0.0),
        ("Answer: 13", 0.0),
        ("", 0.0),
        ("Answer: twelve", 0.0),
    ],
)
def test_correctness_reward_plain_number(completion: str, expected: float) -> None:
    assert correctness_reward(completion, EX12) == expected


def test_correctness_reward_latex_gold() -> None:
    half = Example(prompt="p", answer=r"\frac{1}{2}")
    assert correctness_reward(r"so \boxed{\frac{1}{2}}", half) == 1.0
    assert correctness_reward("Answer: 0.5", half) == 1.0
    assert correctness_reward("Answer: 1/3", half) == 0.0
    assert correctness_reward("Answer: 1,200", Example(prompt="p", answer="1200")) == 1.0
    assert correctness_reward("Answer: 5", Example(prompt="p", answer="")) == 0.0


def test_correctness_reward_off_main_thread() -> None:
    results: list[float] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(correctness_reward("Answer: 12", EX12))
            results.append(correctness_reward("Answer: 11", EX12))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=30)
    assert not errors
    assert results == [1.0, 0.0]


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("steps\nAnswer: 12", 1.0),
        ("steps\nAnswer: -1,200.5  \n", 1.0),
        (r"so \boxed{12}", 1.0),
        ("Answer: 12\nAnswer: 13", 0.0),
        ("Answer: 12 apples", 0.0),
        ("the answer is 12", 0.0),
        (r"\boxed{}", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(completion: str, expected: float) -> None:
    assert format_reward(completion, EX12) == expected


def test_resolve_reward() -> None:
    assert resolve_reward("correctness") is correctness_reward
    assert resolve_reward("format") is format_reward
    assert resolve_reward(f"{__name__}:broken_reward") is broken_reward
    with pytest.raises(ValueError, match="nonexistent"):
        resolve_reward("nonexistent")
    with pytest.raises(ValueError, match="no_such_module_xyz"):
        resolve_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="missing_fn"):
        resolve_reward(f"{__name__}:missing_fn")
    with pytest.raises(ValueError, match="EX12"):
        resolve_reward(f"{__name__}:EX12")


def test_reward_set_weighted_total() -> None:
    rs = RewardSet.from_config(["correctness", {"name": "format", "weight": 0.5}])
    assert rs.names == ["correctness", "format"]
    completions = ["Answer: 12", "Answer: 13", "the answer is 12", r"\boxed{12}"]
    out = rs(completions, [EX12] * 4)
    assert isinstance(out, RewardOutput)
    assert out.total.dtype == torch.float32 and out.total.shape == (4,)
    assert out.per_fn["correctness"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert out.per_fn["format"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert out.total.tolist() == [1.5, 0.5, 1.0, 1.5]
    assert out.failures == {"correctness": 0, "format": 0}
    assert out.errors == []


def test_reward_set_failing_user_reward_is_counted_not_fatal() -> None:
    rs = RewardSet.from_config(
        [f"{__name__}:broken_reward", {"name": "format", "weight": 2.0}]
    )
    completions = ["Answer: 1", "boom", "x", "boom again"]
    out = rs(completions, [EX12] * 4)
    assert out.per_fn[f"{__name__}:broken_reward"].tolist() == [0.5, 0.0, 0.5, 0.0]
    assert out.failures == {f"{__name__}:broken_reward": 2, "format": 0}
    assert out.total.tolist() == [2.5, 0.0, 0.5, 0.0]
    assert len(out.errors) == 2
    assert out.errors[0] == (
        f"reward '{__name__}:broken_reward' on sample 1: "
        "ZeroDivisionError: division by zero"
    )


def test_reward_set_non_numbers_are_failures() -> None:
    rs = RewardSet([("weird", weird_reward, 1.0)])
    out = rs(["a", "b", "c", "d"], [EX12] * 4)
    assert out.per_fn["weird"].tolist() == [0.0, 0.0, 1.0, 2.0]
    assert out.failures == {"weird": 2}
    assert "sample 0" in out.errors[0] and "sample 1" in out.errors[1]


def test_reward_set_validation() -> None:
    with pytest.raises(ValueError):
        RewardSet([])
    with pytest.raises(ValueError, match="duplicate"):
        RewardSet.from_config(["format", "format"])
    with pytest.raises(ValueError, match="weight"):
        RewardSet([("f", format_reward, float("inf"))])
    with pytest.raises(ValueError, match="bogus"):
        RewardSet.from_config(["bogus"])
    with pytest.raises(ValueError):
        RewardSet.from_config(["format"])(["a", "b"], [EX12])
