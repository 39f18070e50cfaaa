"""Seeded visual math problems: read numbers off an image, then reason in text.

Each example is one 64 x 64 RGB image on a 4 x 4 grid of 16-pixel cells (one cell is one
image token of the ``smolvlm-smollm2`` model: 8-pixel patches, pixel-shuffled 2 x 2) and a
question that needs both what the image shows and one or more arithmetic steps. Three kinds:

* ``cards``: cards showing digits 1-9 (the 3x5 pixel font of :mod:`vlm_treegrpo.data.visual`);
  "What is the sum of the numbers on the cards?", a difference, a product, ...
* ``shapes``: red circles, blue squares (and, from level 2, green triangles), one per cell;
  "How many more circles than squares are there?", totals, ...
* ``bars``: a bar chart without axis, one bar per column, 8 pixels per unit;
  "How much taller is the tallest bar than the shortest?", sums, ...

Every scene also has a plain description (:func:`describe`: "The cards show 3 and 7.") used by
the ``smolvlm-smollm2`` alignment stage; the questions are never shown during alignment.

``meta`` holds what is needed to recompute the answer (:func:`visual_math_answer`)::

    {"source": "visual_math", "kind": "cards", "level": 1, "index": 0,
     "values": [3, 7], "cells": [[0, 1], [2, 3]], "op": "sum"}

``values`` are the numbers read off the image in reading order (left to right, then top to
bottom; for ``shapes`` the counts per shape in :data:`SHAPE_ORDER`), ``cells`` the ``[row, col]``
of each drawn object and ``op`` the question (a key of :data:`OPS`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from vlm_treegrpo.data.drawing import draw_distinct, stream_rng
from vlm_treegrpo.data.types import Example
from vlm_treegrpo.data.visual import _draw_number

__all__ = [
    "DESCRIBE_PROMPT",
    "KINDS",
    "LEVELS",
    "OPS",
    "VISUAL_MATH_INSTRUCTION",
    "cell_words",
    "describe",
    "description_examples",
    "visual_math_answer",
    "visual_math_splits",
]

VISUAL_MATH_INSTRUCTION = "First say what the image shows, then solve. End with 'Answer: <number>'."
DESCRIBE_PROMPT = "Describe the image."
"""The one prompt of the alignment stage (:func:`description_examples`)."""

KINDS = ("cards", "shapes", "bars")
IMAGE_SIZE = 64
CELL = 16
GRID = IMAGE_SIZE // CELL
SHAPE_ORDER = ("circle", "square", "triangle")
_SHAPE_COLOURS = {"circle": (220, 40, 40), "square": (40, 80, 230), "triangle": (30, 150, 50)}
_BAR_COLOUR = (90, 90, 90)
_CARD_FILL, _CARD_EDGE = (250, 235, 170), (120, 100, 40)
BAR_UNIT = 8
"""Pixels per unit of bar height."""


@dataclass(frozen=True)
class _Level:
    """Knobs for one level."""

    cards: int
    """Cards per image."""
    bars: int
    """Bars per chart (values 1..7, distinct)."""
    shapes: tuple[str, ...]
    """Shape kinds drawn (each 1..max_count times)."""
    max_count: int
    """Most shapes of one kind."""
    ops: dict[str, tuple[str, ...]]
    """Questions by kind (keys of :data:`OPS`)."""


LEVELS: dict[int, _Level] = {
    1: _Level(cards=2, bars=3, shapes=("circle", "square"), max_count=5,
              ops={"cards": ("sum", "difference", "product"), "shapes": ("more", "total"), "bars": ("range", "sum")}),
    2: _Level(cards=3, bars=4, shapes=SHAPE_ORDER, max_count=4,
              ops={"cards": ("sum", "first_two_times_third", "product_minus_third"), "shapes": ("total", "two_minus_third"),
                   "bars": ("sum", "range", "tallest_two")}),
    3: _Level(cards=4, bars=4, shapes=SHAPE_ORDER, max_count=5,
              ops={"cards": ("sum", "pairs_product_sum", "first_two_times_third"), "shapes": ("double_first_minus_rest", "total"),
                   "bars": ("sum", "range_times_count")}),
}
"""Levels 1 (two numbers, one operation) to 3 (four numbers, two or three operations)."""

OPS: dict[str, tuple[str, Callable[[list[int]], int]]] = {
    # cards
    "sum": ("What is the sum of the numbers?", sum),
    "difference": ("What is the larger number minus the smaller one?", lambda v: max(v) - min(v)),
    "product": ("What is the product of the numbers?", lambda v: v[0] * v[1]),
    "first_two_times_third": ("Add the first two numbers, then multiply by the third.", lambda v: (v[0] + v[1]) * v[2]),
    "product_minus_third": ("Multiply the first two numbers, then subtract the third.", lambda v: v[0] * v[1] - v[2]),
    "pairs_product_sum": ("Multiply the first two numbers, multiply the last two, and add the results.",
                          lambda v: v[0] * v[1] + v[2] * v[3]),
    # shapes (values: counts in SHAPE_ORDER)
    "more": ("How many more circles than squares are there?", lambda v: v[0] - v[1]),
    "total": ("How many shapes are there in total?", sum),
    "two_minus_third": ("How many circles and squares together, minus the triangles?", lambda v: v[0] + v[1] - v[2]),
    "double_first_minus_rest": ("What is twice the number of circles minus the squares and triangles?",
                                lambda v: 2 * v[0] - v[1] - v[2]),
    # bars (values: heights left to right)
    "range": ("How much taller is the tallest bar than the shortest?", lambda v: max(v) - min(v)),
    "tallest_two": ("What is the total height of the two tallest bars?", lambda v: sum(sorted(v)[-2:])),
    "range_times_count": ("What is the tallest minus the shortest bar, times the number of bars?",
                          lambda v: (max(v) - min(v)) * len(v)),
}
"""Question text and answer function by op. Card and bar values are in reading order."""

_NOUN = {"circle": ("circle", "circles"), "square": ("square", "squares"), "triangle": ("triangle", "triangles")}


def _check_level(level: int) -> _Level:
    if level not in LEVELS:
        raise ValueError(f"level must be in {min(LEVELS)}..{max(LEVELS)}, got {level}")
    return LEVELS[level]


# ----------------------------------------------------------------------------- answers and text


def visual_math_answer(meta: dict) -> int:
    """Recompute an example's integer answer from ``meta["values"]`` and ``meta["op"]``."""
    return OPS[meta["op"]][1](list(meta["values"]))


def _listing(values: Sequence) -> str:
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def describe(meta: dict) -> str:
    """The plain description of a scene (what the alignment stage teaches the model to say)."""
    kind, values = meta["kind"], meta["values"]
    if kind == "cards":
        return f"The cards show {_listing(values)}."
    if kind == "bars":
        return f"The bars are {_listing(values)} tall."
    parts = [f"{n} {_NOUN[s][n != 1]}" for s, n in zip(SHAPE_ORDER, values)]
    return f"There are {_listing(parts)}."


def cell_words(meta: dict) -> list[str]:
    """What each of the 4 x 4 cells shows, as one word (reading order; ``""`` for an empty cell):
    a card's digit, a shape's name, a bar's height in its bottom cell. The alignment's grounding
    warm-up pulls each image token toward the language model's embedding of its cell's word."""
    words = [""] * (GRID * GRID)
    kind, values, cells = meta["kind"], meta["values"], meta["cells"]
    if kind == "shapes":
        values = _shuffled([s for s, n in zip(SHAPE_ORDER, values) for _ in range(n)], meta)
    for v, (r, c) in zip(values, cells):
        words[r * GRID + c] = str(v)
    return words


def visual_math_key(ex: Example) -> str:
    """Content key of an example (scene + question): equal keys mean equal problems."""
    m = ex.meta
    blob = json.dumps([m["kind"], m["values"], m["cells"], m["op"]])
    return hashlib.sha256(blob.encode()).hexdigest()


# ----------------------------------------------------------------------------- scenes


def _cells(rng: random.Random, n: int) -> list[list[int]]:
    """``n`` distinct grid cells as ``[row, col]`` in reading order."""
    flat = sorted(rng.sample(range(GRID * GRID), n))
    return [[i // GRID, i % GRID] for i in flat]


def _cards(rng: random.Random, lv: _Level) -> tuple[list[int], list[list[int]]]:
    cells = _cells(rng, lv.cards)
    return [rng.randint(1, 9) for _ in cells], cells


def _shapes(rng: random.Random, lv: _Level) -> tuple[list[int], list[list[int]]]:
    counts = [rng.randint(1, lv.max_count) for _ in lv.shapes]
    return counts, _cells(rng, sum(counts))


def _bars(rng: random.Random, lv: _Level) -> tuple[list[int], list[list[int]]]:
    values = rng.sample(range(1, 8), lv.bars)
    cols = sorted(rng.sample(range(GRID), lv.bars))
    return values, [[GRID - 1, c] for c in cols]


_SCENES = {"cards": _cards, "shapes": _shapes, "bars": _bars}


def _valid(kind: str, op: str, values: list[int], lv: _Level) -> bool:
    """Questions whose answer is a non-negative integer and, for ``more``, not a tie."""
    if kind == "shapes" and op == "more" and values[0] <= values[1]:
        return False
    return OPS[op][1](values) >= 0


def _draw_scene(rng: random.Random, level: int, kinds: Sequence[str], index: int) -> Example:
    lv = LEVELS[level]
    kind = rng.choice(kinds)
    while True:  # rejection sampling: every op keeps well over half its draws
        values, cells = _SCENES[kind](rng, lv)
        op = rng.choice(lv.ops[kind])
        if _valid(kind, op, values, lv):
            break
    meta = {"source": "visual_math", "kind": kind, "level": level, "index": index,
            "values": values, "cells": cells, "op": op}
    return Example(prompt=OPS[op][0], answer=str(visual_math_answer(meta)), meta=meta)


# ----------------------------------------------------------------------------- drawing


def render(meta: dict) -> Image.Image:
    """The image of a scene, drawn from ``meta`` alone (no fonts, no anti-aliasing)."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    kind, values, cells = meta["kind"], meta["values"], meta["cells"]
    if kind == "cards":
        for v, (r, c) in zip(values, cells):
            x0, y0 = c * CELL, r * CELL
            draw.rectangle([x0 + 1, y0 + 1, x0 + CELL - 2, y0 + CELL - 2], fill=_CARD_FILL, outline=_CARD_EDGE)
            _draw_number(draw, x0 + 10, y0 + 3, v, 2)
    elif kind == "bars":
        for v, (_, c) in zip(values, cells):
            x0 = c * CELL + 3
            draw.rectangle([x0, IMAGE_SIZE - v * BAR_UNIT, x0 + CELL - 7, IMAGE_SIZE - 1], fill=_BAR_COLOUR)
    else:
        shapes = [s for s, n in zip(SHAPE_ORDER, values) for _ in range(n)]
        for s, (r, c) in zip(_shuffled(shapes, meta), cells):
            cx, cy, h = c * CELL + CELL // 2, r * CELL + CELL // 2, 5
            fill = _SHAPE_COLOURS[s]
            if s == "circle":
                draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
            elif s == "square":
                draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
            else:
                draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
    return img


def _shuffled(shapes: list[str], meta: dict) -> list[str]:
    """The shapes in a cell order fixed by the scene itself (so ``render`` needs only ``meta``)."""
    seed = int(hashlib.sha256(json.dumps([meta["values"], meta["cells"]]).encode()).hexdigest()[:8], 16)
    out = list(shapes)
    random.Random(seed).shuffle(out)
    return out


# ----------------------------------------------------------------------------- public API


def _generate(n: int, rng: random.Random, level: int, kinds: Sequence[str] | None,
              exclude: frozenset[str] | set[str] = frozenset()) -> list[Example]:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_level(level)
    kinds = tuple(KINDS if not kinds else kinds)
    if any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be a subset of {list(KINDS)}, got {list(kinds)}")
    kept = draw_distinct(n, lambda i: _draw_scene(rng, level, kinds, i), visual_math_key, exclude,
                         f"visual math problems at level {level}")
    return [dataclasses.replace(ex, images=(render(ex.meta),)) for ex in kept]


def visual_math_splits(n_train: int, n_test: int, seed: int, level: int = 1, kinds: Sequence[str] | None = None
                       ) -> tuple[list[Example], list[Example]]:
    """Train and test problems with no problem (:func:`visual_math_key`) in common; the same
    arguments give the same lists. ``kinds`` restricts the kinds drawn (default: all)."""
    train = _generate(n_train, stream_rng("visual_math", seed, "train"), level, kinds)
    test = _generate(n_test, stream_rng("visual_math", seed, "test"), level, kinds,
                     exclude={visual_math_key(ex) for ex in train})
    return train, test


def description_examples(n: int, seed: int) -> list[Example]:
    """``n`` images of every kind and level with their :func:`describe` text as the answer and
    :data:`DESCRIBE_PROMPT` as the prompt: the alignment stage's data (its own seed stream)."""
    rng = stream_rng("visual_math", seed, "describe")
    out = []
    for i in range(n):
        ex = _draw_scene(rng, rng.choice(sorted(LEVELS)), KINDS, i)
        out.append(Example(prompt=DESCRIBE_PROMPT, answer=describe(ex.meta), images=(render(ex.meta),),
                           meta={**ex.meta, "source": "visual_math_describe"}))
    return out
