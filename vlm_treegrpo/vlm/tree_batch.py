"""Vision-language trees packed one per row: the prompt (with its images) once, then every
thought once and every continuation once, under a tree attention mask.

The text path's packing (:func:`vlm_treegrpo.rollout.packing.pack_trees`) run on the completion part
of each tree, behind the family's own left-padded prompt batch:

* row ``n`` = the collated prompt ``[T]`` (``adapter.collate``: left padding, image tensors,
  per-token extras) followed by tree ``n``'s segments. The tree is packed with a one-token root,
  the prompt's last token, which IS the prompt's last column, so its thoughts are predicted from
  there exactly as in generation;
* attention: causal over the prompt's real tokens; every tree token sees all of the prompt and
  its own ancestors in the tree (:func:`~vlm_treegrpo.core.tree_packing.tree_attention_mask`);
* positions: the family's prompt positions (``adapter.position_ids``: 1-D ``[N, T]`` or Qwen's
  mRoPE ``[3, N, T]``), then the prompt's last position plus the token's depth below the root,
  on every rope axis (a generated token is text: mRoPE gives it equal t/h/w positions, as
  generation does);
* only positions that predict a target token get logits (``logits_to_keep``), as on the text path.

Against one row per leaf (:class:`~vlm_treegrpo.policy.vlm.LeafBatch`) this runs the prompt,
image tokens included, once per tree instead of K*M times, and each thought once instead of M
times. Families whose forward builds its own non-causal mask (Gemma3's bidirectional image
blocks) set ``VLMAdapter.tree_packing = False`` and keep leaf rows.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vlm_treegrpo.core.tree_packing import SegmentPlan, segment_plan
from vlm_treegrpo.rollout.attention import model_mask, per_segment, tree_attention
from vlm_treegrpo.rollout.logprobs import additive_mask, gather_logp, predictor_columns
from vlm_treegrpo.rollout.packing import PackedBatch, pack_trees
from vlm_treegrpo.rollout.tree import Tree
from vlm_treegrpo.vlm.adapter import Encoded, VLMAdapter
from vlm_treegrpo.vlm.batching import flat_image_keys


@dataclass
class VLMTreeBatch:
    """Trees as rows (see the module docstring); ``L = T + C`` (prompt width + tree width)."""

    prompts: list[Encoded]
    """The prompt of each row (shared objects)."""
    tree: PackedBatch
    """The completion part packed under one-token roots (the prompts' last tokens), ``[N, 1 + C]``."""
    adapter: VLMAdapter
    pad_id: int
    host: PackedBatch | None = None
    """The tree part on the CPU when :meth:`to` moved ``tree`` to an accelerator: the model inputs
    (collated prompts, positions, the tree mask, the predictor columns) are built from it with
    host ops and moved in a few copies, instead of some 230 small kernels and 30 device reads
    per micro-batch (a tiny VLM's update: the model's own forward is about 270 ops)."""

    @property
    def _T(self) -> int:
        return max(len(p.input_ids) for p in self.prompts) if self.prompts else 1

    def _left(self, t: Tensor) -> Tensor:  # [N, 1 + C] tree part -> [N, T + C]: zeros over the prompt
        return torch.cat([t.new_zeros((t.shape[0], self._T)), t[:, 1:]], dim=1)

    @property
    def input_ids(self) -> Tensor:
        return self._left(self.tree.input_ids)  # [N, L] (prompt ids are in the model inputs)

    @property
    def target_mask(self) -> Tensor:
        return self._left(self.tree.target_mask)  # [N, L]

    @property
    def advantages(self) -> Tensor:
        return self._left(self.tree.advantages)  # [N, L]

    @property
    def is_thought(self) -> Tensor:
        return self._left(self.tree.is_thought)  # [N, L]

    def _real(self) -> Tensor:
        """``[N, 1 + C]`` bool: the root and the real tree tokens (a tree token's depth is >= 1;
        padding has position 0)."""
        real = self.tree.position_ids > 0
        real[:, 0] = True
        return real

    def rows(self, sel: slice | Tensor) -> "VLMTreeBatch":
        """The rows ``sel`` (slice, index or bool tensor); the tree part trimmed to their longest."""
        if self.host is not None:  # select on the host, then move
            sel = sel.cpu() if isinstance(sel, Tensor) else sel
            return self._on_host().rows(sel).to(self.tree.input_ids.device)
        idx = torch.arange(len(self.prompts), device=self.tree.input_ids.device)[sel]
        sub = dataclasses.replace(self, prompts=[self.prompts[i] for i in idx.tolist()], tree=self.tree.rows(idx))
        width = int(sub._real().any(0).nonzero().max()) + 1 if len(idx) else 1
        trim = {f.name: getattr(sub.tree, f.name) for f in dataclasses.fields(PackedBatch) if f.name != "segments"}
        trim = {k: None if v is None else v[:, :width, :width] if v.dim() == 3 else v[:, :width] for k, v in trim.items()}
        return dataclasses.replace(sub, tree=PackedBatch(**trim, segments=sub.tree.segments))

    def to(self, device) -> "VLMTreeBatch":
        """The batch on ``device``; moved off the CPU it keeps its host copy (:attr:`host`)."""
        host = self.host if self.host is not None else self.tree
        if torch.device(device).type == "cpu" and host.input_ids.device.type == "cpu":
            return dataclasses.replace(self, tree=host, host=None)  # (the host copy itself: no copy back)
        keep = host.input_ids.device.type == "cpu"
        return dataclasses.replace(self, tree=self.tree.to(device), host=host if keep else None)

    def _on_host(self) -> "VLMTreeBatch":
        return self if self.host is None else dataclasses.replace(self, tree=self.host, host=None)

    def model_inputs(self, model) -> dict[str, Tensor]:
        """Model kwargs of the rows, on the rows' device: ids, per-token extras and images
        (``adapter.collate`` + ``append_completion``), the 4-D additive tree mask and the packed
        positions."""
        return self._inputs_and_plan(model)[0]

    def _inputs_and_plan(self, model, lazy_mask: bool = False) -> tuple[dict[str, Tensor], SegmentPlan | None, Callable[[], Tensor]]:
        device = self.tree.input_ids.device
        src = self._on_host()  # built where the tree's host copy is (:attr:`host`), then moved
        at = src.tree.input_ids.device
        prompt = {k: v.to(at) for k, v in self.adapter.collate(self.prompts, self.pad_id).items()}  # left-padded [N, T]
        T = prompt["input_ids"].shape[1]
        if T != self._T:
            raise ValueError(f"{self.adapter.family}: collate padded the prompts to {T} columns, expected {self._T}")
        real = src._real()[:, 1:]  # [N, C]
        inputs = self.adapter.append_completion(prompt, src.tree.input_ids[:, 1:], real.long())  # [N, T + C]
        positions = self.adapter.position_ids(model, prompt)  # [N, T] or [3, N, T]
        if positions is None:  # the family lets the model count: 0, 1, ... from the first real token
            positions = (prompt["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        offsets = src.tree.position_ids[:, 1:]  # [N, C] depth below the root (>= 1 on tree tokens)
        inputs["position_ids"] = torch.cat([positions, positions[..., -1:] + offsets.to(positions)], dim=-1)  # [..., N, T + C]
        prompt_real = prompt["attention_mask"].bool()
        plan = src.plan(prompt_real) if per_segment(device, *inputs["input_ids"].shape) else None
        plan = None if plan is None else plan.to(device)
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        dtype = next(model.parameters()).dtype

        def dense() -> Tensor:
            return additive_mask(src._mask(prompt_real, real).to(device, non_blocking=True), dtype)  # [N, 1, L, L]

        # lazy: the dense tree mask only for an attention that cannot take the plan (tree_attention's fallback)
        inputs["attention_mask"] = model_mask(plan, dense, inputs["input_ids"]) if lazy_mask else dense()
        return inputs, plan, dense

    def plan(self, prompt_real: Tensor) -> SegmentPlan | None:
        """The rows' tree attention per segment: the tree's segments shifted behind the prompt
        (tree index ``j`` is column ``T - 1 + j``), its one-token root widened to the prompt's real
        tokens. ``None`` (the dense mask) when a prompt's real tokens are not one block at the
        right, as left padding leaves them."""
        if self.tree.segments is None:
            return None
        N, T = prompt_real.shape
        n_real = prompt_real.sum(1)  # [N]
        if not bool((prompt_real == (torch.arange(T, device=prompt_real.device) >= T - n_real[:, None])).all()):
            return None
        n_real = n_real.cpu()
        seg = self.tree.segments.cpu().clone()  # [N, S, 3]
        seg[..., 0] += T - 1
        seg[:, 0, 0] = T - n_real
        seg[:, 0, 1] = n_real
        return segment_plan(seg, T + self.tree.input_ids.shape[1] - 1).to(prompt_real.device)

    def _mask(self, prompt_real: Tensor, real: Tensor) -> Tensor:
        """Bool ``[N, L, L]``: causal over the real prompt tokens; a tree token sees the whole
        prompt and its tree ancestors; padding attends to itself only (no empty softmax row)."""
        N, T = prompt_real.shape
        L = T + real.shape[1]
        device = prompt_real.device
        mask = torch.zeros((N, L, L), dtype=torch.bool, device=device)
        mask[:, :T, :T] = torch.ones((T, T), dtype=torch.bool, device=device).tril() & prompt_real[:, None, :]
        mask[:, T:, :T] = real[:, :, None] & prompt_real[:, None, :]
        mask[:, T:, T:] = self.tree.mask()[:, 1:, 1:] & real[:, :, None] & real[:, None, :]
        idx = torch.arange(L, device=device)
        mask[:, idx, idx] |= ~torch.cat([prompt_real, real], dim=1)
        return mask

    def logp(self, model, temperature: float = 1.0) -> Tensor:
        """Per-token log-probs ``[N, L]`` of the tree tokens, each given its own root-to-leaf
        path (0 on the prompt, padding and non-target tokens)."""
        T = self._T
        inputs, plan, dense = self._inputs_and_plan(model, lazy_mask=True)
        target = self.target_mask  # [N, L]
        src = self._on_host()
        pred = src._left(src.tree.pred_pos) + (T - 1)  # [N, L]: the tree's index j is column T - 1 + j
        need, col = (x.to(target.device, non_blocking=True) for x in predictor_columns(pred, src.target_mask))  # [U], [N, L]
        with tree_attention(model, plan, dense):
            logits = self.adapter.forward_logits(model, inputs, image_keys=flat_image_keys(self.prompts), dedupe_images=True,
                                                 logits_to_keep=need)  # [N, U, V]
        return gather_logp(logits, col, inputs["input_ids"], target, temperature)


def pack_vlm_trees(adapter: VLMAdapter, pad_id: int, trees: list[Tree], thought_adv: Tensor, answer_adv: Tensor) -> VLMTreeBatch:
    """One row per tree (module docstring); ``thought_adv [N, K]``, ``answer_adv [N, K, M]``."""
    rooted = [dataclasses.replace(t, prompt_ids=[int(t.prompt.input_ids[-1])]) for t in trees]
    return VLMTreeBatch(prompts=[t.prompt for t in trees], tree=pack_trees(rooted, thought_adv, answer_adv, pad_id),
                        adapter=adapter, pad_id=pad_id)
