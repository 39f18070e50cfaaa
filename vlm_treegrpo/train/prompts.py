"""A task's prompts, encoded when they are drawn.

Encoding a vision-language prompt decodes its images and runs the processor, whose pixel tensors
are large; encoding the whole training set up front would hold every one of them for the whole
run, and every process would encode every prompt. :class:`EncodedPrompts` encodes prompt ``i``
when it is indexed and keeps nothing, so each process decodes only the images of the prompts it
samples or evaluates, one step at a time.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlm_treegrpo.data.types import Example
from vlm_treegrpo.policy.base import Policy, encode_one

__all__ = ["EncodedPrompts"]


class EncodedPrompts(Sequence):
    """``policy.encode(examples[i], instruction)`` for index ``i``, computed on each access."""

    def __init__(self, policy: Policy, examples: Sequence[Example], instruction: str, split: str = "train"):
        self.policy, self.examples, self.instruction, self.split = policy, examples, instruction, split

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return encode_one(self.policy, self.examples[i], self.instruction, self.split, i)
