"""The policy interface the trainer talks to, and its text (causal LM) implementation.

The trainer, the evaluator and the studies only call the methods of :class:`Policy`; whether
prompts carry images, how they are batched, and how a K x M tree is turned into a training
batch is the policy's business. :class:`TextPolicy` packs each tree into one row with tree
attention; the vision-language policy (:mod:`vlm_treegrpo.vlm.policy`) implements the same
methods over a family adapter.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from vlm_treegrpo.data.types import Example
from vlm_treegrpo.rollout.logprobs import packed_logp
from vlm_treegrpo.rollout.prompts import prompt_ids
from vlm_treegrpo.rollout.tree import PackedBatch, SamplingParams, Tree, generate, pack_trees, sample_trees


class TrainBatch(Protocol):
    """What the update step needs of a packed batch (rows are prompt trees)."""

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


class TextPolicy:
    """A causal LM and its tokenizer. Trees are packed one row per prompt with tree attention."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def encode(self, example: Example, instruction: str) -> list[int]:
        if example.images:
            raise ValueError("this example has images but the model is a text-only causal LM")
        return prompt_ids(self.tokenizer, example, instruction)

    def sample(self, prompts, K, M, thought_max_tokens, answer_max_tokens, sampling, branch_delimiters) -> list[Tree]:
        return sample_trees(self.model, self.tokenizer, prompts, K, M, thought_max_tokens, answer_max_tokens, sampling, branch_delimiters)

    def greedy(self, prompts, max_new_tokens) -> list[list[int]]:
        outs, _ = generate(self.model, self.tokenizer, prompts, 1, max_new_tokens, SamplingParams(greedy=True))
        return outs

    def pack(self, trees, thought_adv, answer_adv) -> PackedBatch:
        return pack_trees(trees, thought_adv, answer_adv, self.tokenizer.pad_token_id)

    def logp(self, batch: PackedBatch, temperature: float = 1.0) -> Tensor:
        return packed_logp(self.model, batch, temperature)

    def decode(self, ids: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)


def device_of(policy: Policy) -> torch.device:
    return next(policy.model.parameters()).device


def make_policy(name: str, device: torch.device | str, dtype: str = "auto", attn_implementation: str = "auto") -> Policy:
    """The policy for a model name (built-in, local directory or hub id). The config boundary."""
    from vlm_treegrpo.models.loader import load_policy

    model, tokenizer = load_policy(name, device=str(device), dtype=dtype, attn_implementation=attn_implementation)
    return TextPolicy(model, tokenizer)
