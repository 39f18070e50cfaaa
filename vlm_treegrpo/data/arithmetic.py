"""Seeded synthetic arithmetic word problems: a small, verifiable task for smoke runs.

Each problem starts with a person owning some objects and then applies ``difficulty``
operations to that count (buy more, give away, double, buy
packs of M, ...).  The answer is computed exactly while the text is built, and
every intermediate count stays a non-negative integer.

The operations are kept in ``Example.meta`` so the answer can be recomputed::

    meta = {"source": "arithmetic", "difficulty": d, "index": i,
            "start": 3, "ops": [("add", 4), ("sub", 2)]}

Operation kinds in ``meta["ops"]``:

* ``("add", n)``: count += n
* ``("sub", n)``: count -= n (only drawn when n <= count)
* ``("mul", k)``: count *= k ("twice as many", "triples", "k times as many")
* ``("packs", n, m)``: count += n * m ("buys n packs of m")

The prompt text is only the problem; :data:`ANSWER_INSTRUCTION` is appended by
whoever builds the chat message.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from vlm_treegrpo.data.drawing import draw_distinct, stream_rng
from vlm_treegrpo.data.types import Example

__all__ = [
    "ANSWER_INSTRUCTION",
    "DIFFICULTIES",
    "apply_ops",
    "arithmetic_splits",
    "make_arithmetic",
]

ANSWER_INSTRUCTION = "Write the final answer as 'Answer: <number>'."


@dataclass(frozen=True)
class _Level:
    """Knobs for one difficulty level."""

    max_num: int
    """Largest operand for start / add / subtract."""
    max_mult: int
    """Largest multiplier for "k times as many"."""
    max_packs: int
    """Largest number of packs bought at once."""
    max_pack_size: int
    """Largest number of objects per pack."""
    need_mult: bool
    """Whether at least one multiplicative step (mul / packs) is guaranteed."""
    n_ops: int
    """Operations in a problem."""
    kinds: tuple[str, ...] = ("add", "sub", "mul", "packs")
    """Operation kinds that may be drawn."""


DIFFICULTIES: dict[int, _Level] = {
    1: _Level(max_num=9, max_mult=2, max_packs=3, max_pack_size=9, need_mult=False, n_ops=1, kinds=("add", "sub")),
    2: _Level(max_num=9, max_mult=2, max_packs=3, max_pack_size=9, need_mult=False, n_ops=2),
    3: _Level(max_num=20, max_mult=3, max_packs=4, max_pack_size=10, need_mult=False, n_ops=3),
    4: _Level(max_num=50, max_mult=5, max_packs=5, max_pack_size=12, need_mult=True, n_ops=4),
}
"""Supported difficulty levels; a level-d problem has d operations.

Level 1 (one addition or subtraction, numbers up to 9) is the default: SmolLM2-135M-Instruct
solves about a quarter of it greedily, which leaves room to learn. It solves about 5% of
level 2 (two steps), so the multi-step levels are for larger models."""

_MUL_CAP = 200
"""Multiplication is not drawn once the running count exceeds this (keeps answers readable)."""

_PEOPLE: tuple[tuple[str, str], ...] = (
    ("Tom", "he"), ("Anna", "she"), ("Liam", "he"), ("Maya", "she"), ("Omar", "he"),
    ("Sofia", "she"), ("Ben", "he"), ("Priya", "she"), ("Lucas", "he"), ("Emma", "she"),
    ("Kenji", "he"), ("Zara", "she"), ("Diego", "he"), ("Chloe", "she"), ("Noah", "he"),
    ("Aisha", "she"), ("Felix", "he"), ("Nina", "she"), ("Sam", "he"), ("Lena", "she"),
)

_OBJECTS: tuple[tuple[str, str], ...] = (
    ("apple", "apples"), ("coin", "coins"), ("marble", "marbles"), ("book", "books"),
    ("sticker", "stickers"), ("pencil", "pencils"), ("card", "cards"), ("shell", "shells"),
    ("stamp", "stamps"), ("cookie", "cookies"), ("balloon", "balloons"), ("toy car", "toy cars"),
)

# Templates. Placeholders: {He} subject pronoun, {him} object pronoun, {his} possessive,
# {name}, {friend}, {n}/{m}/{k} numbers, {N_obj} "n apples" with agreement,
# {M_obj} "m apples", {objs} plural noun, {more} "n more apples".
_ADD = (
    "{He} buys {more}.",
    "{He} finds {more}.",
    "{friend} gives {him} {N_obj}.",
    "{He} receives {N_obj} as a gift.",
    "{He} wins {N_obj} at a fair.",
)
_SUB = (
    "{He} gives {N_obj} away.",
    "{He} gives {N_obj} to {friend}.",
    "{He} loses {N_obj}.",
    "{He} sells {N_obj}.",
    "{He} trades away {N_obj}.",
)
_MUL2 = (
    "{friend} gives {him} enough {objs} that {he} now has twice as many as before.",
    "The number of {objs} {he} has doubles.",
    "{He} collects more until {he} has twice as many {objs} as before.",
)
_MUL3 = (
    "The number of {objs} {he} has triples.",
    "{He} collects more until {he} has three times as many {objs} as before.",
)
_MULK = (
    "{He} collects more until {he} has {k} times as many {objs} as before.",
    "The number of {objs} {he} has becomes {k} times as large.",
)
_PACKS = (
    "{He} buys {n} packs of {M_obj}.",
    "{He} buys {n} boxes with {M_obj} in each.",
    "{He} gets {n} bags, each holding {M_obj}.",
)
_CONNECTORS = ("", "Then ", "After that, ", "Next, ", "Later, ")
_QUESTIONS = (
    "How many {objs} does {name} have now?",
    "How many {objs} does {name} have at the end?",
    "How many {objs} does {name} end up with?",
)
_PRONOUNS = {"he": ("he", "him", "his"), "she": ("she", "her", "her")}


def apply_ops(start: int, ops: list | tuple) -> int:
    """Recompute a problem's answer from ``meta["start"]`` and ``meta["ops"]``.

    Raises ``ValueError`` on an unknown operation or a negative intermediate count.
    """
    value = int(start)
    for op in ops:
        kind = op[0]
        if kind == "add":
            value += int(op[1])
        elif kind == "sub":
            value -= int(op[1])
        elif kind == "mul":
            value *= int(op[1])
        elif kind == "packs":
            value += int(op[1]) * int(op[2])
        else:
            raise ValueError(f"unknown arithmetic op {op!r}")
        if value < 0:
            raise ValueError(f"negative intermediate count after op {op!r}")
    return value


def _count(n: int, obj: tuple[str, str]) -> str:
    """``"1 apple"`` / ``"3 apples"``."""
    return f"{n} {obj[0] if n == 1 else obj[1]}"


def _draw_op(rng: random.Random, value: int, level: _Level, force_mult: bool) -> tuple:
    """Draw one operation that keeps the count a non-negative integer."""
    kinds = ["add", "sub", "mul", "packs"]
    weights = [3.0, 3.0 if value > 0 else 0.0, 1.0 if 0 < value <= _MUL_CAP else 0.0, 1.0]
    if force_mult:
        weights = [0.0, 0.0, weights[2], 1.0]
    weights = [w if k in level.kinds else 0.0 for k, w in zip(kinds, weights)]
    kind = rng.choices(kinds, weights=weights)[0]
    if kind == "add":
        return ("add", rng.randint(1, level.max_num))
    if kind == "sub":
        return ("sub", rng.randint(1, min(level.max_num, value)))
    if kind == "mul":
        return ("mul", rng.randint(2, level.max_mult))
    return ("packs", rng.randint(2, level.max_packs), rng.randint(2, level.max_pack_size))


def _render_op(rng: random.Random, op: tuple, fmt: dict[str, str], obj: tuple[str, str]) -> str:
    """Turn one operation into a sentence (capitalised, without connector)."""
    kind = op[0]
    if kind == "add":
        template = rng.choice(_ADD)
        values = {"N_obj": _count(op[1], obj), "more": f"{op[1]} more {obj[0] if op[1] == 1 else obj[1]}"}
    elif kind == "sub":
        template = rng.choice(_SUB)
        values = {"N_obj": _count(op[1], obj)}
    elif kind == "mul":
        template = rng.choice(_MUL2 if op[1] == 2 else _MUL3 if op[1] == 3 else _MULK)
        values = {"k": str(op[1])}
    else:
        template = rng.choice(_PACKS)
        values = {"n": str(op[1]), "M_obj": _count(op[2], obj)}
    return template.format(**fmt, **values)


def _one_problem(rng: random.Random, difficulty: int) -> tuple[str, int, int, list[tuple]]:
    """Draw one problem: (prompt, answer, start, ops)."""
    level = DIFFICULTIES[difficulty]
    n_ops = level.n_ops
    name, gender = rng.choice(_PEOPLE)
    friend = rng.choice([p for p, _ in _PEOPLE if p != name])
    obj = rng.choice(_OBJECTS)
    he, him, his = _PRONOUNS[gender]
    fmt = {
        "He": he.capitalize(), "he": he, "him": him, "his": his,
        "name": name, "friend": friend, "objs": obj[1],
    }

    start = rng.randint(1, level.max_num)
    value = start
    ops: list[tuple] = []
    mult_slot = rng.randrange(n_ops) if level.need_mult else -1
    for step in range(n_ops):
        force = step == mult_slot and not any(o[0] in ("mul", "packs") for o in ops)
        op = _draw_op(rng, value, level, force)
        ops.append(op)
        value = apply_ops(value, [op])

    sentences = [f"{name} has {_count(start, obj)}."]
    for step, op in enumerate(ops):
        sentence = _render_op(rng, op, fmt, obj)
        connector = "" if step == 0 else rng.choice(_CONNECTORS)
        if connector and not sentence.startswith((name, friend)):
            sentence = sentence[0].lower() + sentence[1:]
        sentences.append(connector + sentence)
    sentences.append(rng.choice(_QUESTIONS).format(**fmt))
    return " ".join(sentences), value, start, ops


def _generate(
    n: int, rng: random.Random, difficulty: int, exclude: set[str] | frozenset[str] = frozenset()
) -> list[Example]:
    """Draw ``n`` problems with distinct prompts, none of them in ``exclude``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")

    def draw(index: int) -> Example:
        prompt, answer, start, ops = _one_problem(rng, difficulty)
        meta = {"source": "arithmetic", "difficulty": difficulty, "index": index, "start": start, "ops": ops}
        return Example(prompt=prompt, answer=str(answer), meta=meta)

    return draw_distinct(n, draw, lambda ex: ex.prompt, exclude, f"arithmetic problems at difficulty {difficulty}")


def make_arithmetic(n: int, seed: int, difficulty: int = 1) -> list[Example]:
    """Return ``n`` distinct arithmetic word problems; same arguments give the same list.

    ``difficulty`` 1, 2, 3, 4 gives 1, 2, 3, 4 operations with operands up to 9, 9, 20, 50
    (level 1 only adds or subtracts; level 4 always contains a multiplication).  Answers are non-negative integers.
    """
    return _generate(n, stream_rng("arithmetic", seed, "train"), difficulty)


def arithmetic_splits(
    n_train: int, n_test: int, seed: int, difficulty: int = 1
) -> tuple[list[Example], list[Example]]:
    """Train and test problem lists with no prompt in common.

    ``train`` equals ``make_arithmetic(n_train, seed, difficulty)``; ``test`` is drawn
    from a separate seed stream and skips any prompt that is in ``train``.
    """
    train = make_arithmetic(n_train, seed, difficulty)
    test = _generate(
        n_test,
        stream_rng("arithmetic", seed, "test"),
        difficulty,
        exclude={ex.prompt for ex in train},
    )
    return train, test
