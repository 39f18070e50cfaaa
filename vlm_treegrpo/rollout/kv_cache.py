"""The KV caches of tree sampling: one prefill shared by a row's samples, a thought pass's cache
resumed by its continuations, and the static cache that compiled decoding needs.

:func:`prefill_shared` prefills each prompt once for its ``n`` samples; :func:`continuation_cache`
takes a tree's continuations' cache from its thought pass (:class:`ThoughtPass`, kept as
:class:`CachePiece` s) instead of a second prefill; :func:`static_cache` copies a prefill into a fixed-shape cache. The sampler that
uses them is :mod:`vlm_treegrpo.rollout.tree`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer


def _cache_kwarg() -> str:
    """The name transformers gives the KV cache (``cache`` since 5.x; ``past_key_values`` before)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


CACHE_KWARG = _cache_kwarg()

TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
"""Model kwargs that are per token (``[B, T]``): cut with the prefix, repeated with the rows."""


class RowState:
    """Per-row state a model keeps between ``generate`` calls besides its KV cache (Qwen's
    mRoPE offsets, ``rope_deltas``), which has to follow the rows when a shared prefill repeats
    them, a decode drops finished ones or a continuation pass resumes some. This base class is
    for models that keep none: every method does nothing. A VLM family's adapter gives its own
    (``VLMAdapter.row_state``)."""

    def get(self) -> Any:
        """The state of the rows of the last ``generate`` call, for :meth:`set`."""
        return None

    def set(self, state: Any) -> None:
        """Put back a state from :meth:`get`."""

    def repeat(self, n: int) -> None:
        """Each row repeated ``n`` times, row-major (a shared prefill's copies)."""

    def select(self, rows: list[int], n: int = 1) -> None:
        """Only ``rows``, each repeated ``n`` times, row-major (finished rows dropped, or the
        thoughts a continuation pass resumes)."""

    def decode_positions(self, attention_mask: Tensor) -> Tensor:
        """The position ``generate`` gives each row's last column of ``attention_mask [B, T]``
        (left padding) when it feeds it as a decode step; each later step adds 1. Here the
        count of the row's real tokens before it: ``[B]``. (A model with mRoPE returns ``[3, B]``.)"""
        return attention_mask.long().sum(-1) - 1


@torch.no_grad()
def prefill_shared(model, inputs: dict, n: int, state: RowState | None = None):
    """The KV cache of every row's first ``T - 1`` tokens, computed ONCE per row and then repeated
    ``n`` times (row-major), for ``generate`` to continue ``n`` samples per row.

    ``generate`` given ``n`` copies of a row runs the whole prompt ``n`` times (and, in a tree's
    continuation pass, the prompt plus the thought M times); this runs it once. The prefix forward
    takes the positions ``generate`` itself would use (the model's own
    ``_prepare_position_ids_for_generation``: ``cumsum(mask) - 1`` for text, Qwen's mRoPE with the
    images), so the cache is the one ``generate`` would have built. The last token is left for
    ``generate``'s own first step, which then samples the first new token as usual.
    ``state`` (:class:`RowState`) repeats any per-row state the model keeps between generation
    calls (Qwen's mRoPE ``rope_deltas``) for the copies.
    """
    positions = model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))  # [B, T] or [R, B, T]
    prefix = {k: v[:, :-1] if k in TOKEN_KEYS else v for k, v in inputs.items()}
    out = model(**prefix, position_ids=positions[..., :-1], use_cache=True, logits_to_keep=1)
    cache = getattr(out, CACHE_KWARG)
    cache.batch_repeat_interleave(n)
    if state is not None:
        state.repeat(n)
    return cache


PLAIN_LAYERS = (DynamicLayer, StaticLayer)
"""Cache layers holding every column's keys and values (a sliding window keeps only its last ones)."""


def is_plain(cache) -> bool:
    """Whether every layer of ``cache`` is plain (:data:`PLAIN_LAYERS`): rows and columns can be
    taken from it."""
    return all(type(layer) in PLAIN_LAYERS for layer in cache.layers)


@dataclass
class CachePiece:
    """Some rows of a decode pass and their KV cache (a pass that drops finished rows ends with
    several: :func:`~vlm_treegrpo.rollout.decode.decode`)."""

    rows: Tensor
    """``[R]``: the pass's rows that the cache's rows are, in its order."""
    cache: Any
    """Their cache; None where it could not be kept (not plain per-token keys and values)."""


def select_rows(cache, idx: Tensor):
    """A new dynamic cache of ``cache``'s rows ``idx``; None unless every layer is plain
    (:data:`PLAIN_LAYERS`)."""
    if not is_plain(cache):
        return None
    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        keep = idx.to(layer.keys.device)
        out.update(layer.keys.index_select(0, keep), layer.values.index_select(0, keep), i)
    return out


@dataclass
class ThoughtPass:
    """A thought pass's KV cache, kept for its continuations (:func:`continuation_cache`)."""

    pieces: list[CachePiece] | None
    """The caches ``generate`` ended with, for every row that may be continued: one row per
    sample with ``prompt_len + T - 1`` columns or more (``T`` tokens were sampled; the last one
    was never fed)."""
    prompt_len: int
    """The pass's padded prompt length: every row's thought starts at this column."""
    state: Any = None
    """The model's per-row generation state of all the pass's rows (:meth:`RowState.get`),
    as it was before any row was dropped."""


def continuation_cache(thought: ThoughtPass, rows: list[int], thought_lens: list[int], width: int, n: int):
    """The KV cache a continuation pass would prefill, taken from the thought pass instead.

    The continuation rows are prompt + thought, left-padded to ``width`` columns; row ``j``
    continues thought-pass row ``rows[j]``, whose thought kept ``thought_lens[j]`` tokens. Its
    cache holds every column but the last (as :func:`prefill_shared` leaves it): column ``c``
    is the thought pass's column ``c + prompt_len + thought_len - width``, the same token at the
    same position (positions count real tokens only), so the keys carry the right rotary
    angles. Columns left of the row's first token are left padding, masked. Returned as a new
    dynamic cache repeated ``n`` times, row-major (compiled decoding copies it into a static
    one). The thought pass's cache is consumed (released). None where it is not plain
    per-token keys and values (a sliding window): the caller prefills instead.
    """
    pieces, thought.pieces = thought.pieces, None  # consumed: the thought pass's cache is freed with this call
    if not pieces or any(p.cache is None or not is_plain(p.cache) for p in pieces):
        return None
    where = {int(r): (p, i) for p, piece in enumerate(pieces) for i, r in enumerate(piece.rows.tolist())}
    if any(r not in where for r in rows):
        raise ValueError(f"continuation_cache: rows {sorted(set(rows) - set(where))} are in no piece of the thought pass's cache")
    shift = [thought.prompt_len + t - width for t in thought_lens]
    parts = [[j for j, r in enumerate(rows) if where[r][0] == p] for p in range(len(pieces))]  # continuation rows per piece
    order = torch.tensor([j for js in parts for j in js]).argsort()  # pieces' concatenation -> continuation order
    out, on = DynamicCache(), {}
    for i in range(len(pieces[0].cache.layers)):
        keys, values = [], []
        for p, js in enumerate(parts):
            if not js:
                continue
            layer = pieces[p].cache.layers[i]
            L, device = layer.keys.shape[2], layer.keys.device  # (a static layer's preallocated length: its filled columns come first)
            last = thought.prompt_len + max(thought_lens[j] for j in js) - 2  # the rightmost column these rows need
            if last >= L:
                raise ValueError(f"continuation_cache: a thought needs column {last} of a {L}-column cache")
            if (p, device) not in on:  # (per device: a model split over GPUs keeps each layer's cache on its own)
                local = torch.tensor([where[rows[j]][1] for j in js], dtype=torch.long, device=device)
                cols = torch.arange(width - 1, device=device)[None, :] + torch.tensor([shift[j] for j in js], device=device)[:, None]
                on[p, device] = (local, cols.clamp(0, L - 1)[:, None, :, None])  # [R_p, 1, width - 1, 1]
            local, idx = on[p, device]
            keys.append(layer.keys.index_select(0, local).gather(2, idx.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])))
            values.append(layer.values.index_select(0, local).gather(2, idx.expand(-1, layer.values.shape[1], -1, layer.values.shape[3])))
        k, v = (torch.cat(t) if len(t) > 1 else t[0] for t in (keys, values))
        if len(keys) > 1:
            k, v = k.index_select(0, order.to(k.device)), v.index_select(0, order.to(v.device))
        out.update(k, v, i)
    out.batch_repeat_interleave(n)
    return out


STATIC_CACHE_BUCKET = 64
"""A static cache's length is rounded up to a multiple of this, so batches whose prompts differ
a little in length reuse one compiled decode step."""


def static_cache(model, max_len: int, prefilled=None) -> StaticCache:
    """A :class:`~transformers.StaticCache` of ``max_len`` positions (rounded up to
    :data:`STATIC_CACHE_BUCKET`) for the model's decoder, holding ``prefilled``'s keys and values
    (a cache from :func:`prefill_shared`) at its first positions, or empty for ``generate`` to
    prefill. A static cache keeps every tensor's shape fixed across decode steps, which is what
    lets ``generate`` run a compiled forward (and CUDA graphs) for them."""
    length = -(-max_len // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET
    cache = StaticCache(config=model.config, max_cache_len=length)
    if prefilled is not None:
        if len(prefilled.layers) != len(cache.layers):
            raise ValueError(f"static_cache: the prefilled cache has {len(prefilled.layers)} layers, the model {len(cache.layers)}")
        for static, layer in zip(cache.layers, prefilled.layers):
            static.update(layer.keys, layer.values)  # allocates [B, H, length, D], writes positions 0 .. T-2
    return cache
