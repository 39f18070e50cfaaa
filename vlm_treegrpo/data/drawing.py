"""Seeded draws of distinct synthetic examples, shared by the arithmetic and visual tasks."""
from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Collection
from typing import TypeVar

T = TypeVar("T")


def stream_rng(namespace: str, seed: int, stream: str) -> random.Random:
    """An RNG for a named stream (``train``, ``test``) of a task, independent of PYTHONHASHSEED."""
    digest = hashlib.sha256(f"vlm_treegrpo.{namespace}:{stream}:{int(seed)}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def draw_distinct(n: int, draw: Callable[[int], T], key: Callable[[T], str], exclude: Collection[str], what: str) -> list[T]:
    """Call ``draw(index)`` until ``n`` candidates with distinct keys, none in ``exclude``, are kept.

    ``index`` is the position the candidate would take. Gives up with ``ValueError`` after
    ``100 * n + 1000`` draws (``what`` names the items in the message).
    """
    seen: set[str] = set()
    out: list[T] = []
    attempts, max_attempts = 0, 100 * n + 1000
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"could not draw {n} distinct {what} (got {len(out)} after {max_attempts} attempts)")
        item = draw(len(out))
        k = key(item)
        if k in seen or k in exclude:
            continue
        seen.add(k)
        out.append(item)
    return out
