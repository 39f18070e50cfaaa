"""Open any source ``datasets`` reads as named splits of records.

A source string is one of:

* a local file: ``.jsonl``, ``.json``, ``.parquet`` or ``.csv``. A file has no split names (one
  unnamed split, :data:`WHOLE`) unless it is a JSON object with a list per split
  (``{"train": [...], "test": [...]}``);
* a local directory that ``datasets.load_dataset(dir)`` reads: an ``imagefolder`` (images plus an
  optional ``metadata.jsonl``/``metadata.csv``), or a folder of parquet / JSON / CSV shards whose
  file or folder names say the split (``train-00000.parquet``, ``test/...``);
* a hub dataset id, with an optional config after ``:`` and split after ``@``:
  ``openai/gsm8k:main``, ``AI4Math/MathVista@testmini``, ``openai/gsm8k:main@test``.

Splits opened through ``datasets`` stay arrow-backed: a record is read only when it is indexed,
and :func:`undecoded` has its images come as encoded bytes. Every failure is a one-line :class:`~vlm_treegrpo.data.loaders.DataError`
naming the source (and the file, split or hub error). A hub id is loaded from the local cache
alone, at once, when the hub does not answer a single connection attempt (or ``HF_HUB_OFFLINE=1``),
rather than after ``datasets``' retries.
"""
from __future__ import annotations

import csv
import json
import os
import socket
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from vlm_treegrpo.data.loaders import DataError, _read_json, _read_jsonl, _read_parquet

__all__ = ["SourceSpec", "WHOLE", "hub_reachable", "open_splits", "parse_source", "undecoded"]

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
"""File endings read as one local file."""

WHOLE = ""
"""Split name of a file without named splits: the whole file."""

HUB_TIMEOUT_S = 5
"""Seconds the reachability probe of the hub waits; unreachable, a hub id loads from the local
cache only (no retries)."""


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source string."""

    path: str
    """Local file or directory, or hub dataset id."""
    config: str | None = None
    """Hub dataset config (``id:config``), else None."""
    split: str | None = None
    """Split named in the source (``id@split``), else None (the config's split field decides)."""
    local: bool = False
    """True for a local file or directory."""


def parse_source(source: str) -> SourceSpec:
    """Split ``source`` into path / hub id, config and split (see the module docstring).

    A path that exists, or that ends in a file suffix, is local (and is taken whole: no
    ``:config`` / ``@split`` parsing, so paths may hold those characters)."""
    text = str(source).strip()
    path = Path(os.path.expanduser(text))
    if path.exists() or text.lower().endswith(FILE_SUFFIXES) or text.startswith(("/", "./", "../", "~")):
        return SourceSpec(str(path), local=True)
    split = None
    if "@" in text:
        text, split = text.rsplit("@", 1)
        if not split:
            raise DataError(f"{source}: empty split after '@'")
    config = None
    if ":" in text:
        text, config = text.split(":", 1)
    return SourceSpec(text, config or None, split, local=False)


def _read_csv(path: Path) -> list[dict]:
    try:
        with path.open("r", encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read CSV ({type(e).__name__}: {e})") from e


def _open_file(path: Path) -> dict[str, Sequence[dict]]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return {WHOLE: _read_parquet(path)}
    if suffix == ".csv":
        return {WHOLE: _read_csv(path)}
    if suffix == ".json":
        named = _json_splits(path)
        if named is not None:
            return named
        return {WHOLE: _read_json(path, "train")}
    return {WHOLE: _read_jsonl(path)}


def _json_splits(path: Path) -> dict[str, list[dict]] | None:
    """The lists of a ``{"train": [...], "test": [...]}`` JSON file by split, else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    named = {k: v for k, v in data.items() if isinstance(v, list) and k != "data"}
    if not named:
        return None
    for name, rows in named.items():
        for i, rec in enumerate(rows):
            if not isinstance(rec, dict):
                raise DataError(f"{path}: split {name!r} item {i}: expected a JSON object, got {type(rec).__name__}")
    return named


def _first_line(e: BaseException, limit: int = 400) -> str:
    """``e`` as one line: its type and its message with line breaks and runs of spaces collapsed,
    cut at ``limit`` characters."""
    text = " ".join(str(e).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def hub_reachable(timeout_s: float = HUB_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout_s`` (True behind a
    proxy, which this cannot probe): one try, no retries."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout_s).close()
        return True
    except OSError:
        return False


@contextmanager
def _offline():
    """``datasets`` and ``huggingface_hub`` in offline mode (the local cache only) inside the block."""
    import datasets.config
    from huggingface_hub import constants

    saved = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _load_dataset(source: str, *args, offline: bool = False) -> dict[str, Sequence[dict]]:
    """``datasets.load_dataset(*args)`` as ``{split: Dataset}`` (from the local cache only when
    ``offline``); any failure is one DataError naming ``source``."""
    import datasets

    try:
        with _offline() if offline else nullcontext():
            loaded = datasets.load_dataset(*args)
    except Exception as e:  # datasets / huggingface_hub / requests / pyarrow raise many types
        reason = _hint(e)
        if offline:
            reason = f"{_first_line(e)}; the hub cannot be reached and the dataset is not in the local cache"
        raise DataError(f"{source}: cannot load ({reason})") from e
    if isinstance(loaded, dict):  # DatasetDict
        return dict(loaded)
    return {WHOLE: loaded}


def _hint(e: BaseException) -> str:
    """The reason of a ``load_dataset`` failure (and of the error behind it, which a generic
    ``DatasetGenerationError`` hides), with what to do where that is known."""
    reason = _first_line(e)
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).strip() and str(cause) not in str(e):
        reason = f"{reason}: {_first_line(cause, 300)}"
    name = type(e).__name__
    if name in ("OfflineModeIsEnabled", "ConnectionError", "ConnectTimeout", "ReadTimeout", "LocalEntryNotFoundError") \
            or "offline" in reason.lower() or "connection" in reason.lower():
        return f"{reason}; the hub cannot be reached and the dataset is not in the local cache"
    if name in ("DatasetNotFoundError", "RepositoryNotFoundError", "FileNotFoundError"):
        return f"{reason}; check the id, or log in for a gated dataset"
    return reason


def open_splits(spec: SourceSpec, source: str) -> dict[str, Sequence[dict]]:
    """The splits of ``spec`` by name (``{WHOLE: rows}`` for a file without named splits).

    Rows are dicts; a list for a local file, an arrow-backed ``datasets.Dataset`` (records
    decoded when indexed) for a directory or a hub id. ``source`` names the source in errors."""
    if spec.local:
        path = Path(spec.path)
        if path.is_dir():
            return _load_dataset(source, str(path))
        return _open_file(path)
    try:
        return _load_dataset(source, spec.path, spec.config, offline=not hub_reachable())
    except DataError as e:
        top = Path(spec.path.split("/")[0])
        if top.is_dir():  # (most likely a local path with a typo, read as a hub id)
            raise DataError(f"{e}; nor is there a local file or folder {spec.path} (in {top.resolve()})") from e
        raise


def undecoded(rows: Sequence[dict]) -> Sequence[dict]:
    """``rows`` with every image column of a ``datasets.Dataset`` (an ``Image`` feature, or a
    list of them) cast to give ``{"bytes", "path"}`` instead of a decoded image; other rows as
    they are. Indexing a record then decodes no pixels."""
    features = getattr(rows, "features", None)
    if features is None:
        return rows
    import datasets

    for name, feature in features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            rows = rows.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.List, datasets.Sequence, datasets.LargeList, list)):
            inner = feature[0] if isinstance(feature, list) else feature.feature
            if isinstance(inner, datasets.Image) and inner.decode:
                rows = rows.cast_column(name, type(feature)(datasets.Image(decode=False)) if not isinstance(feature, list)
                                        else [datasets.Image(decode=False)])
    return rows
