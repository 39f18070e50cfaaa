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

from dataclasses import dataclass

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


def segment_table(seg_len: list[int], parent: list[int], first: int = 0) -> Tensor:
    """``[S, 3]`` long rows ``(start, length, parent)`` of segments packed one after the other from
    column ``first`` (the layout :func:`tree_attention_mask` describes token by token)."""
    start = [first]
    for n in seg_len[:-1]:
        start.append(start[-1] + n)
    return torch.tensor([start, seg_len, parent], dtype=torch.long).T.contiguous()


@dataclass
class SegmentGroup:
    """The segments of one depth, padded to a common query and key length."""

    q_index: Tensor
    """``[G, Lq]`` flat index (``row * width + column``) of each segment's tokens; 0 on padding."""
    k_index: Tensor
    """``[G, Lk]`` flat index of the keys each segment sees: its ancestors' tokens (root first),
    then its own; 0 on padding."""
    mask: Tensor
    """``[G, 1, Lq, Lk]`` bool, True = may attend: all ancestor keys, own keys causally. A padding
    query attends to key 0 only, so no softmax row is empty."""
    q_valid: Tensor
    """``[G, Lq]`` bool: real queries."""


@dataclass
class SegmentPlan:
    """Tree attention of packed rows as dense attention over segments (:func:`segment_plan`)."""

    rows: int
    width: int
    groups: list[SegmentGroup]
    out_index: Tensor
    """``[Q]`` flat index of every real query, in the groups' order (``q_index[q_valid]`` of each)."""

    def to(self, device) -> "SegmentPlan":
        groups = [SegmentGroup(*(t.to(device) for t in (g.q_index, g.k_index, g.mask, g.q_valid))) for g in self.groups]
        return SegmentPlan(self.rows, self.width, groups, self.out_index.to(device))

    def scores(self) -> int:
        """Query-key pairs computed per head (against ``rows * width**2`` for the dense mask)."""
        return sum(g.mask.shape[0] * g.mask.shape[2] * g.mask.shape[3] for g in self.groups)


def segment_plan(segments: Tensor, width: int) -> SegmentPlan:
    """``segments [N, S, 3]`` (``start, length, parent`` per row; parents first, length 0 for
    absent segments) -> the same tree attention as :func:`tree_attention_mask`, computed per
    segment: a segment's queries meet only its ancestors' keys and its own.

    A packed row's dense mask is mostly False: a tree of K*M leaves of length ``l`` behind a
    prompt of length ``p`` needs about ``K*M*l*(p + 2*l)`` query-key pairs of the
    ``(p + K*M*l)**2`` a dense kernel computes. Segments are grouped by depth (prompt, thoughts,
    continuations) so each group is one batched attention call. Tokens in no segment (padding)
    are no query.
    """
    N, S, _ = segments.shape
    table = segments.tolist()
    by_depth: dict[int, list[tuple[list[int], list[int], int]]] = {}  # depth -> (queries, keys, n ancestor keys)
    for n in range(N):
        keys: list[list[int]] = []  # per segment: its ancestors' keys and its own
        depth: list[int] = []
        for s in range(S):
            start, length, par = table[n][s]
            own = list(range(n * width + start, n * width + start + length))
            if par >= s:
                raise ValueError(f"segment {s} of row {n} has parent {par}: parents must come first")
            anc = keys[par] if par >= 0 else []
            keys.append(anc + own)
            depth.append(depth[par] + 1 if par >= 0 else 0)
            if length:
                by_depth.setdefault(depth[-1], []).append((own, keys[-1], len(anc)))
    groups, out = [], []
    for d in sorted(by_depth):
        segs = by_depth[d]
        Lq, Lk = max(len(q) for q, _, _ in segs), max(len(k) for _, k, _ in segs)
        q_index = torch.tensor([q + [0] * (Lq - len(q)) for q, _, _ in segs])  # [G, Lq]
        k_index = torch.tensor([k + [0] * (Lk - len(k)) for _, k, _ in segs])  # [G, Lk]
        q_len = torch.tensor([len(q) for q, _, _ in segs])[:, None, None]  # [G, 1, 1]
        k_len = torch.tensor([len(k) for _, k, _ in segs])[:, None, None]
        a = torch.tensor([a for _, _, a in segs])[:, None, None]
        i, j = torch.arange(Lq)[None, :, None], torch.arange(Lk)[None, None, :]
        real_q = i < q_len  # [G, Lq, 1]
        mask = real_q & (j < k_len) & ((j < a) | (j - a <= i))  # [G, Lq, Lk]
        mask |= ~real_q & (j == 0)
        q_valid = real_q[..., 0]  # [G, Lq]
        groups.append(SegmentGroup(q_index, k_index, mask[:, None], q_valid))
        out.append(q_index[q_valid])
    out_index = torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
    return SegmentPlan(N, width, groups, out_index)
