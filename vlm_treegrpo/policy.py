"""The policy interface the trainer talks to, and its text (causal LM) implementation.

The trainer, the evaluator and the studies only call the methods of :class:`Policy`; whether
prompts carry images, how they are batched, and how a K x M tree is turned into a training
batch is the policy's business. :class:`TextPolicy` packs each tree into one row with tree
attention; the vision-language policy (:mod:`vlm_treegrpo.vlm.policy`) implements the same
methods over a family adapter.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from vlm_treegrpo.data.types import Example
from vlm_treegrpo.models.loader import save_weights
from vlm_treegrpo.rollout.logprobs import packed_logp
from vlm_treegrpo.rollout.packing import PackedBatch, pack_trees
from vlm_treegrpo.rollout.prompts import prompt_ids
from vlm_treegrpo.rollout.tree import SamplingParams, Tree, generate, sample_trees


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

    def save(self, path: str | Path) -> None:
        """The weights and the tokenizer, loadable by name as a local directory; a LoRA model is
        saved merged, and its adapters in ``path/adapter`` (:func:`~vlm_treegrpo.models.loader.save_weights`)."""
        self.model = save_weights(self.model, path)
        self.tokenizer.save_pretrained(path)


def device_of(policy: Policy) -> torch.device:
    return next(policy.model.parameters()).device


PolicyBuilder = Callable[[torch.device | str, str, str], Policy]
"""``build(device, dtype, attn_implementation) -> Policy`` for one model name."""


def _text_policy(name: str, device, dtype: str, attn_implementation: str) -> TextPolicy:
    from vlm_treegrpo.models.loader import load_policy

    model, tokenizer = load_policy(name, device=str(device), dtype=dtype, attn_implementation=attn_implementation)
    return TextPolicy(model, tokenizer)


def named_policies() -> dict[str, PolicyBuilder]:
    """Every model known by name: the text built-ins, the tiny VLMs (``tiny-<family>``), the
    VLM presets (short name and hub id) and ``smolvlm-smollm2`` (aligned on first use)."""
    from vlm_treegrpo.models.loader import BUILTINS
    from vlm_treegrpo.train.align import ALIGNED_VLM, aligned_vlm_policy
    from vlm_treegrpo.vlm.policy import load_vlm_policy, tiny_vlm_policy
    from vlm_treegrpo.vlm.registry import TINY_NAMES, presets

    out: dict[str, PolicyBuilder] = {name: partial(_text_policy, name) for name in BUILTINS}
    out.update({name: partial(tiny_vlm_policy, family) for name, family in TINY_NAMES.items()})
    out.update({name: partial(load_vlm_policy, family, p.hub_id) for name, (family, p) in presets().items()})
    out[ALIGNED_VLM] = aligned_vlm_policy
    return out


def make_policy(name: str, device: torch.device | str, dtype: str = "auto", attn_implementation: str = "auto") -> Policy:
    """The policy for a model name. The config boundary: a known name (:func:`named_policies`),
    a training checkpoint directory (:func:`vlm_treegrpo.checkpoint.load_policy`), else a local
    directory or hub id, a :class:`~vlm_treegrpo.vlm.policy.VLMPolicy` when its config has a
    ``vision_config`` (family from ``model_type``), a :class:`TextPolicy` otherwise."""
    from vlm_treegrpo import checkpoint
    from vlm_treegrpo.vlm.policy import load_vlm_policy
    from vlm_treegrpo.vlm.registry import checkpoint_family

    if checkpoint.is_checkpoint(name):
        return checkpoint.load_policy(name, device, dtype, attn_implementation)
    build = named_policies().get(name)
    if build is None:
        family = checkpoint_family(name)
        build = partial(_text_policy, name) if family is None else partial(load_vlm_policy, family, name)
    return build(device, dtype, attn_implementation)
