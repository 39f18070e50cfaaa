"""A tiny random-init Llama for tests and CPU smoke runs.

:func:`build_tiny_llama` pairs a ~0.1M-parameter ``LlamaForCausalLM`` (hidden 64, 2 layers,
4 heads / 2 kv heads) with the offline tokenizer from :mod:`vlm_treegrpo.models.tokenizer`. It
needs no download, builds in well under a second, and is seeded, so two builds with the same seed
have identical weights.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vlm_treegrpo.models.tokenizer import MODEL_MAX_LENGTH, build_local_tokenizer

__all__ = ["build_tiny_llama", "tiny_llama_config"]


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The small ``LlamaConfig`` sized to ``tokenizer`` (vocab and special ids taken from it)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MODEL_MAX_LENGTH,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )


def build_tiny_llama(
    seed: int = 0,
    extra_special_tokens: Sequence[str] = (),
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Build ``(model, tokenizer)``: a seeded random-init fp32 tiny Llama on CPU, in eval mode.

    The global torch RNG is seeded with ``seed`` for the weight init and restored afterwards, so
    calling this does not disturb the caller's random stream.
    """
    tokenizer = build_local_tokenizer(extra_special_tokens=extra_special_tokens)
    config = tiny_llama_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = model.to(torch.float32)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.eval()
    return model, tokenizer
