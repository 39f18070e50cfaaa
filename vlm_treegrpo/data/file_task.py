"""Train and test examples from a file, a folder or a hub dataset (any source of
:mod:`vlm_treegrpo.data.splits`), with named splits, column mapping and format detection.

Evaluation never sees a training record: the test examples come from ``test_source`` (its
``test_split``, or its only split), else from the source's own ``test_split``, else from a
seeded held-out part of the training split (``test_fraction`` of its records), whose indices
:class:`RecordsTask` keeps so the trainer can say which records were held out.
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vlm_treegrpo.data.columns import check_columns, detect_format, remap, unused_fields
from vlm_treegrpo.data.loaders import DataError, from_gsm8k_record, from_math_record
from vlm_treegrpo.data.splits import WHOLE, SourceSpec, open_splits, parse_source, undecoded
from vlm_treegrpo.data.types import Example
from vlm_treegrpo.data.visual_loaders import from_visual_record

__all__ = ["RecordsTask", "hold_out", "load_records_task"]


@dataclass
class RecordsTask:
    """What :func:`load_records_task` read."""

    train: list[Example]
    """Training examples (at most ``n_train``, 0 = all)."""
    test: list[Example]
    """Evaluation examples (at most ``n_test``), none of them a training record."""
    format: str
    """The record format used (``format`` itself, or the one ``auto`` detected)."""
    skipped: int = 0
    """Bad records skipped (``skip_bad``)."""
    held_out: list[int] = field(default_factory=list)
    """Indices (in the training split) of the records held out for evaluation; [] when the
    test examples come from a split or source of their own."""
    note: str = ""
    """One line saying where the test examples come from when they were held out."""


def hold_out(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of ``range(n)`` into (training, held-out) indices, both ascending:
    ``max(1, round(fraction * n))`` held out, the same for the same arguments."""
    n_out = max(1, round(fraction * n))
    if n - n_out < 1:
        raise DataError(f"{n} records are too few to hold out {n_out} for evaluation and train on the rest")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[n_out:]), sorted(order[:n_out])


def _columns_of(rows: Sequence[dict]) -> list[str]:
    """Column names of a split (a ``datasets.Dataset``'s, else the keys of its first records)."""
    names = getattr(rows, "column_names", None)
    if names is not None:
        return list(names)
    seen: dict[str, None] = {}
    for rec in list(rows[:50]) if isinstance(rows, list) else []:
        if isinstance(rec, Mapping):
            seen.update(dict.fromkeys(rec))
    return list(seen)


def _pick(splits: dict, name: str, source: str, only_if_single: bool) -> Sequence[dict]:
    """Split ``name`` of ``splits`` (the whole file for a file without named splits; the only
    split when ``only_if_single``), else DataError naming the splits there are."""
    if WHOLE in splits:
        return splits[WHOLE]
    if name in splits:
        return splits[name]
    if only_if_single and len(splits) == 1:
        return next(iter(splits.values()))
    raise DataError(f"{source}: no split {name!r}; its splits are {sorted(splits)} "
                    f"(name one with data.train_split / data.test_split or '<id>@<split>')")


def _converter(format: str, spec: SourceSpec) -> Callable[[dict, int], Example]:
    if format == "visual":  # (images checked now, decoded when their prompt is encoded)
        base = Path(spec.path).parent if spec.local and Path(spec.path).is_file() else None
        return lambda rec, index: from_visual_record(rec, index, base, lazy=True)
    return {"gsm8k": from_gsm8k_record, "math": from_math_record}[format]


def _convert(rows: Sequence[dict], indices: Sequence[int], limit: int | None, skip_bad: bool, convert,
             columns: Mapping[str, str], format: str, source: str, found: list[str]) -> tuple[list[Example], int]:
    """Convert ``rows[i]`` for ``i`` in ``indices`` (records read only as they are converted) up
    to ``limit`` examples; bad records skipped and counted under ``skip_bad``, else a DataError
    naming the source, the record and the columns found."""
    out: list[Example] = []
    skipped = 0
    for i in indices:
        if limit is not None and len(out) >= limit:
            break
        try:
            try:
                rec = rows[i]
            except Exception as e:  # a datasets row whose image (or other feature) cannot be decoded
                raise DataError(f"record {i}: cannot read ({type(e).__name__}: {e})") from e
            out.append(convert(remap(rec, columns, format), i))
        except DataError as e:
            if skip_bad:
                skipped += 1
                continue
            raise DataError(f"{source}: {e} (read as data.format={format}; its columns are {found}; "
                            "map them with data.columns or set data.format)") from e
    return out, skipped


def load_records_task(source: str, format: str, n_train: int, n_test: int, seed: int, test_source: str = "",
                      skip_bad: bool = False, train_split: str = "train", test_split: str = "test",
                      columns: Mapping[str, str] | None = None, test_fraction: float = 0.1) -> RecordsTask:
    """Training and test examples of ``source`` (see the module docstring); ``format`` is
    ``gsm8k``, ``math``, ``visual`` or ``auto``; ``columns`` maps fields to columns
    (:mod:`vlm_treegrpo.data.columns`). Every failure is one DataError naming the source."""
    columns = dict(columns or {})
    spec = parse_source(source)
    splits = {name: undecoded(rows) for name, rows in open_splits(spec, source).items()}
    train_name = spec.split or train_split
    rows = _pick(splits, train_name, source, only_if_single=False)
    found = _columns_of(rows)
    check_columns(columns, found, source)
    if len(rows) == 0:
        raise DataError(f"{source}: the split {train_name!r} has no records")
    if format == "auto":
        format = detect_format(found, columns, _first(rows, source), source)
    unused = unused_fields(columns, format)
    if unused:
        raise DataError(f"data.columns.{unused[0]}: the {format} format reads no {unused[0]!r} field")
    convert = _converter(format, spec)
    train_idx: Sequence[int] = range(len(rows))
    held: list[int] = []
    note = ""
    if test_source:
        tspec = parse_source(test_source)
        test_splits = {name: undecoded(rows) for name, rows in open_splits(tspec, test_source).items()}
        test_rows = _pick(test_splits, tspec.split or test_split, test_source, only_if_single=True)
        test_found = _columns_of(test_rows)
        check_columns(columns, test_found, test_source)
        test_idx: Sequence[int] = range(len(test_rows))
        test_convert, test_name = _converter(format, tspec), test_source
    elif test_split != train_name and test_split in splits:
        test_rows, test_found, test_idx = splits[test_split], _columns_of(splits[test_split]), range(len(splits[test_split]))
        test_convert, test_name = convert, f"{source}@{test_split}"
    else:
        try:
            train_idx, held = hold_out(len(rows), test_fraction, seed)
        except DataError as e:
            raise DataError(f"{source}: {e}") from e
        test_rows, test_found, test_idx, test_convert, test_name = rows, found, held, convert, source
        shown = ", ".join(map(str, held[:20])) + (", ..." if len(held) > 20 else "")
        note = (f"{source}: no {test_split!r} split or data.test_source, so {len(held)} of its {len(rows)} records "
                f"(data.test_fraction={test_fraction}, data.seed={seed}) are held out and never trained on: "
                f"records {shown}")
    train, skipped = _convert(rows, train_idx, n_train or None, skip_bad, convert, columns, format, source, found)
    test, skipped_test = _convert(test_rows, test_idx, n_test, skip_bad, test_convert, columns, format, test_name, test_found)
    if not train:
        raise DataError(f"{source}: no usable training records ({skipped} skipped)")
    return RecordsTask(train, test, format, skipped + skipped_test, list(held), note)


def _first(rows: Sequence[dict], source: str) -> Mapping:
    try:
        rec = rows[0]
    except Exception as e:
        raise DataError(f"{source}: record 0: cannot read ({type(e).__name__}: {e})") from e
    if not isinstance(rec, Mapping):
        raise DataError(f"{source}: record 0: expected a dict, got {type(rec).__name__}")
    return rec
