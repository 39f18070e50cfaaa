"""Tests for the synthetic arithmetic task."""
from __future__ import annotations

import pytest

from vlm_treegrpo.data.arithmetic import (
    ANSWER_INSTRUCTION,
    apply_ops,
    arithmetic_splits,
    make_arithmetic,
)
from vlm_treegrpo.data.types import Example


def test_deterministic_and_seed_sensitive() -> None:
    a = make_arithmetic(50, seed=3, difficulty=2)
    b = make_arithmetic(50, seed=3, difficulty=2)
    c = make_arithmetic(50, seed=4, difficulty=2)
    assert a == b
    assert [ex.prompt for ex in a] != [ex.prompt for ex in c]


@pytest.mark.parametrize("difficulty,max_num", [(1, 9), (2, 9), (3, 20), (4, 50)])
def test_answers_and_step_counts(difficulty: int, max_num: int) -> None:
    examples = make_arithmetic(300, seed=0, difficulty=difficulty)
    assert len(examples) == 300
    assert len({ex.prompt for ex in examples}) == 300
    for i, ex in enumerate(examples):
        assert isinstance(ex, Example)
        meta = ex.meta
        assert meta["source"] == "arithmetic"
        assert meta["difficulty"] == difficulty
        assert meta["index"] == i
        assert len(meta["ops"]) == difficulty
        if difficulty == 1:
            assert meta["ops"][0][0] in ("add", "sub")
        assert 1 <= meta["start"] <= max_num
        assert ex.answer == str(apply_ops(meta["start"], meta["ops"]))
        assert int(ex.answer) >= 0
        # intermediate counts never go negative; operands respect the level's range
        value = meta["start"]
        for op in meta["ops"]:
            if op[0] in ("add", "sub"):
                assert 1 <= op[1] <= max_num
            value = apply_ops(value, [op])
            assert value >= 0
        if difficulty == 4:
            assert any(op[0] in ("mul", "packs") for op in meta["ops"])
        assert ex.prompt.rstrip().endswith("?")
        assert "Answer" not in ex.prompt  # the instruction is added elsewhere
        assert ex.images == ()


def test_uses_varied_templates() -> None:
    examples = make_arithmetic(200, seed=1, difficulty=2)
    kinds = {op[0] for ex in examples for op in ex.meta["ops"]}
    assert kinds == {"add", "sub", "mul", "packs"}
    text = " ".join(ex.prompt for ex in examples)
    for word in ("apples", "coins", "marbles", "books"):
        assert word in text
    assert "twice as many" in text
    assert "packs of" in text


def test_splits_disjoint_and_deterministic() -> None:
    train, test = arithmetic_splits(400, 100, seed=7, difficulty=1)
    assert len(train) == 400 and len(test) == 100
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in test}
    assert len({ex.prompt for ex in test}) == 100
    assert train == make_arithmetic(400, seed=7, difficulty=1)
    assert (train, test) == arithmetic_splits(400, 100, seed=7, difficulty=1)
    # test comes from a different stream, not simply the continuation of train
    assert test[0].prompt != make_arithmetic(401, seed=7, difficulty=1)[400].prompt


def test_apply_ops_rejects_negative_and_unknown() -> None:
    assert apply_ops(3, [("add", 4), ("sub", 2)]) == 5
    assert apply_ops(2, [["mul", 3], ["packs", 2, 5]]) == 16  # JSON-round-tripped ops
    with pytest.raises(ValueError):
        apply_ops(1, [("sub", 2)])
    with pytest.raises(ValueError):
        apply_ops(1, [("pow", 2)])


def test_bad_arguments() -> None:
    assert make_arithmetic(0, seed=0) == []
    with pytest.raises(ValueError):
        make_arithmetic(5, seed=0, difficulty=5)
    with pytest.raises(ValueError):
        make_arithmetic(-1, seed=0)


def test_instruction_constant() -> None:
    assert ANSWER_INSTRUCTION == (
        "Write the final answer as 'Answer: <number>'."
    )
