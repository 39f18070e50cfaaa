"""Load GSM8K- and MATH-style records from local files or the Hugging Face hub.

Records are plain dicts; a format converter (:data:`FORMATS`) turns each one into
an :class:`~vlm_treegrpo.data.types.Example`.  A record that lacks what the
converter needs raises :class:`DataError` naming the record index, e.g.
``DataError("record 7: missing field 'answer'")``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from vlm_treegrpo.data.types import Example

__all__ = [
    "DataError",
    "FORMATS",
    "from_gsm8k_record",
    "from_math_record",
    "last_boxed",
    "load_examples",
    "load_records",
]

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
"""File endings that :func:`load_records` reads as local files."""

_MATH_META_KEYS = ("level", "type", "subject", "unique_id")


class DataError(ValueError):
    """A record or file that cannot be turned into examples."""


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` in ``text`` (balanced braces), or ``None``.

    Nested braces are handled (``\boxed{\frac{1}{2}}`` gives ``\frac{1}{2}``) and
    escaped braces ``\{``/``\}`` do not count towards the balance.  The brace-less
    form ``\boxed 5`` gives ``5``.  An unterminated last box is ignored in favour of
    the previous complete one.
    """
    if not text:
        return None
    key = "\\boxed"
    pos = text.rfind(key)
    while pos != -1:
        content = _boxed_at(text, pos + len(key))
        if content is not None:
            return content
        pos = text.rfind(key, 0, pos)
    return None


def _boxed_at(text: str, i: int) -> str | None:
    """Parse the argument of a ``\\boxed`` whose name ends just before index ``i``."""
    n = len(text)
    if i < n and text[i] == "{":
        depth, j = 0, i
        while j < n:
            ch = text[j]
            if ch == "\\":
                j += 2  # skip the escaped character (\{, \}, \\)
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
            j += 1
        return None
    if i < n and text[i] == " ":
        # "\boxed 5": the argument runs to the next whitespace or '$'.
        j = i
        while j < n and text[j] == " ":
            j += 1
        k = j
        while k < n and not text[k].isspace() and text[k] != "$":
            k += 1
        return text[j:k] if k > j else None
    return None  # e.g. "\boxedfoo": not a box


def _require_str(rec: dict, key: str, index: int) -> str:
    """``rec[key]`` as a non-empty stripped string, else DataError naming the field."""
    if not isinstance(rec, dict):
        raise DataError(f"record {index}: expected a dict, got {type(rec).__name__}")
    if key not in rec or rec[key] is None:
        raise DataError(f"record {index}: missing field {key!r}")
    value = rec[key]
    if not isinstance(value, str):
        value = str(value)
    value = value.strip()
    if not value:
        raise DataError(f"record {index}: empty field {key!r}")
    return value


IMAGE_FIELDS = ("decoded_image", "images", "image")
"""Fields that hold a record's images (``data.format=visual``)."""


def _no_images(rec: dict, index: int) -> None:
    """A text format must not drop a record's images silently: DataError naming the field."""
    for key in IMAGE_FIELDS:
        if isinstance(rec, dict) and rec.get(key) not in (None, [], (), ""):
            raise DataError(f"record {index}: has images (field {key!r}) that a text format would drop; "
                            "read it with data.format=visual and a vision-language model")


def from_gsm8k_record(rec: dict, index: int) -> Example:
    """Convert a GSM8K record (``question``, ``answer`` ending in ``#### N``).

    The final answer is the text after the last ``####`` with commas removed.
    """
    _no_images(rec, index)
    question = _require_str(rec, "question", index)
    solution = _require_str(rec, "answer", index)
    if "####" not in solution:
        raise DataError(f"record {index}: field 'answer' has no '#### <answer>' marker")
    final = solution.rsplit("####", 1)[1].strip().replace(",", "")
    final = final.splitlines()[0].strip() if final else ""
    if not final:
        raise DataError(f"record {index}: field 'answer' has an empty '####' answer")
    return Example(prompt=question, answer=final, meta={"source": "gsm8k", "index": index})


def from_math_record(rec: dict, index: int) -> Example:
    r"""Convert a MATH record (``problem``, or ``question`` when there is no ``problem``;
    ``solution``; optional ``answer``).

    An explicit non-empty ``answer`` field wins; otherwise the answer is the content
    of the last ``\boxed{...}`` in ``solution``.
    """
    _no_images(rec, index)
    key = "question" if isinstance(rec, dict) and "problem" not in rec and "question" in rec else "problem"
    problem = _require_str(rec, key, index)
    explicit = rec.get("answer")
    if explicit is not None and str(explicit).strip():
        final = str(explicit).strip()
    else:
        solution = _require_str(rec, "solution", index)
        boxed = last_boxed(solution)
        if boxed is None or not boxed.strip():
            raise DataError(f"record {index}: field 'solution' has no \\boxed{{...}} answer")
        final = boxed.strip()
    meta: dict[str, Any] = {"source": "math", "index": index}
    for key in _MATH_META_KEYS:
        if key in rec and rec[key] is not None:
            meta[key] = rec[key]
    return Example(prompt=problem, answer=final, meta=meta)


FORMATS: dict[str, Callable[[dict, int], Example]] = {
    "gsm8k": from_gsm8k_record,
    "math": from_math_record,
}
"""Record converters by format name (used by :func:`load_examples`)."""


def _read_jsonl(path: Path) -> list[dict]:
    """One JSON object per non-blank line; a bad line raises DataError with its number."""
    records: list[dict] = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: malformed JSON ({e.msg})") from e
            if not isinstance(rec, dict):
                raise DataError(
                    f"{path}: line {lineno}: expected a JSON object, got {type(rec).__name__}"
                )
            records.append(rec)
    return records


def _read_json(path: Path, split: str) -> list[dict]:
    """A JSON array of objects, ``{split: [...]}`` / ``{"data": [...]}``, or JSON lines."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)  # many ".json" files on the hub are JSON lines
    if isinstance(data, dict):
        for key in (split, "data"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            raise DataError(
                f"{path}: expected a list of records or a dict with a {split!r} or 'data' list"
            )
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: item {i}: expected a JSON object, got {type(rec).__name__}")
    return data


def _read_parquet(path: Path) -> list[dict]:
    """All rows of a parquet file as dicts (via pyarrow, which ``datasets`` depends on)."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises a variety of types on corrupt files
        raise DataError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from e


def load_records(source: str, split: str = "train", name: str | None = None) -> list[dict]:
    """Read raw records from a local ``.jsonl``/``.json``/``.parquet`` file or a hub dataset.

    A ``source`` ending in one of those suffixes (or naming an existing file) is read
    locally; ``split`` is only used to pick a key of a dict-shaped ``.json`` file.
    Anything else is a Hugging Face dataset id passed to
    ``datasets.load_dataset(source, name, split=split)`` (needs network or a
    cache); ``"openai/gsm8k:main"`` is shorthand for ``name="main"``.
    """
    source = str(source)
    path = Path(os.path.expanduser(source))
    if source.lower().endswith(LOCAL_SUFFIXES) or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {source}")
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return _read_parquet(path)
        if suffix == ".json":
            return _read_json(path, split)
        return _read_jsonl(path)

    import datasets

    if name is None and ":" in source:
        source, name = source.split(":", 1)
    ds = datasets.load_dataset(source, name, split=split)
    return [dict(rec) for rec in ds]


def load_examples(
    source: str,
    format: str,
    split: str = "train",
    limit: int | None = None,
    skip_bad: bool = False,
) -> tuple[list[Example], int]:
    """Load records from ``source`` and convert them with ``FORMATS[format]``.

    Returns ``(examples, n_skipped)``.  With ``skip_bad=False`` the first bad record's
    :class:`DataError` propagates; with ``skip_bad=True`` bad records are skipped and
    counted.  ``limit`` caps the number of examples returned (records after the
    limit is reached are neither converted nor counted).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; expected one of {sorted(FORMATS)}")
    return convert_records(load_records(source, split=split), FORMATS[format], limit, skip_bad)


def convert_records(
    records: list[dict],
    convert: Callable[[dict, int], Example],
    limit: int | None = None,
    skip_bad: bool = False,
) -> tuple[list[Example], int]:
    """Convert records with ``convert(rec, index)``; returns ``(examples, n_skipped)``.

    With ``skip_bad=False`` the first bad record's :class:`DataError` propagates; with
    ``skip_bad=True`` bad records are skipped and counted. ``limit`` caps the number of
    examples (records after it are neither converted nor counted).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    examples: list[Example] = []
    n_skipped = 0
    for index, rec in enumerate(records):
        if limit is not None and len(examples) >= limit:
            break
        try:
            examples.append(convert(rec, index))
        except DataError:
            if not skip_bad:
                raise
            n_skipped += 1
    return examples, n_skipped
