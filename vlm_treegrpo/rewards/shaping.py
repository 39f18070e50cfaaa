"""Dense shaping rewards: a graded signal where a verifiable reward is almost always 0.

A random-init model (the ``tiny-*`` presets) never writes a correct answer, so correctness and
format rewards are 0 on every leaf, every group has zero reward std and GRPO's update is zero.
:func:`printable_reward` differs between almost any two of such a model's completions (they mix
words with stray bytes and control characters), so a smoke run's groups have a spread and its
weights move. A fluent model scores about 1.0 on every leaf, which adds nothing to its
advantages: it belongs beside correctness, at a small weight, for smoke runs.
"""
from __future__ import annotations

import string

from vlm_treegrpo.data.types import Example

__all__ = ["printable_reward"]

_PRINTABLE = frozenset(string.printable)


def printable_reward(completion: str, example: Example) -> float:
    """Share of the completion's characters that are printable ASCII (letters, digits,
    punctuation, whitespace); 0.0 for an empty completion."""
    if not completion:
        return 0.0
    return sum(c in _PRINTABLE for c in completion) / len(completion)
