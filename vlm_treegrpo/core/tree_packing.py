"""Pack a K x M sample tree into one sequence with a tree attention mask.

A prompt's tree is a list of *segments* (the prompt, each thought, each continuation), each
with a parent segment. Packing them one after the other in a row, parents before children,
and letting each token attend only to earlier tokens of its own ancestor segments gives
exactly the per-token log-probs of the K*M separate sequences, while the prompt is run once
(not K*M times) and each thought once (not M times). This is also how GRPO-MA's "a thought's
tokens count once" is realised: each thought token exists once in the packed batch.

Pure tensor bookkeeping; no model, no config. Shapes: ``S`` segments, ``L`` packed length.
"""
from __future__ import annotations

import torch
from torch import Tensor


def segment_ancestry(parent: Tensor) -> Tensor:
    """``parent [S]`` (-1 for roots, parents listed before children) -> ``anc [S, S]`` bool.

    ``anc[s, t]`` is True when segment ``t`` is ``s`` itself or one of its ancestors.
    """
    S = parent.numel()
    anc = torch.eye(S, dtype=torch.bool)  # [S, S]
    for s in range(S):  # S is the number of segments of one tree (1 + K + K*M), not tokens
        p = int(parent[s])
        if p >= 0:
            if p >= s:
                raise ValueError(f"segment {s} has parent {p}: parents must come first")
            anc[s] |= anc[p]
    return anc


def tree_attention_mask(segment_ids: Tensor, parent: Tensor, valid: Tensor | None = None) -> Tensor:
    """Boolean attention mask ``[L, L]`` (True = may attend) of one packed row.

    ``segment_ids [L]`` gives each packed token's segment; token ``i`` may attend to token ``j``
    when ``j <= i`` and ``j``'s segment is an ancestor-or-self of ``i``'s. Padding tokens
    (``valid`` False) attend only to themselves so no row of the mask is empty.
    """
    L = segment_ids.numel()
    anc = segment_ancestry(parent)  # [S, S]
    seg = segment_ids.clamp(min=0)
    mask = anc[seg[:, None], seg[None, :]]  # [L, L]
    mask &= torch.ones(L, L, dtype=torch.bool).tril()
    if valid is not None:
        mask &= valid[:, None] & valid[None, :]
        mask |= torch.eye(L, dtype=torch.bool) & ~valid[:, None]
    return mask


def tree_positions(segment_ids: Tensor, parent: Tensor, seg_len: Tensor) -> Tensor:
    """Position id of every packed token: its depth along its own root-to-leaf path. ``[L]``."""
    S = parent.numel()
    start = torch.zeros(S, dtype=torch.long)  # position of each segment's first token
    for s in range(S):
        p = int(parent[s])
        if p >= 0:
            start[s] = start[p] + seg_len[p]
    seg = segment_ids.clamp(min=0)
    first = torch.zeros(S, dtype=torch.long)
    first[1:] = torch.cumsum(seg_len, 0)[:-1]  # packed offset of each segment
    offset_in_seg = torch.arange(segment_ids.numel()) - first[seg]
    return start[seg] + offset_in_seg


def predictor_positions(segment_ids: Tensor, parent: Tensor, seg_len: Tensor) -> Tensor:
    """Packed index whose logits predict each token (``[L]``; -1 for a root segment's first token).

    Inside a segment it is the previous token; for a segment's first token it is the last
    token of its parent segment.
    """
    S = parent.numel()
    first = torch.zeros(S, dtype=torch.long)
    first[1:] = torch.cumsum(seg_len, 0)[:-1]
    last = first + seg_len - 1  # [S]
    seg = segment_ids.clamp(min=0)
    idx = torch.arange(segment_ids.numel())
    pred = idx - 1
    is_first = idx == first[seg]
    par = parent[seg]
    pred = torch.where(is_first, torch.where(par >= 0, last[par.clamp(min=0)], torch.full_like(idx, -1)), pred)
    return pred
