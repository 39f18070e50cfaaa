"""The checkpoint directory protocol: a checkpoint is either whole or ignored, whatever kills the
writer and whenever.

What goes inside is the caller's (a ``payload(dir)`` callable writes its files: the trainer's
``torch.save`` files, or a sharded writer's); the protocol is the same for any payload:

1. ``<run>/checkpoint.tmp-<id>/``: a fresh directory, the payload written into it, every file
   and the directory fsynced;
2. ``meta.json``, the commit marker, written last and atomically (``meta.json.part``, fsync,
   rename): it lists every payload file with its size;
3. the committed directory swapped in by renames: the current ``checkpoint/`` becomes
   ``checkpoint-<step>/``, the new one becomes ``checkpoint/``, the run directory fsynced;
4. the ``checkpoint-<step>/`` beyond ``keep`` and any leftover temporary directory are first
   renamed to ``*.trash-<id>`` (atomically out of the finder's sight) and only then deleted, so a
   kill while deleting never leaves a directory that looks whole but is not.

:func:`find` reads every candidate (``checkpoint``, ``checkpoint-<step>``, ``checkpoint.tmp*``,
and the older ``checkpoint.old``), skips with a warning any whose ``meta.json`` is missing,
unreadable or lists a file that is absent or of another size, and returns the newest whole one.

Before writing, free space is checked against the size of the last checkpoint; a write that
fails for lack of space raises :class:`DiskFull` (one line saying so) after removing its partial
directory, and the previous checkpoint is untouched.

``fault`` is the seam for fault-injection tests: called with the name of each point of the
protocol (:data:`POINTS`) before it runs. ``VLM_TREEGRPO_KILL_AT=<point>[:<n>]`` in the
environment kills the process with SIGKILL the n-th time it gets there (:func:`fault_from_env`),
to test the real thing. ``free`` (default :func:`disk_free`, looked up at each call) tells the
free bytes.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import uuid
import warnings
from pathlib import Path
from typing import Callable

DIR = "checkpoint"
META = "meta.json"
TMP_PREFIX = f"{DIR}.tmp"
TRASH = ".trash-"
KEPT = re.compile(rf"^{DIR}-(\d+)$")
LEGACY = (f"{DIR}.tmp", f"{DIR}.old")
"""Names of the older two-directory swap; still read by :func:`find`."""

POINTS = ("start", "payload", "fsync_files", "meta_part", "meta_rename", "fsync_dir", "retire_current", "rename_new",
          "fsync_run", "prune")
"""The points of :func:`write` at which ``fault`` is called, in order."""

KILL_ENV = "VLM_TREEGRPO_KILL_AT"
SPACE_MARGIN = 1.05
"""Free space asked for before a write: this times the size of the last checkpoint."""
FULL_BELOW = 16 << 20
"""A write that fails with less than this many bytes free failed for lack of space."""

Fault = Callable[[str], None]


class DiskFull(OSError):
    """A checkpoint could not be written for lack of disk space (the previous one is kept)."""


class CheckpointWarning(UserWarning):
    """A checkpoint directory that :func:`find` skipped."""


def fault_from_env() -> Fault | None:
    """The fault of ``VLM_TREEGRPO_KILL_AT=<point>[:<n>]``: SIGKILL this process the ``n``-th
    time (default the first) it reaches ``<point>``."""
    point, _, nth = os.environ.get(KILL_ENV, "").partition(":")
    if not point:
        return None
    seen = {"n": 0}

    def kill(at: str) -> None:
        if at == point:
            seen["n"] += 1
            if seen["n"] == (int(nth) if nth.isdigit() else 1):
                os.kill(os.getpid(), signal.SIGKILL)

    return kill


_ENV_FAULT = fault_from_env()
"""The environment's fault, read once (so its count runs over every checkpoint of the process)."""


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(root: Path) -> dict[str, int]:
    """Every file under ``root`` (relative POSIX path -> size in bytes), ``meta.json`` aside."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != META:
            out[path.relative_to(root).as_posix()] = path.stat().st_size
    return out


def _discard(path: Path) -> None:
    """Take ``path`` out of the finder's sight by one rename, then delete it."""
    if not path.exists():
        return
    trash = path.with_name(f"{path.name}{TRASH}{uuid.uuid4().hex[:8]}")
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def _no_space(err: BaseException, where: Path, free: Callable[[Path], int]) -> bool:
    """Whether ``err`` was a write that ran out of space (torch reports that as a RuntimeError
    about file positions, so the free space decides when errno does not say)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return free(where) < FULL_BELOW
    except OSError:
        return False


def disk_free(path: Path) -> int:
    """Bytes free on the file system holding ``path``."""
    return shutil.disk_usage(path).free


def tmp_dir(run: Path, step: int) -> Path:
    """Where step ``step``'s checkpoint is written before it is committed."""
    return run / f"{TMP_PREFIX}-{step}"


def prepare(run: Path, step: int, fault: Fault | None = None, free: Callable[[Path], int] | None = None) -> Path:
    """The fresh, empty temporary directory of step ``step``'s checkpoint (any leftover of an
    earlier try discarded), after checking that the last checkpoint's size is free. Under
    several processes, process 0 prepares, every process may write its files into it, and
    process 0 commits (:func:`commit`)."""
    hit = fault or _ENV_FAULT or (lambda point: None)
    free = free or disk_free
    run.mkdir(parents=True, exist_ok=True)
    hit("start")
    last = _last_bytes(run)
    if last and free(run) < SPACE_MARGIN * last:
        raise DiskFull(errno.ENOSPC, f"disk full: a checkpoint needs about {last / 2**20:.0f} MiB and {run} has "
                                     f"{free(run) / 2**20:.0f} MiB free; nothing was written, the previous checkpoint is kept")
    tmp = tmp_dir(run, step)
    _discard(tmp)
    tmp.mkdir()
    return tmp


def commit(run: Path, tmp: Path, step: int, meta: dict, payload: Callable[[Path], None] | None = None, keep: int = 1,
           fault: Fault | None = None, free: Callable[[Path], int] | None = None) -> Path:
    """Write ``payload(tmp)`` (when given), then commit ``tmp`` as the checkpoint of ``step``
    (steps 1-4 of the module docstring): ``meta`` is stored in ``meta.json`` with ``step``,
    ``files`` and ``bytes`` added. Keeps the ``keep`` newest checkpoints (``keep - 1`` older
    ones as ``checkpoint-<step>``). Raises :class:`DiskFull` when a write fails for lack of
    space, after discarding ``tmp``."""
    hit = fault or _ENV_FAULT or (lambda point: None)
    try:
        hit("payload")
        if payload is not None:
            payload(tmp)
        files = _files(tmp)
        hit("fsync_files")
        for name in files:
            _fsync_path(tmp / name)
        hit("meta_part")
        part = tmp / f"{META}.part"
        own = sum(size for name, size in files.items() if (tmp / name).stat().st_nlink == 1)  # (a hard link costs no space)
        with part.open("w") as f:
            json.dump({**meta, "step": step, "files": files, "bytes": own}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        hit("meta_rename")
        part.rename(tmp / META)
        hit("fsync_dir")
        _fsync_path(tmp)
    except Exception as err:
        full = _no_space(err, run, free or disk_free)
        _discard(tmp)
        if full:
            raise DiskFull(errno.ENOSPC, f"disk full: writing the checkpoint of step {step} in {run} failed "
                                         f"({type(err).__name__}: {' '.join(str(err).split())[:120]}); "
                                         "the previous checkpoint is kept") from err
        raise
    final = run / DIR
    hit("retire_current")
    if final.exists():
        old = read_whole(final)
        if old is None:  # (not a whole checkpoint: nothing worth keeping)
            _discard(final)
        else:
            _discard(run / f"{DIR}-{int(old['step'])}")  # (an older copy of the same step)
            final.rename(run / f"{DIR}-{int(old['step'])}")
    hit("rename_new")
    tmp.rename(final)
    hit("fsync_run")
    _fsync_path(run)
    hit("prune")
    prune(run, keep)
    return final


def write(run: Path, step: int, payload: Callable[[Path], None], meta: dict, keep: int = 1, fault: Fault | None = None,
          free: Callable[[Path], int] | None = None) -> Path:
    """:func:`prepare` then :func:`commit`: the one-process checkpoint."""
    tmp = prepare(run, step, fault, free)
    return commit(run, tmp, step, meta, payload, keep, fault, free)


def prune(run: Path, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints (``checkpoint`` is the newest; a whole temporary
    directory left by a kill counts as ``checkpoint-<step>``); delete the rest, and every
    incomplete temporary and trash directory."""
    for path in run.iterdir():
        if path.is_dir() and (path.name.startswith(TMP_PREFIX) or path.name == f"{DIR}.old") and TRASH not in path.name:
            meta = read_whole(path)
            target = run / f"{DIR}-{int(meta['step'])}" if meta is not None and "files" in meta else None
            if target is not None and not target.exists() and int(meta["step"]) < _step(run / DIR):
                path.rename(target)
            else:
                _discard(path)
    kept = sorted(((int(m.group(1)), p) for p in run.iterdir() if (m := KEPT.match(p.name)) and p.is_dir()), reverse=True)
    for _, path in kept[max(keep - 1, 0):]:
        _discard(path)
    for path in run.iterdir():
        if TRASH in path.name:
            shutil.rmtree(path, ignore_errors=True)


def _step(path: Path) -> int:
    meta = read_whole(path)
    return int(meta["step"]) if meta is not None else -1


def _last_bytes(run: Path) -> int:
    meta = read_whole(run / DIR)
    return int(meta.get("bytes", 0)) if meta else 0


def read_whole(path: Path, legacy_files: tuple[str, ...] = ()) -> dict | None:
    """``path``'s meta when it is a whole checkpoint, else None: ``meta.json`` parses, has a
    ``step``, and every file it lists is there with its size (a meta without a list, written
    before the protocol listed files, needs ``legacy_files``)."""
    try:
        meta = json.loads((path / META).read_text())
        int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    listed = meta.get("files")
    if listed is None:
        return meta if all((path / name).is_file() for name in legacy_files) else None
    for name, size in listed.items():
        try:
            if (path / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return meta


def candidates(run: Path) -> list[Path]:
    """Every directory of ``run`` that may hold a checkpoint."""
    if not run.is_dir():
        return []
    return sorted(p for p in run.iterdir() if p.is_dir() and TRASH not in p.name
                  and (p.name == DIR or KEPT.match(p.name) or p.name.startswith(TMP_PREFIX) or p.name in LEGACY))


def find(run: Path, legacy_files: tuple[str, ...] = ()) -> Path | None:
    """The newest whole checkpoint of ``run`` (``checkpoint`` on a tie), or None; warns
    (:class:`CheckpointWarning`) about each candidate it skips."""
    best, best_key = None, None
    for path in candidates(run):
        meta = read_whole(path, legacy_files)
        if meta is None:
            if path.name == DIR or KEPT.match(path.name) or (path / META).exists():
                warnings.warn(f"{path}: not a whole checkpoint (meta.json missing or unreadable, or a file it lists "
                              "missing or cut short); skipped", CheckpointWarning, stacklevel=2)
            continue
        key = (int(meta["step"]), path.name == DIR)
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best
