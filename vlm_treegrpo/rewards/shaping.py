"""Dense shaping rewards: a graded signal where a verifiable reward is almost always 0.

A random-init model (the ``tiny-*`` presets) never writes a correct answer, so correctness and
format rewards are 0 on every leaf, every group has zero reward std and GRPO's update is zero.
:func:`digits_reward` varies between any two completions that differ in how many digits they
hold, so a smoke run's groups have a spread and its weights move; on a real model it nudges
towards numeric answers and belongs only beside correctness, at a small weight.
"""
from __future__ import annotations

from vlm_treegrpo.data.types import Example

__all__ = ["digits_reward"]


def digits_reward(completion: str, example: Example) -> float:
    """Share of the completion's non-whitespace characters that are ASCII digits (0.0 when it has none)."""
    chars = [c for c in completion if not c.isspace()]
    if not chars:
        return 0.0
    return sum(c in "0123456789" for c in chars) / len(chars)
