"""The one record type every data source produces and every rollout consumes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One prompt with its verifiable reference answer."""

    prompt: str
    """The user message (plain text; the model's chat template is applied by the rollout)."""
    answer: str
    """The reference final answer as a string ("42", "\\frac{1}{2}"), checked with math-verify."""
    images: tuple = ()
    """PIL images that go with the prompt (empty for the text path)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (source, index, difficulty); never read by the algorithm."""
    system: str = ""
    """A system turn placed before the user turn by the chat template ('' = none)."""
