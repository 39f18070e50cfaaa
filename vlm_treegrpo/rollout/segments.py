"""Pack arbitrary segment trees into rows with tree attention, and score entropies on them.

:func:`vlm_treegrpo.rollout.packing.pack_trees` packs the fixed K x M shape (prompt, thoughts,
continuations). Value probes (RREDCoT, :mod:`vlm_treegrpo.credit.rredcot`) need finer trees: a thought
cut into a chain of segments with extra children hanging off any of them. :class:`SegmentRow`
collects such a tree and :func:`pack_rows` turns rows into the same :class:`PackedBatch`, so
``rollout.logprobs.packed_logp`` scores them. The masks and positions come from
:mod:`vlm_treegrpo.core.tree_packing`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vlm_treegrpo.core.tree_packing import predictor_positions, segment_table, tree_positions
from vlm_treegrpo.rollout.logprobs import packed_forward
from vlm_treegrpo.rollout.packing import PackedBatch, segment_tables


class SegmentRow:
    """One packed row under construction: non-empty segments, each after its parent."""

    def __init__(self):
        self.toks: list[int] = []
        self.seg_ids: list[int] = []
        self.parent: list[int] = []
        self.seg_len: list[int] = []
        self.target: list[float] = []

    def add(self, toks: list[int], parent: int, target: list[float] | None = None) -> tuple[int, int]:
        """Append a segment (``parent`` -1 for the root); returns ``(segment index, offset of its first token)``."""
        if not toks:
            raise ValueError("segments must not be empty")
        s, start = len(self.seg_len), len(self.toks)
        self.parent.append(parent)
        self.seg_len.append(len(toks))
        self.toks += toks
        self.seg_ids += [s] * len(toks)
        self.target += target if target is not None else [0.0] * len(toks)
        return s, start


def pack_rows(rows: list[SegmentRow], pad_id: int) -> PackedBatch:
    """Rows -> :class:`PackedBatch` (tree attention, path positions; advantages 0)."""
    N, L = len(rows), max(len(r.toks) for r in rows)
    input_ids = torch.full((N, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((N, L), dtype=torch.long)
    pred_pos = torch.zeros((N, L), dtype=torch.long)
    target_mask = torch.zeros((N, L))
    for n, r in enumerate(rows):
        T = len(r.toks)
        seg, par, lens = torch.tensor(r.seg_ids), torch.tensor(r.parent), torch.tensor(r.seg_len)
        input_ids[n, :T] = torch.tensor(r.toks)
        position_ids[n, :T] = tree_positions(seg, par, lens)
        tgt = torch.tensor(r.target)
        pred_pos[n, :T] = torch.where(tgt > 0, predictor_positions(seg, par, lens), torch.zeros(T, dtype=torch.long))
        target_mask[n, :T] = tgt
    zeros = torch.zeros((N, L))
    return PackedBatch(input_ids, position_ids, None, pred_pos, target_mask, zeros, torch.zeros((N, L), dtype=torch.bool),
                       segment_tables([segment_table(r.seg_len, r.parent) for r in rows]))


@torch.no_grad()
def packed_entropy(model, batch: PackedBatch, temperature: float = 1.0) -> Tensor:
    """Entropy of the sampling distribution that predicted each target token. ``[N, L]`` on the CPU, 0 elsewhere.

    One forward per row (logits only at predictor positions, as ``packed_logp``).
    """
    device = next(model.parameters()).device
    out = torch.zeros(batch.input_ids.shape)
    for n in range(batch.input_ids.shape[0]):
        mb = batch.rows(slice(n, n + 1)).to(device)
        tgt = mb.target_mask > 0  # [1, L]
        if not bool(tgt.any()):
            continue
        logits, col = packed_forward(model, mb)  # [1, U, V], [1, L]
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [1, U, V]
        ent = -(logp.exp() * logp).sum(-1)  # [1, U]
        per_tok = ent.gather(1, col)  # [1, L]
        out[n] = torch.where(tgt, per_tok, torch.zeros_like(per_tok))[0].cpu()
    return out


def pieces(seg_row: Tensor) -> list[tuple[int, int]]:
    """Contiguous ``(start, end)`` token ranges of segments 0, 1, ... in one row of segment ids (-1 skipped)."""
    ids = seg_row.tolist()
    out, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or ids[t] != ids[t - 1]:
            if ids[start] >= 0:
                out.append((start, t))
            start = t
    return out
