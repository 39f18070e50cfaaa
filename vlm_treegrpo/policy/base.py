"""The policy interface the trainer talks to.

The trainer, the evaluator and the studies only call the methods of :class:`Policy`; whether
prompts carry images, how they are batched, and how a K x M tree is turned into a training
batch is the policy's business. :class:`~vlm_treegrpo.policy.text.TextPolicy` packs each tree
into one row with tree attention; :class:`~vlm_treegrpo.policy.vlm.VLMPolicy` implements the
same methods over a family adapter. :mod:`vlm_treegrpo.policy.factory` turns a model name into one.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from vlm_treegrpo.data.loaders import DataError
from vlm_treegrpo.data.types import Example
from vlm_treegrpo.rollout.tree import SamplingParams, Tree


class TrainBatch(Protocol):
    """What the update step needs of a training batch (rows are packed prompt trees for
    :class:`TextPolicy`, leaves for the VLM policy; ``target_mask`` weights make both count each
    thought once)."""

    target_mask: Tensor  # [N, L] float weights, 0 off target
    advantages: Tensor  # [N, L]
    input_ids: Tensor  # [N, L]

    def rows(self, sel) -> "TrainBatch": ...

    def to(self, device) -> "TrainBatch": ...


class Policy(Protocol):
    """A model plus everything needed to prompt it, sample trees from it and score tokens."""

    model: Any
    tokenizer: Any

    def encode(self, example: Example, instruction: str) -> Any:
        """The example as a ready prompt (token ids, or ids plus processed images)."""

    def limit_pixels(self, min_pixels: int, max_pixels: int) -> None:
        """Bound each image's pixel count where the prompts are processed (0 = no bound of
        ours); ValueError where that is not possible."""

    def sample(self, prompts: list, K: int, M: int, thought_max_tokens: int, answer_max_tokens: int,
               sampling: SamplingParams, branch_delimiters: list[str]) -> list[Tree]:
        """A K x M tree per prompt (batched)."""

    def greedy(self, prompts: list, max_new_tokens: int) -> list[list[int]]:
        """One greedy completion per prompt (token ids, EOS kept)."""

    def pack(self, trees: list[Tree], thought_adv: Tensor, answer_adv: Tensor) -> TrainBatch:
        """The training batch of these trees with per-token advantages."""

    def logp(self, batch: TrainBatch, temperature: float = 1.0) -> Tensor:
        """Per-token log-probs ``[N, L]`` of the batch's target tokens (0 elsewhere)."""

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Completion texts."""

    def save(self, path: str | Path) -> None:
        """Write what is needed to load this policy again by path (weights, tokenizer/processor)."""


def device_of(policy: Policy) -> torch.device:
    return next(policy.model.parameters()).device


PolicyBuilder = Callable[[torch.device | str, str, str], Policy]
"""``build(device, dtype, attn_implementation) -> Policy`` for one model name."""


def encode_all(policy: Policy, examples: list[Example], instruction: str, split: str) -> list:
    """``policy.encode`` of every example; an example the policy cannot take (images for a text
    model) raises :class:`DataError` naming the split and the example's index."""
    return [encode_one(policy, example, instruction, split, i) for i, example in enumerate(examples)]


def encode_one(policy: Policy, example: Example, instruction: str, split: str, index: int) -> Any:
    """``policy.encode`` of one example; one it cannot take raises :class:`DataError` naming the
    split and the example's index."""
    try:
        return policy.encode(example, instruction)
    except ValueError as err:
        raise DataError(f"data: {split} example {index}: {err}") from err
