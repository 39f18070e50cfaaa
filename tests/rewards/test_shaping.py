"""The dense shaping reward (vlm_treegrpo.rewards.shaping)."""
from __future__ import annotations

import pytest

from vlm_treegrpo.data.types import Example
from vlm_treegrpo.rewards.functions import RewardSet, resolve_reward
from vlm_treegrpo.rewards.shaping import printable_reward

EX = Example(prompt="1+1?", answer="2")


@pytest.mark.parametrize("completion, expected", [
    ("", 0.0),
    ("Answer: 2", 1.0),
    ("ab\ufffd\ufffd", 0.5),
    ("\x00\x01\ufffd", 0.0),
    ("é!", 0.5),
    ("line\n\tend", 1.0),
])
def test_printable_share(completion, expected):
    assert printable_reward(completion, EX) == expected


def test_printable_is_a_builtin_that_separates_a_random_models_leaves():
    assert resolve_reward("printable") is printable_reward
    out = RewardSet.from_config([{"name": "printable", "weight": 0.1}])(["ok", "o\ufffd", "\ufffd\ufffd"], [EX] * 3)
    assert out.total.tolist() == pytest.approx([0.1, 0.05, 0.0])
