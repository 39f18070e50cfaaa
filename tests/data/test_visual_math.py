"""The visual math generator: seeded, answers recomputable from meta, disjoint splits, level errors."""
from __future__ import annotations

import pytest

from vlm_treegrpo.config import ConfigError, config_from_dict
from vlm_treegrpo.data.sources import load_task
from vlm_treegrpo.data.visual_math import (
    CELL,
    DESCRIBE_PROMPT,
    LEVELS,
    OPS,
    VISUAL_MATH_INSTRUCTION,
    cell_words,
    describe,
    description_examples,
    render,
    visual_math_answer,
    visual_math_key,
    visual_math_splits,
)


def test_same_seed_same_problems_and_pixels():
    a, _ = visual_math_splits(12, 3, seed=5)
    b, _ = visual_math_splits(12, 3, seed=5)
    c, _ = visual_math_splits(12, 3, seed=6)
    assert [(x.prompt, x.answer, x.meta) for x in a] == [(y.prompt, y.answer, y.meta) for y in b]
    assert [x.images[0].tobytes() for x in a] == [y.images[0].tobytes() for y in b]
    assert [x.meta for x in a] != [y.meta for y in c]


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_answers_recompute_from_meta_and_are_non_negative(level):
    train, test = visual_math_splits(60, 20, seed=0, level=level)
    for ex in train + test:
        assert ex.answer == str(visual_math_answer(ex.meta)) and int(ex.answer) >= 0
        assert ex.meta["op"] in LEVELS[level].ops[ex.meta["kind"]] and ex.prompt == OPS[ex.meta["op"]][0]
        assert ex.images[0].size == (64, 64) and ex.images[0].tobytes() == render(ex.meta).tobytes()
        if ex.meta["op"] == "more":
            assert ex.meta["values"][0] > ex.meta["values"][1]  # never a tie or a negative difference


def test_hand_computed_answers():
    assert visual_math_answer({"op": "difference", "values": [4, 9]}) == 5
    assert visual_math_answer({"op": "first_two_times_third", "values": [2, 3, 4]}) == 20
    assert visual_math_answer({"op": "pairs_product_sum", "values": [2, 3, 4, 5]}) == 26
    assert visual_math_answer({"op": "tallest_two", "values": [5, 1, 7, 2]}) == 12
    assert visual_math_answer({"op": "double_first_minus_rest", "values": [5, 2, 1]}) == 7


def test_train_and_test_share_no_problem():
    train, test = visual_math_splits(300, 100, seed=1)
    assert not {visual_math_key(x) for x in train} & {visual_math_key(x) for x in test}
    assert len({visual_math_key(x) for x in train}) == 300


def test_kinds_restrict_and_level_range_is_named():
    train, _ = visual_math_splits(10, 2, seed=0, kinds=["bars"])
    assert {x.meta["kind"] for x in train} == {"bars"}
    with pytest.raises(ValueError, match=r"level must be in 1\.\.3, got 7"):
        visual_math_splits(4, 2, seed=0, level=7)
    with pytest.raises(ValueError, match="kinds must be a subset"):
        visual_math_splits(4, 2, seed=0, kinds=["clocks"])


def test_config_names_the_field():
    with pytest.raises(ConfigError, match=r"^data.difficulty: must be in 1\.\.3 for the visual_math task, got 7$"):
        config_from_dict({"data": {"source": "visual_math", "difficulty": 7}})
    with pytest.raises(ConfigError, match=r"^data.kinds: unknown kinds \['count'\]"):
        config_from_dict({"data": {"source": "visual_math", "kinds": ["count"]}})
    task = load_task("visual_math", "gsm8k", 4, 2, 2, 0, kinds=["cards"])
    assert task.instruction == VISUAL_MATH_INSTRUCTION and {x.meta["level"] for x in task.train} == {2}


def test_descriptions_and_cell_words():
    assert describe({"kind": "cards", "values": [3, 7]}) == "The cards show 3 and 7."
    assert describe({"kind": "bars", "values": [5, 1, 6]}) == "The bars are 5, 1 and 6 tall."
    assert describe({"kind": "shapes", "values": [1, 4]}) == "There are 1 circle and 4 squares."
    assert describe({"kind": "shapes", "values": [2, 1, 3]}) == "There are 2 circles, 1 square and 3 triangles."
    meta = {"kind": "cards", "values": [3, 7], "cells": [[0, 1], [2, 3]]}
    words = cell_words(meta)
    assert words[1] == "3" and words[2 * 4 + 3] == "7" and words.count("") == 14
    img = render(meta)
    inside = [img.getpixel((1 * CELL + x, 0 * CELL + y)) for x in range(CELL) for y in range(CELL)]
    empty = [img.getpixel((2 * CELL + x, 0 * CELL + y)) for x in range(CELL) for y in range(CELL)]
    assert any(p != (255, 255, 255) for p in inside) and all(p == (255, 255, 255) for p in empty)


def test_shape_cells_match_the_counts():
    train, _ = visual_math_splits(30, 2, seed=3, kinds=["shapes"])
    for ex in train:
        words = cell_words(ex.meta)
        counts = [words.count(s) for s in ("circle", "square", "triangle")][: len(ex.meta["values"])]
        assert counts == ex.meta["values"]


def test_description_examples_cover_every_kind():
    examples = description_examples(40, seed=0)
    assert {x.meta["kind"] for x in examples} == {"cards", "shapes", "bars"}
    assert all(x.prompt == DESCRIBE_PROMPT and x.answer == describe(x.meta) for x in examples)
