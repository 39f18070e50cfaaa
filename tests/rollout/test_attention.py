"""Our attention kernel: the matmul kernel equals sdpa, per-segment tree attention equals the
dense tree mask (values and gradients), and the model-level switches restore what they change."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from vlm_treegrpo.core.tree_packing import segment_plan, segment_table, tree_attention_mask
from vlm_treegrpo.models.tiny import build_tiny_llama
from vlm_treegrpo.rollout import attention as A
from vlm_treegrpo.rollout.logprobs import packed_logp
from vlm_treegrpo.rollout.packing import pack_trees, segment_tables

from test_tree_packing import _make_trees


def _sdpa(q, k, v, mask, scale):
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), attn_mask=mask, scale=scale)


def test_matmul_attention_equals_sdpa_with_grouped_heads_and_either_mask_kind():
    torch.manual_seed(0)
    B, H, Hkv, Lq, Lk, D = 3, 6, 2, 5, 7, 8
    q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, D)
    mask = torch.rand(B, 1, Lq, Lk) > 0.4
    mask[..., 0] = True
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    for m in (mask, additive, None):
        assert_close(A.matmul_attention(q, k, v, m, 0.3), _sdpa(q, k, v, m, 0.3), atol=1e-5, rtol=1e-5)
    one = q[:, :, :1]  # a decode step, with a padding mask [B, 1, 1, Lk]
    assert_close(A.matmul_attention(one, k, v, mask[:, :, :1], 0.3), _sdpa(one, k, v, mask[:, :, :1], 0.3), atol=1e-5, rtol=1e-5)


ROWS = [([3, 2, 1, 2, 2], [-1, 0, 1, 1, 0]), ([4, 1, 3], [-1, 0, 0])]


def _rows_and_dense_mask(W):
    segments = segment_tables([segment_table(lens, par) for lens, par in ROWS])
    dense = torch.zeros(len(ROWS), 1, W, W, dtype=torch.bool)
    real = torch.zeros(len(ROWS), W, dtype=torch.bool)
    for n, (lens, par) in enumerate(ROWS):
        seg_ids = torch.full((W,), -1)
        seg_ids[: sum(lens)] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        dense[n, 0] = tree_attention_mask(seg_ids, torch.tensor(par), seg_ids >= 0)
        real[n, : sum(lens)] = True
    return segment_plan(segments, W), dense, real


def test_segment_attention_equals_the_dense_tree_mask_values_and_gradients():
    torch.manual_seed(1)
    W, H, Hkv, D = 12, 4, 2, 8
    plan, dense, real = _rows_and_dense_mask(W)
    q = torch.randn(2, H, W, D, requires_grad=True)
    k = torch.randn(2, Hkv, W, D, requires_grad=True)
    v = torch.randn(2, Hkv, W, D, requires_grad=True)
    w = torch.randn(2, W, H, D) * real[:, :, None, None]  # a loss on the real tokens only
    got = A.segment_attention(q, k, v, plan, D**-0.5)  # [N, W, H, D]
    grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    want = _sdpa(q, k, v, dense, D**-0.5).transpose(1, 2)
    want_grads = torch.autograd.grad((want * w).sum(), (q, k, v))
    assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[~real], torch.zeros_like(got[~real]))  # padding is no query
    for a, b in zip(grads, want_grads):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attention_forward_takes_the_plan_only_for_causal_modules_of_its_shape():
    torch.manual_seed(2)
    W, D = 12, 8
    plan, dense, _ = _rows_and_dense_mask(W)
    q, k, v = torch.randn(2, 2, W, D), torch.randn(2, 2, W, D), torch.randn(2, 2, W, D)
    additive = torch.zeros(dense.shape).masked_fill(~dense, torch.finfo(torch.float32).min)
    causal, vision = type("Causal", (), {"is_causal": True})(), type("Vision", (), {"is_causal": False})()
    token = A._PLAN.set(plan)
    try:
        seg, _ = A.attention_forward(causal, q, k, v, additive)
        ignored, _ = A.attention_forward(vision, q, k, v, None)  # a vision tower's attention keeps sdpa
        short, _ = A.attention_forward(causal, q[:, :, :5], k[:, :, :5], v[:, :, :5], None)  # another shape
    finally:
        A._PLAN.reset(token)
    assert_close(seg, A.segment_attention(q, k, v, plan, D**-0.5))
    assert_close(ignored, sdpa_attention_forward(vision, q, k, v, None)[0])
    assert_close(short, sdpa_attention_forward(causal, q[:, :, :5], k[:, :, :5], v[:, :, :5], None)[0])


def test_cpu_low_precision_decode_step_uses_the_matmul_kernel():
    torch.manual_seed(3)
    q, k, v = (torch.randn(4, 2, n, 8, dtype=torch.bfloat16) for n in (1, 9, 9))
    mask = torch.ones(4, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., :3] = False  # left padding
    causal = type("Causal", (), {"is_causal": True})()
    got, _ = A.attention_forward(causal, q, k, v, mask)
    assert torch.equal(got, A.matmul_attention(q, k, v, mask, 8**-0.5).transpose(1, 2))
    assert_close(got.float(), sdpa_attention_forward(causal, q, k, v, mask)[0].float(), atol=2e-2, rtol=2e-2)


def test_switches_restore_the_kernel_and_decode_keeps_flash():
    model, _ = build_tiny_llama(seed=0)
    assert model.config._attn_implementation == "sdpa"
    with A.decode_attention(model):
        assert model.config._attn_implementation == A.NAME
    assert model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "flash_attention_2"  # as a CUDA load with flash-attn gives
    with A.decode_attention(model):
        assert model.config._attn_implementation == "flash_attention_2"
    with A.tree_attention(model, None):
        assert model.config._attn_implementation == A.NAME  # a flash kernel takes no tree mask
    assert model.config._attn_implementation == "flash_attention_2"


def test_packed_logp_per_segment_equals_dense_mask_under_bf16_autocast():
    model, tok = build_tiny_llama(seed=4)
    packed = pack_trees(_make_trees(tok), torch.zeros(2, 2), torch.zeros(2, 2, 2), tok.pad_token_id)
    dense = packed.dense()  # the dense 4-D mask through sdpa
    assert dense.segments is None and packed.attention_mask is None  # (packing builds no dense mask)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = packed_logp(model, packed), packed_logp(model, dense)
    assert_close(got, want, atol=5e-2, rtol=0)
    with torch.no_grad():
        assert_close(packed_logp(model, packed), packed_logp(model, dense), atol=1e-5, rtol=1e-5)


def test_decode_mask_is_the_padding_mask_and_other_masks_are_sdpas():
    from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function

    pad = torch.ones(3, 7, dtype=torch.long)
    pad[0, :2] = 0  # left padding
    pad[2, :5] = 0
    got = A.attention_mask(3, 1, 7, q_offset=6, attention_mask=pad)
    assert got.shape == (3, 1, 1, 7) and got.dtype == torch.bool
    assert torch.equal(got, sdpa_mask(3, 1, 7, q_offset=6, attention_mask=pad, allow_is_causal_skip=False))
    for kwargs in (dict(q_length=4, kv_length=7, q_offset=3),  # prefill of a chunk: causal inside it
                   dict(q_length=1, kv_length=7, q_offset=6, mask_function=sliding_window_causal_mask_function(3)),
                   dict(q_length=1, kv_length=7, q_offset=4)):  # a query that is not the last key
        want = sdpa_mask(3, attention_mask=pad, allow_is_causal_skip=False, **kwargs)
        assert torch.equal(A.attention_mask(3, attention_mask=pad, allow_is_causal_skip=False, **kwargs), want)
    assert A.attention_mask(3, 4, 4, mask_function=causal_mask_function, attention_mask=None) is None  # sdpa's causal skip


@pytest.mark.parametrize("autocast", [False, True])
def test_generation_through_our_kernel_equals_sdpa_generation(autocast):
    """Greedy decoding of left-padded rows: our decode mask (and, under bf16 autocast, our matmul
    kernel) give the tokens transformers' sdpa generation gives."""
    from vlm_treegrpo.rollout.tree import SamplingParams, cut_completions, eos_ids_of, generate_batch, left_pad

    model, tok = build_tiny_llama(seed=5)
    ids, mask = left_pad([tok.encode("1 + 2 ="), tok.encode("12 * 34 - 5 ="), tok.encode("7")], tok.pad_token_id, "cpu")
    inputs = {"input_ids": ids, "attention_mask": mask}
    eos = eos_ids_of(tok, model)
    cfg = SamplingParams(greedy=True).generation_config(8, tok.pad_token_id, eos)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plain = model.generate(**inputs, generation_config=cfg)
        ours, _ = generate_batch(model, tok, inputs, 1, 8, SamplingParams(greedy=True))
    assert cut_completions(plain, ids.shape[1], tok, eos)[0] == ours
    assert sum(map(len, ours)) > 3  # something was generated


def test_a_causal_attention_that_cannot_take_the_plan_gets_the_dense_mask_built_once():
    """The packed forwards give the model no tree mask when a plan applies; an attention that
    cannot take the plan (here: asked for its weights) gets tree_attention's dense mask, built
    on first use only."""
    torch.manual_seed(2)
    W, H, D = 12, 2, 8
    plan, dense, real = _rows_and_dense_mask(W)
    q, k, v = (torch.randn(2, H, W, D) for _ in range(3))
    causal = type("Causal", (), {"is_causal": True, "training": False})()
    built = []

    def additive():
        built.append(1)
        return torch.zeros(dense.shape).masked_fill(~dense, float("-inf"))

    with A.tree_attention(torch.nn.Linear(1, 1), plan, additive):
        per_segment, _ = A.attention_forward(causal, q, k, v, None)
        assert built == []  # the plan path never builds it
        fallback, _ = A.attention_forward(causal, q, k, v, None, output_attentions=True)
        A.attention_forward(causal, q, k, v, None, output_attentions=True)
    assert built == [1]  # built once, then cached
    want = _sdpa(q, k, v, dense, D**-0.5).transpose(1, 2)
    assert_close(fallback[real], want[real], atol=1e-5, rtol=1e-5)
    assert_close(per_segment[real], fallback[real], atol=1e-5, rtol=1e-5)


def test_per_segment_on_the_cpu_dense_mask_on_a_gpu_unless_the_mask_is_large():
    assert A.per_segment("cpu", 4, 700)
    assert not A.per_segment("cuda", 4, 700)  # a GPU: one fused sdpa call over the dense mask
    assert A.per_segment(torch.device("cuda", 0), 1, 1 + int(A.DENSE_MASK_MAX**0.5))  # too large a mask


def test_packed_logp_where_the_device_takes_the_dense_mask_builds_no_plan_and_agrees(monkeypatch):
    """With the device's default the dense mask (a GPU's), packing and scoring build no segment
    plan and give the per-segment log-probs."""
    model, tok = build_tiny_llama(seed=4)
    packed = pack_trees(_make_trees(tok), torch.zeros(2, 2), torch.zeros(2, 2, 2), tok.pad_token_id)
    with torch.no_grad():
        want = packed_logp(model, packed)  # the CPU's default: per segment
    planned = []
    monkeypatch.setattr(type(packed), "plan", lambda self: planned.append(1))
    monkeypatch.setattr(A, "PLAN_DEVICES", frozenset())
    with torch.no_grad():
        got = packed_logp(model, packed)
    assert planned == []
    assert_close(got, want, atol=1e-5, rtol=1e-5)
