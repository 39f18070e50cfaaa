"""Per-token log-probs of packed trees under a causal LM (one forward per micro-batch), and the
policy's entropy at the same tokens on request (:func:`collect_entropy`)."""
from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import Tensor

from vlm_treegrpo.rollout.attention import model_mask, per_segment, tree_attention
from vlm_treegrpo.rollout.packing import PackedBatch


_ENTROPY: contextvars.ContextVar[list | None] = contextvars.ContextVar("vlm_treegrpo_entropy", default=None)


@contextlib.contextmanager
def collect_entropy():
    """Within this context every log-prob pass (:class:`TokenLogp`, and the per-leaf one of
    :class:`~vlm_treegrpo.policy.vlm.LeafBatch`) also appends ``(sum, weight)`` to the yielded
    list: the entropy of the tempered next-token distribution at each scored token, summed over
    the tokens (weighted as the pass weighs them), and the tokens' total weight. No gradient."""
    out: list[tuple[float, float]] = []
    token = _ENTROPY.set(out)
    try:
        yield out
    finally:
        _ENTROPY.reset(token)


def entropy_wanted() -> bool:
    return _ENTROPY.get() is not None


def record_entropy(total: Tensor | float, weight: Tensor | float) -> None:
    """Add one pass's entropy sum and token weight to the active :func:`collect_entropy`."""
    sink = _ENTROPY.get()
    if sink is not None:
        sink.append((float(total), float(weight)))


def logsumexp_and_entropy(z: Tensor) -> tuple[Tensor, Tensor]:
    """``(logsumexp(z), entropy of softmax(z))`` over the last dim of fp32 ``z [..., V]``, with
    one exp pass for both: ``H = lse - sum(p * z)``."""
    m = z.amax(-1, keepdim=True)
    e = torch.exp(z - m)
    total = e.sum(-1)
    lse = m.squeeze(-1) + total.log()
    return lse, lse - (e * z).sum(-1) / total


def additive_mask(attention: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool ``[N, L, L]`` (True = attend) -> additive float mask ``[N, 1, L, L]`` for sdpa/eager."""
    mask = torch.zeros(attention.shape, dtype=dtype, device=attention.device)
    mask.masked_fill_(~attention, torch.finfo(dtype).min)
    return mask[:, None]


def packed_forward(model, batch: PackedBatch) -> tuple[Tensor, Tensor]:
    """The tree-masked forward of packed rows: ``(logits [N, U, V], col [N, L])``.

    Only positions that predict a completion token get logits (``U`` of them, shared by the
    rows): skipping the prompt's saves the vocabulary projection there (a large share of a
    small model's compute). ``col`` gives, for every packed token, the logits column of its
    predictor (meaningful on target tokens only). Attention runs per segment on the CPU
    (:func:`~vlm_treegrpo.rollout.attention.tree_attention`), through the dense 4-D tree mask on a
    GPU (:func:`~vlm_treegrpo.rollout.attention.per_segment`) and for a batch without a segment table.
    """
    dtype = next(model.parameters()).dtype
    need, col = predictor_columns(batch.pred_pos, batch.target_mask)
    plan = batch.plan() if per_segment(batch.input_ids.device, *batch.input_ids.shape) else None

    def dense() -> Tensor:
        return additive_mask(batch.mask(), dtype)  # [N, 1, L, L]

    with tree_attention(model, plan, dense):
        out = model(
            input_ids=batch.input_ids,
            attention_mask=model_mask(plan, dense, batch.input_ids),
            position_ids=batch.position_ids,
            use_cache=False,
            logits_to_keep=need,
        )
    return out.logits, col


def predictor_columns(pred_pos: Tensor, target_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The positions that need logits and where each token finds its own: ``need [U]`` (sorted
    predictor positions of the target tokens; ``[0]`` when there are none) for
    ``logits_to_keep``, and ``col [N, L]``, each token's column among them (meaningful on target
    tokens only)."""
    need = torch.unique(pred_pos[target_mask > 0])  # [U] sorted
    if need.numel() == 0:
        need = torch.zeros(1, dtype=torch.long, device=pred_pos.device)
    return need, torch.searchsorted(need, pred_pos).clamp(max=need.numel() - 1)


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
    0 where ``target_mask`` is 0 (:class:`TokenLogp` on the target tokens)."""
    N, U, V = logits.shape
    target = target_mask > 0  # [N, L]
    rows = (torch.arange(N, device=logits.device)[:, None] * U + col)[target]  # [T] row of logits.view(N*U, V)
    out = torch.zeros(col.shape, dtype=torch.float32, device=logits.device)
    out[target] = TokenLogp.apply(logits.reshape(N * U, V), rows, input_ids[target], float(temperature))
    return out


class TokenLogp(torch.autograd.Function):
    """``log softmax(x[r] / t)[i]`` for pairs ``(r, i)``, in row chunks (:meth:`chunk_rows`),
    never materialising the fp32 log-softmax of the whole ``[R, V]`` logits.

    Forward: each referenced row's logsumexp, a chunk at a time in fp32. Backward, the same
    chunks: ``dx[r] = (onehot(i) - softmax(x[r] / t)) * g / t`` summed over the pairs of row
    ``r``, written straight in the logits' dtype. Autograd's version (``.float()``,
    ``logsumexp``, ``gather``) makes several fp32 copies of the whole tensor; with SmolLM2's
    49,152-token vocabulary that was a quarter of the update's time on the CPU.
    """

    CHUNK: int | None = None
    """Rows per step; None: :meth:`chunk_rows`."""
    CPU_ROWS = 64
    """Rows per step on the CPU, whatever the vocabulary: 64 rows of SmolLM2's 49,152 tokens are
    12.6 MB in fp32. On the tiny VLM's 779-token vocabulary one step over all 2,529 rows made the
    update 20-30% slower than 64-row steps (so did 32; 128-256 were about equal)."""
    DEVICE_ELEMENTS = 1 << 26
    """Elsewhere (a GPU), fp32 elements per step: 256 MiB a temporary (SmolLM2: 1,365 rows; a
    152k vocabulary: 441). A step is a handful of kernel launches whatever its size, and while
    the update is bound by the host launching kernels, 64-row steps (some 25 launches each,
    forward and backward) cost more than their arithmetic: counted on the CPU through the GPU's
    path, a tiny VLM's update dispatched 2,369 ops with 64-row steps and 1,304 with one."""

    @staticmethod
    def chunk_rows(vocab: int, device: torch.device) -> int:
        """Rows per step for a ``vocab``-wide logits tensor on ``device``."""
        if TokenLogp.CHUNK is not None:
            return TokenLogp.CHUNK
        if device.type == "cpu":
            return TokenLogp.CPU_ROWS
        return max(1, TokenLogp.DEVICE_ELEMENTS // max(1, vocab))

    @staticmethod
    def forward(ctx, x: Tensor, rows: Tensor, ids: Tensor, temperature: float) -> Tensor:  # x [R, V], rows/ids [T]
        used = torch.unique(rows)  # [R'] rows anybody reads
        lse = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)  # [R]
        ent = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device) if entropy_wanted() else None  # [R]
        for c in used.split(TokenLogp.chunk_rows(x.shape[1], x.device)):
            z = x.index_select(0, c).float() / temperature  # [C, V]
            if ent is None:
                lse[c] = torch.logsumexp(z, dim=-1)
            else:
                lse[c], ent[c] = logsumexp_and_entropy(z)
        if ent is not None:
            record_entropy(ent[rows].sum(), rows.numel())  # (a row predicting several tokens counts for each)
        ctx.save_for_backward(x, rows, ids, lse, used)
        ctx.temperature = temperature
        return x[rows, ids].float() / temperature - lse[rows]  # [T]

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad [T]
        x, rows, ids, lse, used = ctx.saved_tensors
        t = ctx.temperature
        if rows.numel() == 0:
            return torch.zeros_like(x), None, None, None
        g = grad.float() / t  # [T]
        gsum = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device).index_add_(0, rows, g)  # [R]
        order = torch.argsort(rows)  # the pairs grouped by row, so a chunk's pairs are one slice
        srows, sids, sg = rows[order], ids[order], g[order]
        C = TokenLogp.chunk_rows(x.shape[1], x.device)
        bounds = torch.searchsorted(srows, used[::C].contiguous()).tolist() + [rows.numel()]  # each chunk's first pair
        dx = torch.zeros_like(x)  # [R, V]
        for j, c in enumerate(used.split(C)):  # c sorted
            d = torch.exp(x.index_select(0, c).float() / t - lse[c, None]) * -gsum[c, None]  # [C, V] fp32
            lo, hi = bounds[j], bounds[j + 1]
            d.index_put_((torch.searchsorted(c, srows[lo:hi]), sids[lo:hi]), sg[lo:hi], accumulate=True)  # + onehot * g
            dx[c] = d.to(dx.dtype)
        return dx, None, None, None
