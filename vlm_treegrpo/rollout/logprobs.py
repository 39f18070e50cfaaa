"""Per-token log-probs of packed trees under a causal LM (one forward per micro-batch)."""
from __future__ import annotations

import torch
from torch import Tensor

from vlm_treegrpo.rollout.tree import PackedBatch


def additive_mask(attention: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool ``[N, L, L]`` (True = attend) -> additive float mask ``[N, 1, L, L]`` for sdpa/eager."""
    mask = torch.zeros(attention.shape, dtype=dtype, device=attention.device)
    mask.masked_fill_(~attention, torch.finfo(dtype).min)
    return mask[:, None]


def packed_logp(model, batch: PackedBatch, temperature: float = 1.0) -> Tensor:
    """Log-prob of every packed token given its own root-to-leaf path. ``[N, L]``, 0 off target.

    Each token is scored by the logits at ``pred_pos`` (its predecessor on its path), so the
    prompt runs once per tree and each thought once, whatever K and M are.
    """
    dtype = next(model.parameters()).dtype
    out = model(
        input_ids=batch.input_ids,
        attention_mask=additive_mask(batch.attention_mask, dtype),
        position_ids=batch.position_ids,
        use_cache=False,
    )
    logits = out.logits.float()  # [N, L, V]
    if temperature != 1.0:
        logits = logits / temperature
    N, L, V = logits.shape
    lse = torch.logsumexp(logits, dim=-1)  # [N, L]
    flat = logits.reshape(N * L, V)  # [N*L, V]
    rows = (torch.arange(N, device=logits.device)[:, None] * L + batch.pred_pos).reshape(-1)  # [N*L]
    picked = flat[rows, batch.input_ids.reshape(-1)].view(N, L)  # [N, L] logit of the actual token
    logp = picked - lse.gather(1, batch.pred_pos)  # [N, L]
    return torch.where(batch.target_mask > 0, logp, torch.zeros_like(logp))
