"""Cheap per-token score-function features of a packed text batch, and where a tree's tokens lie.

The normalization diagnostics (arXiv 2601.23135) and the group-size advisor (arXiv 2603.01162)
both need per-prompt or per-sample gradients; full-model per-sample gradients cost a backward
each. We use a small parameter subset instead, and compute its gradient in closed form.

What is measured, exactly
-------------------------
Let ``h_t`` be the final hidden state that the LM head multiplies to predict token ``y_t``
(post final norm; captured with a forward hook on ``model.get_output_embeddings()``), ``W``
``[V, H]`` the head's weight, ``T`` the sampling temperature and ``p_t = softmax(W h_t / T)``.
Put a per-channel gain ``s`` in front of the head (``logits = W (s * h) / T``, at ``s = 1``).
Then

    psi_t = d log p(y_t) / d s = ((W[y_t] - p_t @ W) / T) * h_t            [H]

(:func:`token_score_features`). For a Llama-style model whose last module before the head is an
RMSNorm with weight ``w``, ``psi_t = w * d log p(y_t) / d w``: the gradient w.r.t. the final
norm weight, up to a fixed per-channel rescaling (checked by a test against autograd). A
weighted sum ``sum_t A_t psi_t`` over a prompt's tokens is the gradient of its policy loss
restricted to this ``H``-dimensional subset (576 numbers for SmolLM2-135M). It costs one
no-grad forward plus a ``[U, V] @ [V, H]`` product per row; no backward through the model.

Assumes ``logits = head(h)`` (no logit soft-capping or scaling after the head).
"""
from __future__ import annotations

import torch
from torch import Tensor

from vlm_treegrpo.rollout.logprobs import packed_forward
from vlm_treegrpo.rollout.packing import PackedBatch
from vlm_treegrpo.rollout.tree import Tree


def tree_spans(tree: Tree) -> tuple[list[tuple[int, int]], list[list[tuple[int, int] | None]]]:
    """Token spans of a tree in its packed row (the order of ``rollout.packing.pack_trees``).

    Returns ``(thought_spans [K], answer_spans [K][M])`` as ``(start, end)`` half-open offsets;
    an empty continuation (under a finished thought) has ``None``. Callers check the ids at
    these spans against the packed row (:func:`check_spans`), so a change of layout fails loudly.
    """
    off = len(tree.prompt_ids)
    thoughts, answers = [], []
    for k, th in enumerate(tree.thoughts):
        thoughts.append((off, off + len(th)))
        off += len(th)
        row = []
        for ans in tree.answers[k]:
            if ans:
                row.append((off, off + len(ans)))
                off += len(ans)
            else:
                row.append(None)
        answers.append(row)
    return thoughts, answers


def check_spans(tree: Tree, row_ids: Tensor) -> tuple[list[tuple[int, int]], list[list[tuple[int, int] | None]]]:
    """:func:`tree_spans`, verified against the packed row's ``input_ids [L]``."""
    thoughts, answers = tree_spans(tree)
    ids = row_ids.tolist()
    ok = ids[: len(tree.prompt_ids)] == list(tree.prompt_ids)
    for k, (a, b) in enumerate(thoughts):
        ok = ok and ids[a:b] == list(tree.thoughts[k])
        for m, span in enumerate(answers[k]):
            if span is not None:
                ok = ok and ids[span[0] : span[1]] == list(tree.answers[k][m])
    if not ok:
        raise RuntimeError("the packed row does not hold the tree in pack_trees order (prompt, thought k, its answers)")
    return thoughts, answers


@torch.no_grad()
def token_score_features(model, batch: PackedBatch, temperature: float = 1.0, rows_per_chunk: int = 1) -> Tensor:
    """``psi [N, L, H]`` float32 (module docstring); 0 where ``batch.target_mask`` is 0.

    One no-grad forward per chunk of rows (logits only at predictor positions, as
    ``rollout.logprobs.packed_logp``).
    """
    head = model.get_output_embeddings()
    W = head.weight  # [V, H]
    N, L = batch.input_ids.shape
    out_feats = torch.zeros(N, L, W.shape[1], dtype=torch.float32, device=batch.input_ids.device)
    captured: dict[str, Tensor] = {}

    def hook(module, args):
        captured["h"] = args[0]

    handle = head.register_forward_pre_hook(hook)
    try:
        Wf = W.float()  # [V, H]
        for r0 in range(0, N, rows_per_chunk):
            mb = batch.rows(slice(r0, r0 + rows_per_chunk))
            tgt = mb.target_mask > 0  # [n, L]
            if not bool(tgt.any()):
                continue
            logits, col = packed_forward(model, mb)  # [n, U, V], [n, L]
            h = captured.pop("h").float()  # [n, U, H]
            probs = torch.softmax(logits.float() / temperature, dim=-1)  # [n, U, V]
            pW = probs @ Wf  # [n, U, H]
            idx = col.unsqueeze(-1).expand(-1, -1, h.shape[-1])  # [n, L, H]
            u = (Wf[mb.input_ids] - pW.gather(1, idx)) / temperature  # [n, L, H]
            psi = u * h.gather(1, idx)  # [n, L, H]
            out_feats[r0 : r0 + rows_per_chunk] = torch.where(tgt.unsqueeze(-1), psi, torch.zeros_like(psi))
    finally:
        handle.remove()
    return out_feats


def weighted_row_sums(psi: Tensor, weights: Tensor) -> Tensor:
    """``sum_t weights[n, t] * psi[n, t]`` per row: ``psi [N, L, H]``, ``weights [N, L]`` -> ``[N, H]``."""
    return torch.einsum("nl,nlh->nh", weights.to(psi.dtype), psi)
