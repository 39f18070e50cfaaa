"""Per-token log-probs of packed trees under a causal LM (one forward per micro-batch)."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from vlm_treegrpo.rollout.tree import PackedBatch


def additive_mask(attention: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool ``[N, L, L]`` (True = attend) -> additive float mask ``[N, 1, L, L]`` for sdpa/eager."""
    mask = torch.zeros(attention.shape, dtype=dtype, device=attention.device)
    mask.masked_fill_(~attention, torch.finfo(dtype).min)
    return mask[:, None]


@contextlib.contextmanager
def mask_capable_attention(model):
    """Run the packed forward with an attention kernel that takes an arbitrary 4-D mask.

    Flash-attention kernels take no tree mask, so while a model loaded with
    ``flash_attention_2`` (fast generation) runs the packed training forward, its config points
    at ``sdpa``, which uses the same weights. Attention functions are looked up from the config
    at every forward, so this switch is exact and costs nothing.
    """
    config = model.config
    impl = getattr(config, "_attn_implementation", None)
    if not impl or "flash" not in str(impl):
        yield
        return
    config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = impl


def packed_forward(model, batch: PackedBatch) -> tuple[Tensor, Tensor]:
    """The tree-masked forward of packed rows: ``(logits [N, U, V], col [N, L])``.

    Only positions that predict a completion token get logits (``U`` of them, shared by the
    rows): skipping the prompt's saves the vocabulary projection there (a large share of a
    small model's compute). ``col`` gives, for every packed token, the logits column of its
    predictor (meaningful on target tokens only).
    """
    dtype = next(model.parameters()).dtype
    need = torch.unique(batch.pred_pos[batch.target_mask > 0])  # [U] sorted
    if need.numel() == 0:
        need = torch.zeros(1, dtype=torch.long, device=batch.pred_pos.device)
    with mask_capable_attention(model):
        out = model(
            input_ids=batch.input_ids,
            attention_mask=additive_mask(batch.attention_mask, dtype),
            position_ids=batch.position_ids,
            use_cache=False,
            logits_to_keep=need,
        )
    col = torch.searchsorted(need, batch.pred_pos).clamp(max=need.numel() - 1)  # [N, L]
    return out.logits, col


def packed_logp(model, batch: PackedBatch, temperature: float = 1.0) -> Tensor:
    """Log-prob of every packed token given its own root-to-leaf path. ``[N, L]``, 0 off target.

    Each token is scored by the logits at ``pred_pos`` (its predecessor on its path), so the
    prompt runs once per tree and each thought once, whatever K and M are.
    """
    logits, col = packed_forward(model, batch)
    return gather_logp(logits, col, batch.input_ids, batch.target_mask, temperature)


def gather_logp(logits: Tensor, col: Tensor, input_ids: Tensor, target_mask: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / temperature)`` at each token: ``logits [N, U, V]`` holds the kept
    predictor positions, ``col [N, L]`` the column of each token's predictor. ``[N, L]`` fp32,
    0 where ``target_mask`` is 0."""
    logits = logits.float()  # [N, U, V]
    if temperature != 1.0:
        logits = logits / temperature
    N, U, V = logits.shape
    lse = torch.logsumexp(logits, dim=-1)  # [N, U]
    flat = logits.reshape(N * U, V)  # [N*U, V]
    rows = (torch.arange(N, device=logits.device)[:, None] * U + col).reshape(-1)  # [N*L]
    picked = flat[rows, input_ids.reshape(-1)].view_as(col)  # [N, L] logit of the actual token
    logp = picked - lse.gather(1, col)  # [N, L]
    return torch.where(target_mask > 0, logp, torch.zeros_like(logp))
