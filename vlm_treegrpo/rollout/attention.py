"""The attention kernel of our forwards: tree attention per segment, and a CPU decode kernel.

Registered with transformers as ``"vlm_treegrpo"`` (attention function + sdpa's mask builder);
:func:`tree_attention` (packed forwards) and :func:`decode_attention` (generation) point a
model's causal (text) attention at it for a block.

* **Packed trees** (the training forward): a packed row's dense tree mask is mostly False, since
  a leaf attends to the prompt, its thought and itself, not to the other leaves. With a
  :class:`~vlm_treegrpo.core.tree_packing.SegmentPlan` active, each layer gathers every
  segment's queries and the keys it may see (its ancestors' and its own) and runs one dense
  attention per tree depth, then scatters the outputs back. Same result as the dense masked
  kernel; for the bench's 4 x 4 trees of 40 tokens behind a ~60-token prompt it computes about
  a fifth of the query-key pairs (a seventh for 16 x 1).
* **Everything else** goes to transformers' sdpa function, except single-token decode steps in
  bf16/fp16 on the CPU, where a grouped matmul-softmax is 1.2-2.3x faster than the CPU sdpa
  kernel (64 rows of a tiny model: 121 vs 282 us).

On the CPU in bf16/fp16 the segment attention also uses the matmul kernel (the CPU sdpa kernel
is 2-3x slower than it on these small batched shapes, forward plus backward); elsewhere sdpa.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from vlm_treegrpo.core.tree_packing import SegmentPlan

NAME = "vlm_treegrpo"
_PLAN: contextvars.ContextVar[SegmentPlan | None] = contextvars.ContextVar("vlm_treegrpo_segment_plan", default=None)
_DENSE: contextvars.ContextVar[Callable[[], Tensor] | None] = contextvars.ContextVar("vlm_treegrpo_dense_mask", default=None)
_SWITCHED: contextvars.ContextVar[tuple] = contextvars.ContextVar("vlm_treegrpo_switched_configs", default=())
_LOW = (torch.bfloat16, torch.float16)


PLAN_DEVICES = frozenset({"cpu"})
"""Device types whose packed training forwards attend per segment (:func:`segment_attention`).
On the CPU that kernel computes only the scores a tree needs and is several times faster than
the dense mask. On a GPU one fused sdpa call per layer over the dense 4-D tree mask was faster:
in an H200 profile the packed log-prob forward + backward of the bench's batches (SmolLM2 shape)
took 0.10 s dense against 0.14 s per segment (16x1 trees) and 0.12 against 0.21 s (4x4), the
per-segment gathers being launch-bound there."""
DENSE_MASK_MAX = 2**26
"""Above this many mask entries (rows x width x width; 256 MB as an fp32 additive mask) the
packed forward attends per segment on every device: the dense mask grows as the row squared."""


def per_segment(device, rows: int, width: int) -> bool:
    """Whether a packed forward of ``rows`` rows of ``width`` tokens on ``device`` attends per
    segment (else through the dense tree mask): see :data:`PLAN_DEVICES`, :data:`DENSE_MASK_MAX`."""
    return torch.device(device).type in PLAN_DEVICES or rows * width * width > DENSE_MASK_MAX


def matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, dropout: float = 0.0) -> Tensor:
    """Softmax attention by two matmuls, grouped-query aware without repeating k/v.

    ``q [B, H, Lq, D]``, ``k, v [B, Hkv, Lk, D]`` (``H`` a multiple of ``Hkv``), ``mask``
    broadcastable to ``[B, 1, Lq, Lk]``: bool (True = attend) or additive float. Scores and
    softmax in fp32. Returns ``[B, H, Lq, Dv]``.
    """
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    g = H // Hkv
    scores = torch.matmul(q.reshape(B, Hkv, g * Lq, D), k.transpose(-1, -2)).float() * scale  # [B, Hkv, g*Lq, Lk]
    scores = scores.view(B, Hkv, g, Lq, Lk)
    if mask is not None:
        m = mask[:, :, None] if mask.dim() == 4 else mask  # [B, 1, 1, Lq, Lk]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    if dropout > 0:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs.view(B, Hkv, g * Lq, Lk), v).view(B, H, Lq, v.shape[-1])


def _low_precision_cpu(*ts: Tensor) -> bool:
    """On the CPU with a bf16/fp16 operand or under CPU autocast (where rotary embeddings hand
    over fp32 queries and keys with bf16 values)."""
    return ts[0].device.type == "cpu" and (any(t.dtype in _LOW for t in ts) or torch.is_autocast_enabled("cpu"))


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, dropout: float) -> Tensor:
    """Masked attention ``[G, H, Lq, Dv]`` with the faster kernel for the device and dtype."""
    if _low_precision_cpu(q, k, v):
        return matmul_attention(q, k, v, mask, scale, dropout)
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), attn_mask=mask, dropout_p=dropout, scale=scale)


def segment_attention(query: Tensor, key: Tensor, value: Tensor, plan: SegmentPlan, scale: float, dropout: float = 0.0) -> Tensor:
    """Tree attention of packed rows, per segment. ``query [N, H, L, D]``, ``key, value
    [N, Hkv, L, D]`` -> ``[N, L, H, Dv]`` (transformers' attention output layout); rows are
    zero at tokens in no segment (padding)."""
    N, H, L, D = query.shape
    qf = query.transpose(1, 2).reshape(N * L, H, D)  # [N*L, H, D]
    kf = key.transpose(1, 2).reshape(N * L, key.shape[1], D)  # [N*L, Hkv, D]
    vf = value.transpose(1, 2).reshape(N * L, value.shape[1], value.shape[-1])
    outs = []
    for g in plan.groups:
        (G, Lq), Lk = g.q_index.shape, g.k_index.shape[1]
        q = qf.index_select(0, g.q_index.view(-1)).view(G, Lq, H, D).transpose(1, 2)  # [G, H, Lq, D]
        k = kf.index_select(0, g.k_index.view(-1)).view(G, Lk, *kf.shape[1:]).transpose(1, 2)  # [G, Hkv, Lk, D]
        v = vf.index_select(0, g.k_index.view(-1)).view(G, Lk, *vf.shape[1:]).transpose(1, 2)
        o = _attend(q, k, v, g.mask, scale, dropout).transpose(1, 2)  # [G, Lq, H, Dv]
        outs.append(o.reshape(G * Lq, H, o.shape[-1]).index_select(0, g.q_keep))  # [Qg, H, Dv]
    out = qf.new_zeros(N * L, H, value.shape[-1])
    out = out.index_copy(0, plan.out_index, torch.cat(outs).to(out.dtype))  # [N*L, H, Dv]
    return out.view(N, L, H, value.shape[-1])


def attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature (``query [B, H, L, D]`` -> ``[B, L, H, D]``)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    plan = _PLAN.get()
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None and not kwargs.get("output_attentions")
    if plan is not None and getattr(module, "is_causal", False):
        if plain and query.shape[0] == plan.rows and query.shape[2] == key.shape[2] == plan.width:
            return segment_attention(query, key, value, plan, scale, dropout), None
        dense = _DENSE.get()
        if dense is not None:  # the model was given no tree mask: the exact dense one, built now
            attention_mask = dense()
    if plain and query.shape[2] == 1 and _low_precision_cpu(query, key, value):
        out = matmul_attention(query, key, value, attention_mask, scale, dropout)  # [B, H, 1, Dv]
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                   mask_function=causal_mask_function, attention_mask: Tensor | None = None, local_size: int | None = None,
                   **kwargs) -> Tensor | None:
    """transformers' mask builder for our kernel: sdpa's 4-D bool mask, except for a plain causal
    decode step (one query at the last key), whose mask is the 2-D padding mask as ``[B, 1, 1, Lk]``
    (nothing built per step)."""
    if (q_length == 1 and mask_function is causal_mask_function and local_size is None and kv_offset == 0
            and q_offset == kv_length - 1 and attention_mask is not None and attention_mask.dim() == 2
            and attention_mask.shape == (batch_size, kv_length)):
        return attention_mask[:, None, None, :].bool()
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, local_size, **kwargs)


AttentionInterface.register(NAME, attention_forward)
AttentionMaskInterface.register(NAME, attention_mask)


def causal_configs(model) -> list:
    """The configs the model's causal (text) attention modules read their kernel from (a
    VLM's language model may hold its own copy of the text config; the vision tower keeps its
    kernel)."""
    seen: dict[int, object] = {}
    for m in model.modules():
        if getattr(m, "is_causal", False) is True and hasattr(m, "config"):
            seen.setdefault(id(m.config), m.config)
    return list(seen.values())


@contextlib.contextmanager
def _through_us(model, plan: SegmentPlan | None, only: tuple[str, ...] | None, dense: Callable[[], Tensor] | None = None):
    configs = [c for c in causal_configs(model) if only is None or c._attn_implementation in only]
    saved = [c._attn_implementation for c in configs]
    token, dense_token = _PLAN.set(plan), _DENSE.set(functools.cache(dense) if dense is not None else None)
    switched_token = _SWITCHED.set(tuple(configs))
    for c in configs:
        c._attn_implementation = NAME
    try:
        yield
    finally:
        for c, impl in zip(configs, saved):
            c._attn_implementation = impl
        _PLAN.reset(token)
        _DENSE.reset(dense_token)
        _SWITCHED.reset(switched_token)


def checkpoint_layer(function, *args, **kwargs):
    """Activation checkpointing of one layer that recomputes it, in the backward pass, under the
    kernel switch it first ran under (transformers' per-layer ``_gradient_checkpointing_func``).

    The packed forward runs inside :func:`tree_attention`, but the backward pass, and with it
    the recomputation, runs after that context has been left. Plain ``torch.utils.checkpoint``
    would then recompute the attention through the model's own kernel over the all-ones mask,
    i.e. the wrong function (non-reentrant checkpointing stops on the mismatch; reentrant
    checkpointing would return wrong gradients). Here the segment plan, the dense-mask builder
    and the switched configs are captured at the forward and restored for the recomputation."""
    ctx, switched = contextvars.copy_context(), _SWITCHED.get()

    def run(*a, **kw):
        saved = [c._attn_implementation for c in switched]
        for c in switched:
            c._attn_implementation = NAME
        try:
            return ctx.run(function, *a, **kw)
        finally:
            for c, impl in zip(switched, saved):
                c._attn_implementation = impl

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)


def enable_activation_checkpointing(model) -> int:
    """Checkpoint every transformers layer of ``model`` (a LoRA wrapper's too) with
    :func:`checkpoint_layer`; returns how many layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    n = 0
    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer):
            m.gradient_checkpointing, m._gradient_checkpointing_func = True, checkpoint_layer
            n += 1
    if n == 0:
        raise ValueError(f"model.gradient_checkpointing: {type(model).__name__} has no checkpointable layers")
    return n


def tree_attention(model, plan: SegmentPlan | None, dense: Callable[[], Tensor] | None = None):
    """Context: the model's causal attention runs through :func:`attention_forward`, per segment
    of ``plan`` (``None``: the dense 4-D mask the forward is given, through sdpa).

    With a plan the forward need not be given the dense tree mask: ``dense()`` builds it (once,
    on first use) for a causal attention that cannot take the plan (a softcap, another shape),
    so every path stays exact while the usual one never materializes the ``L x L`` mask.

    Every kernel is switched: a flash-attention kernel takes no tree mask, and sdpa and eager
    compute the same function. The switch is read at every forward and restored on exit.
    """
    return _through_us(model, plan, None, dense)


def model_mask(plan: SegmentPlan | None, dense: Callable[[], Tensor], input_ids: Tensor) -> Tensor:
    """The ``attention_mask`` a packed forward gives the model under
    ``tree_attention(model, plan, dense)``: with a plan an all-ones 2-D mask (transformers then
    builds no causal mask, and an attention that cannot take the plan gets ``dense()``), else
    the dense 4-D tree mask itself."""
    return torch.ones_like(input_ids) if plan is not None else dense()


def decode_attention(model):
    """Context for generation: a model on sdpa runs through :func:`attention_forward` (the CPU
    low-precision decode kernel; sdpa otherwise); other kernels (flash on a GPU) are kept."""
    return _through_us(model, None, ("sdpa",))
