"""The text (causal LM) policy: trees packed one row per prompt with tree attention."""
from __future__ import annotations

from pathlib import Path

from torch import Tensor

from vlm_treegrpo.data.types import Example
from vlm_treegrpo.models.loader import save_weights
from vlm_treegrpo.rollout.logprobs import packed_logp
from vlm_treegrpo.rollout.packing import PackedBatch, pack_trees
from vlm_treegrpo.rollout.prompts import prompt_ids
from vlm_treegrpo.rollout.tree import SamplingParams, Tree, generate, sample_trees


class TextPolicy:
    """A causal LM and its tokenizer. Trees are packed one row per prompt with tree attention."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def limit_pixels(self, min_pixels: int, max_pixels: int) -> None:
        raise ValueError("a text-only causal LM takes no images")

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
