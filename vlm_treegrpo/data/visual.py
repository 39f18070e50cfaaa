"""Seeded synthetic visual questions with integer answers: a small, verifiable VLM task.

Each example is one RGB image of ``image_size x image_size`` pixels (drawn with
pillow, no anti-aliasing, no fonts: digits come from a built-in 3x5 pixel font, so
the same seed gives the same image bytes) and one question whose answer is an
integer computed while the scene is built.  Four kinds, drawn per example:

* ``count``: shapes on a cell grid; "How many red circles are in the image?"
  (or only a colour, or only a shape).
* ``relation``: shapes on a cell grid and one unique anchor; "How many shapes are
  to the left of the blue square?" (left/right compare grid columns, above/below
  compare rows; shapes sit at cell centres, so an object in the anchor's column is
  neither left nor right of it).
* ``bar_chart``: bars on a y axis with one grid line per unit and labelled ticks;
  the value of the tallest / shortest / a coloured bar, the range, or the sum.
* ``geometry``: rectangles filled on a square grid; area or perimeter in grid
  units, or the total area.

``meta`` holds what is needed to recompute the answer (:func:`visual_answer`)::

    {"source": "visual", "kind": "count", "difficulty": 1, "index": 0, "image_size": 64,
     "scene": [{"shape": "circle", "colour": "red", "row": 0, "col": 2, "cx": 53, "cy": 10,
                "size": 7}, ...],
     "query": {"op": "count", "colour": "red", "shape": "circle"},
     "layout": {...}}                     # pixel geometry of the grid / axis

Scene items by kind: shapes have ``shape`` in :data:`SHAPES`, ``colour``, grid
``row``/``col`` and pixel centre ``cx``/``cy`` with half-size ``size``; bars have
``shape="bar"``, ``colour``, ``slot``, ``value`` and pixel ``box``; rectangles have
``shape="rectangle"``, ``colour``, grid ``row``/``col``/``width``/``height`` and
pixel ``box`` (``[x0, y0, x1, y1]``, inclusive).

The prompt is only the question; :data:`VISUAL_INSTRUCTION` is appended by whoever
builds the chat message.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from vlm_treegrpo.data.drawing import draw_distinct, stream_rng
from vlm_treegrpo.data.types import Example

__all__ = [
    "COLOURS",
    "DIFFICULTIES",
    "KINDS",
    "SHAPES",
    "VISUAL_INSTRUCTION",
    "make_visual",
    "visual_answer",
    "visual_key",
    "visual_splits",
]

VISUAL_INSTRUCTION = "Answer with the final number as 'Answer: <number>'."

KINDS = ("count", "relation", "bar_chart", "geometry")
"""Question kinds, drawn uniformly per example unless ``kinds`` restricts them."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 150, 50),
    "blue": (40, 80, 230),
    "yellow": (235, 195, 20),
    "purple": (150, 60, 190),
}
"""Named fill colours (far apart so tiny images stay unambiguous)."""

SHAPES = ("circle", "square", "triangle")

MIN_IMAGE_SIZE = 32
_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_GRID = (200, 200, 200)
_GEO_GRID = (140, 140, 140)


@dataclass(frozen=True)
class _Level:
    """Knobs for one difficulty level."""

    grid: int
    """Cells per side of the shape scenes (count / relation)."""
    min_objects: int
    """Fewest shapes in a count / relation scene."""
    max_objects: int
    """Most shapes in a count / relation scene (at most ``grid**2``)."""
    n_bars: int
    """Bars per chart (at most ``len(COLOURS)``, colours are distinct)."""
    max_value: int
    """Top of the bar chart axis; bar values are distinct in ``1..max_value``."""
    geo_grid: int
    """Cells per side of the geometry grid."""
    n_rects: int
    """Rectangles per geometry scene (non-overlapping, distinct colours)."""
    max_side: int
    """Largest rectangle side in grid cells."""


DIFFICULTIES: dict[int, _Level] = {
    1: _Level(grid=3, min_objects=2, max_objects=4, n_bars=3, max_value=5,
              geo_grid=6, n_rects=1, max_side=4),
    2: _Level(grid=4, min_objects=5, max_objects=8, n_bars=4, max_value=8,
              geo_grid=8, n_rects=2, max_side=5),
    3: _Level(grid=5, min_objects=9, max_objects=14, n_bars=5, max_value=10,
              geo_grid=10, n_rects=3, max_side=6),
}
"""Supported levels: more shapes / bars / rectangles and larger values as it grows."""

# 3x5 pixel digits, rows top to bottom.
_DIGITS = {
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "001", "001", "001"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
}


# ----------------------------------------------------------------------------- answers


def visual_answer(meta: dict) -> int:
    """Recompute an example's integer answer from ``meta["scene"]`` and ``meta["query"]``."""
    kind, scene, q = meta["kind"], meta["scene"], meta["query"]
    if kind == "count":
        return sum(1 for o in scene if _matches(o, q["colour"], q["shape"]))
    if kind == "relation":
        anchors = [o for o in scene
                   if o["colour"] == q["anchor"]["colour"] and o["shape"] == q["anchor"]["shape"]]
        if len(anchors) != 1:
            raise ValueError(f"relation anchor {q['anchor']} is not unique in the scene")
        a = anchors[0]
        side = {
            "left": lambda o: o["col"] < a["col"], "right": lambda o: o["col"] > a["col"],
            "above": lambda o: o["row"] < a["row"], "below": lambda o: o["row"] > a["row"],
        }[q["op"]]
        return sum(1 for o in scene if o is not a and side(o) and _matches(o, q["colour"], None))
    if kind == "bar_chart":
        values = [b["value"] for b in scene]
        if q["op"] == "value":
            return next(b["value"] for b in scene if b["colour"] == q["colour"])
        return {"max": max, "min": min, "sum": sum,
                "range": lambda v: max(v) - min(v)}[q["op"]](values)
    if kind == "geometry":
        if q["op"] == "total_area":
            return sum(r["width"] * r["height"] for r in scene)
        r = next(r for r in scene if r["colour"] == q["colour"])
        return r["width"] * r["height"] if q["op"] == "area" else 2 * (r["width"] + r["height"])
    raise ValueError(f"unknown visual kind {kind!r}")


def _matches(obj: dict, colour: str | None, shape: str | None) -> bool:
    return (colour is None or obj["colour"] == colour) and (shape is None or obj["shape"] == shape)


def visual_key(ex: Example) -> str:
    """Content key of an example's image (kind + scene): equal keys mean equal pictures."""
    blob = json.dumps([ex.meta["kind"], ex.meta["scene"]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# ----------------------------------------------------------------------------- drawing


def _dark(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(c * 0.55) for c in rgb)  # type: ignore[return-value]


def _draw_number(draw: ImageDraw.ImageDraw, right: int, top: int, number: int, scale: int) -> None:
    """Draw ``number`` in the pixel font with its right edge at x=``right``."""
    text = str(number)
    x = right - (len(text) * 4 - 1) * scale + 1
    for ch in text:
        for dy, row in enumerate(_DIGITS[ch]):
            for dx, bit in enumerate(row):
                if bit == "1":
                    x0, y0 = x + dx * scale, top + dy * scale
                    draw.rectangle([x0, y0, x0 + scale - 1, y0 + scale - 1], fill=_BLACK)
        x += 4 * scale


def _draw_shape(draw: ImageDraw.ImageDraw, o: dict) -> None:
    cx, cy, r = o["cx"], o["cy"], o["size"]
    fill = COLOURS[o["colour"]]
    box = [cx - r, cy - r, cx + r, cy + r]
    if o["shape"] == "circle":
        draw.ellipse(box, fill=fill, outline=_dark(fill))
    elif o["shape"] == "square":
        draw.rectangle(box, fill=fill, outline=_dark(fill))
    else:
        points = [(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)]
        draw.polygon(points, fill=fill, outline=_dark(fill))


def _render(kind: str, scene: list[dict], layout: dict, size: int) -> Image.Image:
    """Draw a scene; the pixels follow from (kind, scene, layout, size) alone."""
    img = Image.new("RGB", (size, size), _WHITE)
    draw = ImageDraw.Draw(img)
    if kind in ("count", "relation"):
        for o in scene:
            _draw_shape(draw, o)
    elif kind == "bar_chart":
        left, base, right, unit = layout["left"], layout["base"], layout["right"], layout["unit"]
        scale, glyph_h = layout["scale"], 5 * layout["scale"]
        for v in range(1, layout["axis_max"] + 1):
            draw.line([(left, base - v * unit), (right, base - v * unit)], fill=_GRID)
        for b in scene:
            draw.rectangle(b["box"], fill=COLOURS[b["colour"]])
        draw.line([(left, layout["top"]), (left, base)], fill=_BLACK)
        draw.line([(left, base), (right, base)], fill=_BLACK)
        for v in range(0, layout["axis_max"] + 1, layout["tick_step"]):
            y = base - v * unit
            draw.line([(left - scale - 1, y), (left - 1, y)], fill=_BLACK)
            _draw_number(draw, left - 2 * scale - 2, y - glyph_h // 2, v, scale)
    elif kind == "geometry":
        ox, oy, cell, g = layout["x0"], layout["y0"], layout["cell"], layout["grid"]
        for r in scene:
            draw.rectangle(r["box"], fill=COLOURS[r["colour"]])
        for i in range(g + 1):
            draw.line([(ox + i * cell, oy), (ox + i * cell, oy + g * cell)], fill=_GEO_GRID)
            draw.line([(ox, oy + i * cell), (ox + g * cell, oy + i * cell)], fill=_GEO_GRID)
        for r in scene:
            draw.rectangle(r["box"], outline=_dark(COLOURS[r["colour"]]))
    else:
        raise ValueError(f"unknown visual kind {kind!r}")
    return img


# ----------------------------------------------------------------------------- scenes


def _shape_cells(rng: random.Random, lv: _Level, size: int, n: int) -> tuple[list[dict], dict]:
    """``n`` empty shape slots at distinct grid cells (row/col/cx/cy/size), plus the layout."""
    cell = size // lv.grid
    off = (size - cell * lv.grid) // 2
    r = max(3, int(cell * 0.34))
    slots = []
    for idx in rng.sample(range(lv.grid * lv.grid), n):
        row, col = divmod(idx, lv.grid)
        slots.append({"row": row, "col": col, "cx": off + col * cell + cell // 2,
                      "cy": off + row * cell + cell // 2, "size": r})
    return slots, {"grid": lv.grid, "cell": cell, "offset": off}


def _obj(shape: str, colour: str, slot: dict) -> dict:
    return {"shape": shape, "colour": colour, **slot}


def _count_scene(rng: random.Random, lv: _Level, size: int):
    n = rng.randint(lv.min_objects, lv.max_objects)
    mode = rng.choice(("colour_shape", "shape", "colour"))
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    q_colour = colour if mode != "shape" else None
    q_shape = shape if mode != "colour" else None
    k = rng.randint(1, max(1, (n + 1) // 2))
    combos = [(s, c) for s in SHAPES for c in COLOURS]
    hits = [x for x in combos if _matches({"shape": x[0], "colour": x[1]}, q_colour, q_shape)]
    misses = [x for x in combos if x not in hits]
    picks = [rng.choice(hits) for _ in range(k)] + [rng.choice(misses) for _ in range(n - k)]
    rng.shuffle(picks)
    slots, layout = _shape_cells(rng, lv, size, n)
    scene = [_obj(s, c, slot) for (s, c), slot in zip(picks, slots)]
    what = (f"{colour} {shape}s" if mode == "colour_shape"
            else f"{shape}s" if mode == "shape" else f"{colour} shapes")
    prompt = f"How many {what} are in the image?"
    return scene, {"op": "count", "colour": q_colour, "shape": q_shape}, layout, prompt


def _relation_scene(rng: random.Random, lv: _Level, size: int):
    n = rng.randint(max(3, lv.min_objects), lv.max_objects)
    anchor = (rng.choice(SHAPES), rng.choice(list(COLOURS)))
    others = [(s, c) for s in SHAPES for c in COLOURS if (s, c) != anchor]
    picks = [anchor] + [rng.choice(others) for _ in range(n - 1)]
    rng.shuffle(picks)
    slots, layout = _shape_cells(rng, lv, size, n)
    scene = [_obj(s, c, slot) for (s, c), slot in zip(picks, slots)]
    op = rng.choice(("left", "right", "above", "below"))
    q_colour = rng.choice(list(COLOURS)) if lv.grid >= 4 and rng.random() < 0.5 else None
    where = {"left": "to the left of", "right": "to the right of",
             "above": "above", "below": "below"}[op]
    what = f"{q_colour} shapes" if q_colour else "shapes"
    prompt = f"How many {what} are {where} the {anchor[1]} {anchor[0]}?"
    query = {"op": op, "anchor": {"shape": anchor[0], "colour": anchor[1]}, "colour": q_colour}
    return scene, query, layout, prompt


def _bar_scene(rng: random.Random, lv: _Level, size: int):
    scale = max(1, size // 64)
    glyph_h = 5 * scale
    label_w = (len(str(lv.max_value)) * 4 - 1) * scale
    left = label_w + 3 * scale + 3
    top, right = glyph_h // 2 + 2, size - 3
    unit = (size - 3 - top) // lv.max_value
    base = top + unit * lv.max_value
    tick_step = next(s for s in (1, 2, 5, 10) if unit * s >= glyph_h + scale)
    slot_w = (right - left) // lv.n_bars
    bar_w = max(3, slot_w * 3 // 5)
    values = rng.sample(range(1, lv.max_value + 1), lv.n_bars)
    colours = rng.sample(list(COLOURS), lv.n_bars)
    scene = []
    for i, (v, c) in enumerate(zip(values, colours)):
        x0 = left + 1 + i * slot_w + (slot_w - bar_w) // 2
        scene.append({"shape": "bar", "colour": c, "slot": i, "value": v,
                      "box": [x0, base - v * unit, x0 + bar_w - 1, base - 1]})
    ops = ["max", "min", "value"] + (["range"] if lv.n_bars >= 4 else []) + (
        ["sum"] if lv.n_bars >= 5 else [])
    op = rng.choice(ops)
    q_colour = rng.choice(colours) if op == "value" else None
    prompt = {
        "max": "What is the value of the tallest bar?",
        "min": "What is the value of the shortest bar?",
        "value": f"What is the value of the {q_colour} bar?",
        "range": "What is the difference between the values of the tallest and the shortest bar?",
        "sum": "What is the sum of the values of all bars?",
    }[op]
    layout = {"left": left, "top": top, "right": right, "base": base, "unit": unit,
              "axis_max": lv.max_value, "tick_step": tick_step, "scale": scale}
    return scene, {"op": op, "colour": q_colour}, layout, prompt


def _geometry_scene(rng: random.Random, lv: _Level, size: int):
    g = lv.geo_grid
    cell = (size - 4) // g
    ox = oy = (size - cell * g) // 2
    n = lv.n_rects
    colours = rng.sample(list(COLOURS), n)
    taken: set[tuple[int, int]] = set()
    scene: list[dict] = []
    while len(scene) < n:  # rejection sampling; max_side*n_rects leaves ample room
        w, h = rng.randint(1, lv.max_side), rng.randint(1, lv.max_side)
        col, row = rng.randint(0, g - w), rng.randint(0, g - h)
        cells = {(row + i, col + j) for i in range(h) for j in range(w)}
        if cells & taken:
            continue
        taken |= cells
        box = [ox + col * cell, oy + row * cell, ox + (col + w) * cell, oy + (row + h) * cell]
        scene.append({"shape": "rectangle", "colour": colours[len(scene)], "row": row,
                      "col": col, "width": w, "height": h, "box": box})
    ops = ["area"] + (["perimeter"] if lv.n_rects >= 2 else []) + (
        ["total_area"] if n >= 2 else [])
    op = rng.choice(ops)
    q_colour = None if op == "total_area" else rng.choice(colours)
    the = "the rectangle" if n == 1 else f"the {q_colour} rectangle"
    prompt = {
        "area": f"What is the area of {the} in grid squares?",
        "perimeter": f"What is the perimeter of {the} in grid units?",
        "total_area": "What is the total area of all rectangles in grid squares?",
    }[op]
    layout = {"grid": g, "cell": cell, "x0": ox, "y0": oy}
    return scene, {"op": op, "colour": q_colour}, layout, prompt


_BUILDERS = {"count": _count_scene, "relation": _relation_scene,
             "bar_chart": _bar_scene, "geometry": _geometry_scene}


# ----------------------------------------------------------------------------- public API


def _generate(n: int, rng: random.Random, difficulty: int, image_size: int,
              kinds: Sequence[str] | None, exclude: frozenset[str] | set[str] = frozenset()
              ) -> list[Example]:
    """Draw ``n`` examples with distinct scenes, none of whose keys is in ``exclude``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    kinds = tuple(KINDS if kinds is None else kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
    lv = DIFFICULTIES[difficulty]

    def draw(index: int) -> Example:  # the scene and question; the image is drawn once kept
        kind = rng.choice(kinds)
        scene, query, layout, prompt = _BUILDERS[kind](rng, lv, image_size)
        meta = {"source": "visual", "kind": kind, "difficulty": difficulty, "index": index,
                "image_size": image_size, "scene": scene, "query": query, "layout": layout}
        return Example(prompt=prompt, answer=str(visual_answer(meta)), meta=meta)

    kept = draw_distinct(n, draw, visual_key, exclude, f"visual scenes at difficulty {difficulty}")
    return [dataclasses.replace(ex, images=(_render(ex.meta["kind"], ex.meta["scene"], ex.meta["layout"], image_size),))
            for ex in kept]


def make_visual(n: int, seed: int, difficulty: int = 1, image_size: int = 64,
                kinds: Sequence[str] | None = None) -> list[Example]:
    """Return ``n`` visual questions with distinct scenes; same arguments give the same list.

    ``kinds`` restricts the drawn kinds (default: all of :data:`KINDS`).  Each
    example carries one RGB ``image_size x image_size`` image; answers are
    non-negative integers (``str``).
    """
    return _generate(n, stream_rng("visual", seed, "train"), difficulty, image_size, kinds)


def visual_splits(n_train: int, n_test: int, seed: int, difficulty: int = 1,
                  image_size: int = 64, kinds: Sequence[str] | None = None
                  ) -> tuple[list[Example], list[Example]]:
    """Train and test lists with no scene (:func:`visual_key`) in common.

    ``train`` equals ``make_visual(n_train, seed, difficulty, image_size, kinds)``;
    ``test`` comes from a separate seed stream and skips every train scene.
    """
    train = make_visual(n_train, seed, difficulty, image_size, kinds)
    test = _generate(n_test, stream_rng("visual", seed, "test"), difficulty, image_size,
                     kinds, exclude={visual_key(ex) for ex in train})
    return train, test
