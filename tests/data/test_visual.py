"""Tests for the synthetic visual question generator."""
from __future__ import annotations

from collections import Counter

import pytest

from vlm_treegrpo.data.types import Example
from vlm_treegrpo.data.visual import (
    COLOURS,
    KINDS,
    SHAPES,
    VISUAL_INSTRUCTION,
    make_visual,
    visual_answer,
    visual_key,
    visual_splits,
)


def _image_bytes(examples: list[Example]) -> list[bytes]:
    return [ex.images[0].tobytes() for ex in examples]


def _recompute(meta: dict) -> int:
    """An independent answer from the scene, written out per kind."""
    scene, q = meta["scene"], meta["query"]
    kind = meta["kind"]
    if kind == "count":
        return len([o for o in scene
                    if q["colour"] in (None, o["colour"]) and q["shape"] in (None, o["shape"])])
    if kind == "relation":
        (anchor,) = [o for o in scene if (o["shape"], o["colour"]) ==
                     (q["anchor"]["shape"], q["anchor"]["colour"])]
        axis, sign = {"left": ("cx", -1), "right": ("cx", 1),
                      "above": ("cy", -1), "below": ("cy", 1)}[q["op"]]
        return len([o for o in scene if o is not anchor
                    and sign * (o[axis] - anchor[axis]) > 0
                    and q["colour"] in (None, o["colour"])])
    if kind == "bar_chart":
        values = {b["colour"]: b["value"] for b in scene}
        return {"max": max(values.values()), "min": min(values.values()),
                "sum": sum(values.values()),
                "range": max(values.values()) - min(values.values()),
                "value": values.get(q["colour"])}[q["op"]]
    assert kind == "geometry"
    rects = {r["colour"]: r for r in scene}
    if q["op"] == "total_area":
        return sum(r["width"] * r["height"] for r in scene)
    r = rects[q["colour"]]
    return r["width"] * r["height"] if q["op"] == "area" else 2 * (r["width"] + r["height"])


def test_deterministic_and_seed_sensitive() -> None:
    a = make_visual(40, seed=3, difficulty=2)
    b = make_visual(40, seed=3, difficulty=2)
    c = make_visual(40, seed=4, difficulty=2)
    assert [ex.prompt for ex in a] == [ex.prompt for ex in b]
    assert [ex.meta for ex in a] == [ex.meta for ex in b]
    assert _image_bytes(a) == _image_bytes(b)
    assert _image_bytes(a) != _image_bytes(c)


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_answers_recomputed_from_scene(difficulty: int) -> None:
    examples = make_visual(120, seed=0, difficulty=difficulty)
    seen_kinds = set()
    for i, ex in enumerate(examples):
        meta = ex.meta
        seen_kinds.add(meta["kind"])
        assert (meta["source"], meta["difficulty"], meta["index"]) == ("visual", difficulty, i)
        assert ex.answer == str(_recompute(meta)) == str(visual_answer(meta))
        assert int(ex.answer) >= 0
        assert ex.prompt.endswith("?") and "Answer" not in ex.prompt
        for item in meta["scene"]:
            assert item["colour"] in COLOURS
            assert item["shape"] in (*SHAPES, "bar", "rectangle")
    assert seen_kinds == set(KINDS)


def test_scene_matches_pixels() -> None:
    """Every scene item's fill colour is drawn where the scene says it is."""
    for difficulty in (1, 3):
        for ex in make_visual(60, seed=5, difficulty=difficulty, image_size=96):
            img = ex.images[0]
            for item in ex.meta["scene"]:
                if "cx" in item:
                    xy = (item["cx"], item["cy"])
                elif item["shape"] == "bar":
                    x0, y0, x1, y1 = item["box"]
                    xy = ((x0 + x1) // 2, y1)
                else:
                    cell = ex.meta["layout"]["cell"]
                    xy = (item["box"][0] + cell // 2, item["box"][1] + cell // 2)
                assert img.getpixel(xy) == COLOURS[item["colour"]], (ex.meta["kind"], item)


def test_relation_anchor_unique_and_shapes_on_distinct_cells() -> None:
    for ex in make_visual(150, seed=2, difficulty=3, kinds=["count", "relation"]):
        cells = [(o["row"], o["col"]) for o in ex.meta["scene"]]
        assert len(set(cells)) == len(cells)
        if ex.meta["kind"] == "relation":
            anchor = ex.meta["query"]["anchor"]
            assert sum((o["shape"], o["colour"]) == (anchor["shape"], anchor["colour"])
                       for o in ex.meta["scene"]) == 1
            assert f"{anchor['colour']} {anchor['shape']}" in ex.prompt


@pytest.mark.parametrize("size", [64, 128])
def test_images_rgb_of_requested_size(size: int) -> None:
    for ex in make_visual(40, seed=1, difficulty=2, image_size=size):
        assert len(ex.images) == 1
        assert ex.images[0].mode == "RGB"
        assert ex.images[0].size == (size, size)
        assert ex.meta["image_size"] == size


def test_every_kind_appears_in_200() -> None:
    counts = Counter(ex.meta["kind"] for ex in make_visual(200, seed=11))
    assert set(counts) == set(KINDS)
    assert min(counts.values()) >= 20


def test_difficulty_increases_object_count() -> None:
    means = {}
    for difficulty in (1, 2, 3):
        per_kind: dict[str, list[int]] = {k: [] for k in KINDS}
        for ex in make_visual(120, seed=7, difficulty=difficulty):
            per_kind[ex.meta["kind"]].append(len(ex.meta["scene"]))
        means[difficulty] = {k: sum(v) / len(v) for k, v in per_kind.items()}
    for kind in KINDS:
        assert means[1][kind] < means[2][kind] < means[3][kind], (kind, means)
    # values grow too: the bar chart axis top and the geometry grid size
    tops = [make_visual(1, 0, d, kinds=["bar_chart"])[0].meta["layout"]["axis_max"]
            for d in (1, 2, 3)]
    grids = [make_visual(1, 0, d, kinds=["geometry"])[0].meta["layout"]["grid"]
             for d in (1, 2, 3)]
    assert tops[0] < tops[1] < tops[2] and grids[0] < grids[1] < grids[2]


def test_splits_do_not_overlap() -> None:
    train, test = visual_splits(150, 60, seed=0, difficulty=1, image_size=64)
    assert len(train) == 150 and len(test) == 60
    train_keys = {visual_key(ex) for ex in train}
    test_keys = {visual_key(ex) for ex in test}
    assert len(train_keys) == 150 and len(test_keys) == 60
    assert not train_keys & test_keys
    assert not set(_image_bytes(train)) & set(_image_bytes(test))
    assert _image_bytes(train) == _image_bytes(make_visual(150, 0, 1, 64))


def test_kinds_filter_and_validation() -> None:
    assert {ex.meta["kind"] for ex in make_visual(20, 0, kinds=["geometry"])} == {"geometry"}
    assert make_visual(0, 0) == []
    with pytest.raises(ValueError, match="difficulty"):
        make_visual(1, 0, difficulty=4)
    with pytest.raises(ValueError, match="image_size"):
        make_visual(1, 0, image_size=16)
    with pytest.raises(ValueError, match="kinds"):
        make_visual(1, 0, kinds=["pie_chart"])
    assert VISUAL_INSTRUCTION == "Answer with the final number as 'Answer: <number>'."
