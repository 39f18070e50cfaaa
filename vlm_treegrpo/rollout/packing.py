"""Text trees packed for training: one row per prompt (the prompt, then each thought followed by
its continuations), with tree positions, the tokens' predictors and the segment table that the
tree attention needs (:mod:`vlm_treegrpo.core.tree_packing` holds the math; the trees come from
:mod:`vlm_treegrpo.rollout.tree`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from vlm_treegrpo.core.tree_packing import (SegmentPlan, predictor_positions, segment_mask, segment_plan, segment_table,
                                             tree_positions)
from vlm_treegrpo.rollout.tree import Tree


@dataclass
class PackedBatch:
    """Packed trees, one row per prompt, ready for one forward pass."""

    input_ids: Tensor  # [N, L]
    position_ids: Tensor  # [N, L]
    attention_mask: Tensor | None  # [N, L, L] bool, True = may attend; None: built from segments when asked (mask())
    pred_pos: Tensor  # [N, L] index whose logits predict the token (0 where not a target)
    target_mask: Tensor  # [N, L] float, 1 on completion tokens
    advantages: Tensor  # [N, L] per-token advantage (0 off target)
    is_thought: Tensor  # [N, L] bool, thought tokens of unfinished thoughts (for metrics)
    segments: Tensor | None = None  # [N, S, 3] (start, length, parent) of each row's segments (length 0: none)

    def __post_init__(self):
        if self.attention_mask is None and self.segments is None:
            raise ValueError("a PackedBatch needs its dense attention mask or its segment table")

    def rows(self, sl: slice | Tensor) -> "PackedBatch":
        return PackedBatch(**{k: None if getattr(self, k) is None else getattr(self, k)[sl] for k in self.__dataclass_fields__})

    def to(self, device) -> "PackedBatch":
        return PackedBatch(**{k: None if getattr(self, k) is None else getattr(self, k).to(device) for k in self.__dataclass_fields__})

    def mask(self) -> Tensor:
        """The dense tree attention ``[N, L, L]`` bool: as given, else from the segment table
        (:func:`~vlm_treegrpo.core.tree_packing.segment_mask`; the per-segment kernel never needs it)."""
        if self.attention_mask is not None:
            return self.attention_mask
        return segment_mask(self.segments, self.input_ids.shape[1]).to(self.input_ids.device)

    def dense(self) -> "PackedBatch":
        """This batch with its dense mask and no segment table: attention through the 4-D mask."""
        return dataclasses.replace(self, attention_mask=self.mask(), segments=None)

    def plan(self) -> SegmentPlan | None:
        """The rows' tree attention per segment (:func:`~vlm_treegrpo.core.tree_packing.segment_plan`)."""
        if self.segments is None:
            return None
        return segment_plan(self.segments, self.input_ids.shape[1]).to(self.input_ids.device)


def pack_trees(trees: list[Tree], thought_adv: Tensor, answer_adv: Tensor, pad_id: int) -> PackedBatch:
    """Pack each tree into one row (prompt, then each thought followed by its continuations).

    ``thought_adv [N, K]`` trains thought tokens (once each); ``answer_adv [N, K, M]`` trains
    continuation tokens. A finished thought (ended with EOS, no continuation) is the complete
    answer: flat GRPO's case, trained with the thought advantage.
    """
    rows = []
    for n, tree in enumerate(trees):
        toks: list[int] = list(tree.prompt_ids)
        seg_len = [len(tree.prompt_ids)]
        parent = [-1]
        seg_ids = [0] * len(tree.prompt_ids)
        adv = [0.0] * len(tree.prompt_ids)
        target = [0.0] * len(tree.prompt_ids)
        thought_flag = [False] * len(tree.prompt_ids)
        for k, th in enumerate(tree.thoughts):
            t_seg = len(seg_len)
            parent.append(0)
            seg_len.append(len(th))
            toks += th
            seg_ids += [t_seg] * len(th)
            adv += [float(thought_adv[n, k])] * len(th)
            target += [1.0] * len(th)
            thought_flag += [not tree.thought_done[k]] * len(th)
            for m, ans in enumerate(tree.answers[k]):
                if not ans:
                    continue
                parent.append(t_seg)
                seg_len.append(len(ans))
                toks += ans
                seg_ids += [len(seg_len) - 1] * len(ans)
                adv += [float(answer_adv[n, k, m])] * len(ans)
                target += [1.0] * len(ans)
                thought_flag += [False] * len(ans)
        rows.append((toks, seg_ids, parent, seg_len, adv, target, thought_flag))

    L = max(len(r[0]) for r in rows)
    N = len(rows)
    input_ids = torch.full((N, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((N, L), dtype=torch.long)
    pred_pos = torch.zeros((N, L), dtype=torch.long)
    target_mask = torch.zeros((N, L))
    advantages = torch.zeros((N, L))
    is_thought = torch.zeros((N, L), dtype=torch.bool)
    for n, (toks, seg_ids, parent, seg_len, adv, target, thought_flag) in enumerate(rows):
        T = len(toks)
        seg = torch.tensor(seg_ids)
        par = torch.tensor(parent)
        lens = torch.tensor(seg_len)
        input_ids[n, :T] = torch.tensor(toks)
        position_ids[n, :T] = tree_positions(seg, par, lens)
        pred = predictor_positions(seg, par, lens)
        tgt = torch.tensor(target)
        pred_pos[n, :T] = torch.where(tgt > 0, pred, torch.zeros_like(pred))
        target_mask[n, :T] = tgt
        advantages[n, :T] = torch.tensor(adv)
        is_thought[n, :T] = torch.tensor(thought_flag)
    return PackedBatch(input_ids, position_ids, None, pred_pos, target_mask, advantages, is_thought,
                       segment_tables([segment_table(r[3], r[2]) for r in rows]))


def segment_tables(tables: list[Tensor]) -> Tensor:
    """Rows' ``[S_n, 3]`` segment tables stacked to ``[N, S, 3]`` (absent segments: length 0, parent -1)."""
    S = max(t.shape[0] for t in tables)
    out = torch.zeros((len(tables), S, 3), dtype=torch.long)
    out[..., 2] = -1
    for n, t in enumerate(tables):
        out[n, : t.shape[0]] = t
    return out
