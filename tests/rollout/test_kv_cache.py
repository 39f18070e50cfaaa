"""continuation_cache on a synthetic cache: each continuation row gets its thought-pass row's
columns, shifted into the left-padded layout, repeated n times, from whichever piece of the
thought pass's cache holds the row; a bound and a fallback."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from vlm_treegrpo.rollout.kv_cache import CachePiece, ThoughtPass, continuation_cache, select_rows

P, T, H, D = 4, 5, 2, 3  # padded prompt length, tokens sampled, heads, head size


def _cache(rows: int, layers: int = 2) -> DynamicCache:
    """Keys hold 100 * row + column (values the negative), so a gathered entry names its source."""
    cache = DynamicCache()
    col = torch.arange(P + T - 1, dtype=torch.float32)
    for layer in range(layers):
        k = (100 * torch.arange(rows, dtype=torch.float32)[:, None] + col)[:, None, :, None].expand(rows, H, -1, D).clone()
        cache.update(k, -k, layer)
    return cache


def _whole(cache) -> list[CachePiece]:
    return [CachePiece(torch.arange(cache.layers[-1].keys.shape[0]), cache)]


def _split(cache) -> list[CachePiece]:
    """The same rows as two pieces, as a decode that dropped rows 3 and 0 leaves them."""
    dropped = torch.tensor([3, 0])
    return [CachePiece(dropped, select_rows(cache, dropped)), CachePiece(torch.tensor([1, 2]), select_rows(cache, torch.tensor([1, 2])))]


@pytest.mark.parametrize("pieces", [_whole, _split])
def test_rows_get_their_columns_right_aligned_and_repeated(pieces):
    thought = ThoughtPass(pieces(_cache(rows=4)), prompt_len=P)
    rows, lens, width, n = [1, 3], [2, 5], P + 5, 2  # continuation width: the longest prompt + thought
    cache = continuation_cache(thought, rows, lens, width, n)
    assert thought.pieces is None  # consumed: the thought pass's cache is released
    keys = cache.layers[1].keys  # [len(rows) * n, H, width - 1, D]
    assert keys.shape == (4, H, width - 1, D)
    for j, (r, t) in enumerate(zip(rows, lens)):
        shift = P + t - width  # continuation column c holds thought-pass column c + shift
        for c in range(width - 1):
            if c + shift >= 0:  # (left of that: padding, masked by the caller)
                assert keys[j * n, 0, c, 0] == 100 * r + c + shift
        assert keys[j * n, 0, -1, 0] == 100 * r + P + t - 2  # the thought's last token is not cached
        assert torch.equal(keys[j * n], keys[j * n + 1])  # repeated n times, row-major
    assert torch.equal(cache.layers[0].values, -cache.layers[0].keys)


def test_a_thought_longer_than_the_cache_is_an_error_and_a_window_falls_back():
    with pytest.raises(ValueError, match="needs column"):
        continuation_cache(ThoughtPass(_whole(_cache(rows=2)), prompt_len=P), [0], [T + 1], P + T + 1, 1)
    with pytest.raises(ValueError, match=r"rows \[5\] are in no piece"):
        continuation_cache(ThoughtPass(_whole(_cache(rows=2)), prompt_len=P), [0, 5], [2, 2], P + 2, 1)
    cache = _cache(rows=2)
    cache.layers[0] = DynamicSlidingWindowLayer(sliding_window=4)
    assert select_rows(cache, torch.tensor([0])) is None
    assert continuation_cache(ThoughtPass(_whole(cache), prompt_len=P), [0], [2], P + 2, 1) is None
