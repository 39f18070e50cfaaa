"""The user turn and the system turn a dataset's prompts get (``data.template``,
``data.system_prompt``).

The default template, ``"{question} {instruction}"``, is the question followed by the answer-format
instruction (for math-style data: "Solve step by step and put the final answer in \\boxed{}.").
A template is rendered once per example when the task is loaded; the rendered text is the
example's prompt and the instruction is then part of it.
"""
from __future__ import annotations

import dataclasses
import string

from vlm_treegrpo.data.types import Example

__all__ = ["DEFAULT_TEMPLATE", "PLACEHOLDERS", "styled", "template_problem"]

DEFAULT_TEMPLATE = "{question} {instruction}"
"""The question, a space, the instruction (the prompt the trainer builds without a template)."""

PLACEHOLDERS = ("question", "instruction")
"""Names a template may use."""


def template_problem(template: str) -> str | None:
    """What is wrong with ``template`` (no ``{question}``, an unknown placeholder, a stray
    brace), else None."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        return f"cannot be parsed ({e}; write a literal brace as '{{{{' or '}}}}')"
    unknown = [f for f in fields if f not in PLACEHOLDERS]
    if unknown:
        return f"unknown placeholder {{{unknown[0]}}} (known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})"
    if "question" not in fields:
        return "must hold '{question}'"
    return None


def styled(examples: list[Example], template: str, instruction: str, system: str) -> list[Example]:
    """``examples`` with their prompt rendered through ``template`` (the instruction folded in)
    and ``system`` as their system turn."""
    return [dataclasses.replace(ex, prompt=template.format(question=ex.prompt, instruction=instruction).strip(), system=system)
            for ex in examples]
