"""continuation_cache on a synthetic cache: each continuation row gets its thought-pass row's
columns, shifted into the left-padded layout, repeated n times; a bound and a fallback."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from vlm_treegrpo.rollout.kv_cache import ThoughtPass, continuation_cache

P, T, H, D = 4, 5, 2, 3  # padded prompt length, tokens sampled, heads, head size


def _cache(rows: int, layers: int = 2) -> DynamicCache:
    """Keys hold 100 * row + column (values the negative), so a gathered entry names its source."""
    cache = DynamicCache()
    col = torch.arange(P + T - 1, dtype=torch.float32)
    for layer in range(layers):
        k = (100 * torch.arange(rows, dtype=torch.float32)[:, None] + col)[:, None, :, None].expand(rows, H, -1, D).clone()
        cache.update(k, -k, layer)
    return cache


def test_rows_get_their_columns_right_aligned_and_repeated():
    thought = ThoughtPass(_cache(rows=4), prompt_len=P)
    rows, lens, width, n = [1, 3], [2, 5], P + 5, 2  # continuation width: the longest prompt + thought
    cache = continuation_cache(thought, rows, lens, width, n)
    assert thought.cache is None  # consumed: the thought pass's cache is released
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
        continuation_cache(ThoughtPass(_cache(rows=2), prompt_len=P), [0], [T + 1], P + T + 1, 1)
    cache = _cache(rows=2)
    cache.layers[0] = DynamicSlidingWindowLayer(sliding_window=4)
    assert continuation_cache(ThoughtPass(cache, prompt_len=P), [0], [2], P + 2, 1) is None
