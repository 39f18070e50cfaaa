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
    return _ancestry(parent.long().view(1, -1))[0]


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
    lens = seg_len.tolist()
    starts: list[int] = []  # position of each segment's first token
    for s, p in enumerate(parent.tolist()):
        starts.append(starts[p] + lens[p] if p >= 0 else 0)
    start = torch.tensor(starts, dtype=torch.long).view(S)
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


def _ancestors(parent: Tensor) -> list[Tensor]:
    """``parent [N, S]`` (-1 for roots) -> ``up``: ``up[k][n, s]`` is the k-th ancestor of segment
    ``s`` of row ``n`` (``up[0]`` the segment itself; -1 above the root), until all are -1. Raises
    unless every parent comes before its child."""
    N, S = parent.shape
    bad = (parent >= torch.arange(S)).nonzero()
    if len(bad):
        n, s = bad[0].tolist()
        raise ValueError(f"segment {s} of row {n} has parent {int(parent[n, s])}: parents must come first")
    up = [torch.arange(S).expand(N, S)]
    while bool((up[-1] >= 0).any()):
        prev = up[-1]
        up.append(torch.where(prev >= 0, parent.gather(1, prev.clamp(min=0)), prev))
    return up


def _ancestry(parent: Tensor) -> Tensor:
    """``parent [N, S]`` -> ``anc [N, S, S]`` bool: ``anc[n, s, t]`` when segment ``t`` of row ``n``
    is ``s`` or one of its ancestors (:func:`_ancestors`)."""
    N, S = parent.shape
    anc = torch.zeros((N, S, S), dtype=torch.bool)
    for u in _ancestors(parent):
        n_idx, s_idx = (u >= 0).nonzero(as_tuple=True)
        anc[n_idx, s_idx, u[n_idx, s_idx]] = True
    return anc


def segment_mask(segments: Tensor, width: int) -> Tensor:
    """``segments [N, S, 3]`` (``start, length, parent``) -> the rows' dense tree attention
    ``[N, width, width]`` bool: :func:`tree_attention_mask` of each row, with the tokens in no
    segment as padding (attending to themselves only)."""
    start, length, parent = segments.long().cpu().unbind(-1)  # [N, S]
    anc = _ancestry(parent)  # [N, S, S]
    col = torch.arange(width)
    inside = (col >= start[..., None]) & (col < (start + length)[..., None])  # [N, S, width]: the segments' tokens
    valid = inside.any(1)  # [N, width]
    # token i may see token j when j's segment is an ancestor-or-self of i's: two 0/1 products
    # (exact in fp32: the sums count at most S segments)
    seen = torch.bmm(inside.transpose(1, 2).float(), anc.float())  # [N, width, S]: the segments token i may see
    mask = torch.bmm(seen, inside.float()) > 0  # [N, width, width]
    mask &= torch.ones((width, width), dtype=torch.bool).tril()
    mask |= torch.eye(width, dtype=torch.bool) & ~valid[:, :, None]
    return mask


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
    q_keep: Tensor
    """``[Qg]`` positions of the real queries in the flattened ``[G * Lq]`` (``q_valid``'s nonzeros,
    found once here so the attention selects them without a device sync)."""


@dataclass
class SegmentPlan:
    """Tree attention of packed rows as dense attention over segments (:func:`segment_plan`)."""

    rows: int
    width: int
    groups: list[SegmentGroup]
    out_index: Tensor
    """``[Q]`` flat index of every real query, in the groups' order (``q_index[q_valid]`` of each)."""

    def to(self, device) -> "SegmentPlan":
        groups = [SegmentGroup(*(t.to(device) for t in (g.q_index, g.k_index, g.mask, g.q_valid, g.q_keep))) for g in self.groups]
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
    segments = segments.long().cpu()
    start, length, parent = segments.unbind(-1)  # [N, S] each
    up = _ancestors(parent)  # up[k][n, s]: the k-th ancestor of segment s (-1 above the root)
    depth = sum((u >= 0).long() for u in up[1:]) if len(up) > 1 else torch.zeros(N, S, dtype=torch.long)  # [N, S]
    groups, out = [], []
    for d in range(len(up) - 1):
        rows, segs = ((depth == d) & (length > 0)).nonzero(as_tuple=True)  # [G] each, row-major
        if rows.numel() == 0:
            continue
        chain = torch.stack([up[d - lvl][rows, segs] for lvl in range(d + 1)], dim=1)  # [G, d+1] root ... self
        c_start = start[rows[:, None], chain]  # [G, d+1]
        c_len = length[rows[:, None], chain]
        base = rows[:, None] * width  # [G, 1]
        q_len = c_len[:, -1:]  # [G, 1]
        cum = c_len.cumsum(-1)  # [G, d+1]
        k_len = cum[:, -1:]  # [G, 1]
        Lq, Lk = int(q_len.max()), int(k_len.max())
        i, j = torch.arange(Lq)[None, :], torch.arange(Lk)[None, :]
        q_real = i < q_len  # [G, Lq]
        q_index = torch.where(q_real, base + c_start[:, -1:] + i, 0)  # [G, Lq]
        lvl = torch.searchsorted(cum, j.expand(len(rows), Lk).contiguous(), right=True).clamp(max=d)  # [G, Lk] chain level of key j
        k_index = base + c_start.gather(1, lvl) + j - (cum - c_len).gather(1, lvl)
        k_index = torch.where(j < k_len, k_index, 0)  # [G, Lk]
        a = (k_len - q_len)[:, :, None]  # [G, 1, 1] ancestor keys
        ii, jj = i[:, :, None], j[:, None, :]
        mask = q_real[:, :, None] & (jj < k_len[:, :, None]) & ((jj < a) | (jj - a <= ii))  # [G, Lq, Lk]
        mask |= ~q_real[:, :, None] & (jj == 0)
        groups.append(SegmentGroup(q_index, k_index, mask[:, None], q_real, q_real.view(-1).nonzero().squeeze(1)))
        out.append(q_index[q_real])
    out_index = torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
    return SegmentPlan(N, width, groups, out_index)
