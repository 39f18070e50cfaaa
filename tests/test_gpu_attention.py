"""GPU only: flash-attention and sdpa give the same log-probs (bf16). Skipped without CUDA + flash-attn."""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None),
        reason="needs CUDA and the flash-attn package",
    ),
]

FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "smolvlm", "llava-onevision"]  # gemma3: no FA2 in transformers


def _sample_batch(policy, examples, instruction=""):
    from vlm_treegrpo.rollout.tree import SamplingParams

    torch.manual_seed(0)
    prompts = [policy.encode(ex, instruction) for ex in examples]
    trees = policy.sample(prompts, 2, 2, 8, 8, SamplingParams(temperature=1.0), [])
    K, M = 2, 2
    adv_t = torch.randn(len(trees), K)
    adv_a = torch.randn(len(trees), K, M)
    return policy.pack(trees, adv_t, adv_a)


def _compare(policy):
    batch_examples = policy._bench_examples
    batch = _sample_batch(policy, batch_examples).to("cuda")
    cfg = policy.model.config
    with torch.no_grad():
        cfg._attn_implementation = "sdpa"
        ref = policy.logp(batch)
        cfg._attn_implementation = "flash_attention_2"
        got = policy.logp(batch)
    mask = batch.target_mask > 0
    diff = (got - ref).abs()[mask].max().item()
    assert diff < 5e-2, diff
    return diff


def test_text_flash_attention_matches_sdpa():
    from vlm_treegrpo.data.arithmetic import make_arithmetic
    from vlm_treegrpo.policy import make_policy

    policy = make_policy("tiny-llama", "cuda", dtype="bfloat16", attn_implementation="flash_attention_2")
    policy._bench_examples = make_arithmetic(3, seed=0)
    print("tiny-llama max |dlogp|:", _compare(policy))


@pytest.mark.parametrize("family", FAMILIES)
def test_vlm_flash_attention_matches_sdpa(family):
    from vlm_treegrpo.data.visual import make_visual
    from vlm_treegrpo.policy import make_policy

    policy = make_policy(f"tiny-{family}", "cuda", dtype="bfloat16", attn_implementation="flash_attention_2")
    policy._bench_examples = make_visual(3, seed=0)
    print(f"tiny-{family} max |dlogp|:", _compare(policy))
