"""Column mapping and record-format detection for file and hub datasets.

``data.columns`` maps a field a format reads to the column of the user's data that holds it,
e.g. ``{question: problem, image: images, answer: solution}``. The fields:

* ``question``: the prompt (gsm8k ``question``, math ``problem``, visual ``question``);
* ``answer``: the reference answer (gsm8k: a solution ending in ``#### N``);
* ``solution``: a worked solution holding the answer (math ``\\boxed{}``, visual ``<answer>``);
* ``image``: one image or a list of images (visual);
* ``choices``: the options of a multiple-choice question (visual).

``format: auto`` tells the format from the columns: an image column makes it ``visual``, an
``answer`` holding ``####`` ``gsm8k``, a question with an answer or solution ``math``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from vlm_treegrpo.data.loaders import DataError

__all__ = ["ALIASES", "FIELDS", "FORMAT_FIELDS", "check_columns", "detect_format", "remap", "unused_fields"]

ALIASES: dict[str, tuple[str, ...]] = {
    "question": ("question", "problem"),
    "answer": ("answer",),
    "solution": ("solution",),
    "image": ("decoded_image", "images", "image"),
    "choices": ("choices",),
}
"""Column names each field is read from when ``data.columns`` does not map it."""

FIELDS = tuple(ALIASES)
"""Fields ``data.columns`` may map."""

FORMAT_FIELDS: dict[str, dict[str, str]] = {
    "gsm8k": {"question": "question", "answer": "answer"},
    "math": {"question": "problem", "answer": "answer", "solution": "solution"},
    "visual": {"question": "question", "answer": "answer", "solution": "solution", "image": "image", "choices": "choices"},
}
"""Per format: the record key its converter reads for each field it uses."""


def check_columns(columns: Mapping[str, str], found: Sequence[str], source: str) -> None:
    """Raise DataError when a mapped column is not among the columns ``found`` in ``source``."""
    for field_name, column in columns.items():
        if column not in found:
            raise DataError(f"{source}: data.columns.{field_name} names column {column!r}, "
                            f"which is not among its columns {list(found)}")


def detect_format(found: Sequence[str], columns: Mapping[str, str], first: Mapping | None, source: str) -> str:
    """The record format of a dataset with columns ``found`` under the mapping ``columns``
    (``first``: its first record, whose ``answer`` decides gsm8k against math)."""
    have = {f for f in FIELDS if f in columns or any(a in found for a in ALIASES[f])}
    if "image" in have and "question" in have:
        return "visual"
    if "question" in have and "answer" in have:
        answer_col = columns.get("answer", "answer")
        value = first.get(answer_col) if first is not None else None
        if isinstance(value, str) and "####" in value:
            return "gsm8k"
        return "math"
    if "question" in have and "solution" in have:
        return "math"
    raise DataError(f"{source}: cannot tell the record format from its columns {list(found)}; set data.format "
                    f"(gsm8k, math or visual) and map the columns with data.columns, e.g. "
                    f"{{question: <column>, answer: <column>, image: <column>}}")


def remap(rec: Mapping, columns: Mapping[str, str], format: str) -> dict:
    """``rec`` with each mapped column copied to the key ``format``'s converter reads; the
    columns a mapped field would otherwise be read from are dropped, so the mapped one is read."""
    if not columns:
        return dict(rec)
    keys = FORMAT_FIELDS[format]
    drop = {a for f in columns for a in ALIASES[f]}
    out = {k: v for k, v in rec.items() if k not in drop}
    for field_name, column in columns.items():
        out[keys[field_name]] = rec[column]
    return out


def unused_fields(columns: Mapping[str, str], format: str) -> list[str]:
    """Mapped fields that ``format`` does not read (e.g. ``image`` for gsm8k)."""
    return [f for f in columns if f not in FORMAT_FIELDS[format]]
