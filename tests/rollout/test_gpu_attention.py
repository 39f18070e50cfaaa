"""GPU only (skipped without CUDA), our tree attention on the device:

* the tree-packed training forward through our per-segment attention (sdpa inside; forced here,
  as a GPU's default is the dense mask) gives the same log-probs as the dense 4-D tree mask
  through sdpa, for text and every VLM family, in fp32 and under bf16 autocast;

and with the flash-attn package installed (bf16):

* a plain padded forward (what generation's prefill runs) gives the same log-probs with
  flash-attention as with sdpa, for text and each VLM family that supports it;
* the tree-packed training forward of a model loaded with flash-attention runs (it switches to
  our kernel, sdpa over the tree mask, since a flash kernel takes no tree mask) and equals a
  model loaded with sdpa.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
needs_flash = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs the flash-attn package")

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


def _plain_logp(policy, impl):
    """Log-softmax of a left-padded batch of the prompts (one plain forward) under ``impl``."""
    from vlm_treegrpo.rollout.tree import left_pad

    policy.model.set_attn_implementation(impl)
    prompts = [policy.encode(ex, "") for ex in policy._bench_examples]
    if hasattr(policy, "adapter"):
        batch = {k: v.to("cuda") for k, v in policy.adapter.collate(prompts, policy.pad_id).items()}
        mask = batch["attention_mask"].bool()
        with torch.no_grad():
            logits = policy.adapter.forward_logits(policy.model, batch, dedupe_images=False)
    else:
        ids, mask = left_pad(prompts, policy.tokenizer.pad_token_id, "cuda")
        with torch.no_grad():
            logits = policy.model(input_ids=ids, attention_mask=mask).logits
        mask = mask.bool()
    return logits.float().log_softmax(-1), mask


def _dense(batch):
    """The batch without its segment table: the dense 4-D tree mask through sdpa."""
    import dataclasses

    if hasattr(batch, "segments"):
        return batch.dense()
    if hasattr(batch, "tree"):
        return dataclasses.replace(batch, tree=batch.tree.dense())
    return batch  # leaf rows (Gemma3): one causal row per leaf, no tree mask


def _compare(policy):
    ref, mask = _plain_logp(policy, "sdpa")
    got, _ = _plain_logp(policy, "flash_attention_2")
    plain = (got - ref).abs().amax(-1)[mask].max().item()
    assert plain < 5e-2, plain
    batch = _sample_batch(policy, policy._bench_examples).to("cuda")
    with torch.no_grad():
        packed_flash = policy.logp(batch)  # loaded with flash-attention: the packed forward switches to sdpa + tree mask
        policy.model.set_attn_implementation("sdpa")
        packed_dense = policy.logp(_dense(batch))
    target = batch.target_mask > 0
    packed = (packed_flash - packed_dense).abs()[target].max().item()
    assert packed < 5e-2, packed
    return plain, packed


@needs_flash
def test_text_flash_attention_matches_sdpa():
    from vlm_treegrpo.data.arithmetic import make_arithmetic
    from vlm_treegrpo.policy.factory import make_policy

    policy = make_policy("tiny-llama", "cuda", dtype="bfloat16", attn_implementation="flash_attention_2")
    policy._bench_examples = make_arithmetic(3, seed=0)
    print("tiny-llama max |dlogp| plain, packed:", _compare(policy))


@needs_flash
@pytest.mark.parametrize("family", FAMILIES)
def test_vlm_flash_attention_matches_sdpa(family):
    from vlm_treegrpo.data.visual import make_visual
    from vlm_treegrpo.policy.factory import make_policy

    policy = make_policy(f"tiny-{family}", "cuda", dtype="bfloat16", attn_implementation="flash_attention_2")
    policy._bench_examples = make_visual(3, seed=0)
    print(f"tiny-{family} max |dlogp| plain, packed:", _compare(policy))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", ["tiny-llama", *(f"tiny-{f}" for f in [*FAMILIES, "gemma3"])])
def test_segment_attention_matches_dense_sdpa_on_cuda(name, autocast, monkeypatch):
    from vlm_treegrpo.rollout import attention
    from vlm_treegrpo.data.arithmetic import make_arithmetic
    from vlm_treegrpo.data.visual import make_visual
    from vlm_treegrpo.policy.factory import make_policy

    policy = make_policy(name, "cuda", dtype="float32", attn_implementation="sdpa")
    examples = make_arithmetic(3, seed=0) if name == "tiny-llama" else make_visual(3, seed=0)
    batch = _sample_batch(policy, examples).to("cuda")
    monkeypatch.setattr(attention, "PLAN_DEVICES", frozenset({"cpu", "cuda"}))  # a GPU's default is the dense mask
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        packed = policy.logp(batch)  # the segment plan: per-segment attention
        dense = policy.logp(_dense(batch))
    target = batch.target_mask > 0
    err = (packed - dense).abs()[target].max().item()
    print(f"{name} autocast={autocast} max |dlogp| per-segment vs dense:", err)
    assert err < (5e-2 if autocast else 1e-4), err
