"""Where a thread spent a stretch of wall time, by sampling its Python stack (the bench's
``--sample-stacks``).

A step that takes ten times the median on a GPU leaves only its wall time behind: the device
could have been busy, the host could have been planning a kernel for a new shape, or waiting
on a lock. :class:`StackSampler` runs a daemon thread that every ``interval`` seconds reads the
watched thread's current frames (``sys._current_frames``) and counts where it was: the innermost
frames and the nearest frame of an *anchor* package (ours or TRL's), so a sample inside torch's
``scaled_dot_product_attention`` also says which of our lines called it. torch's Python bindings
release the GIL while an op runs, so the sampler sees a long C++ call at the Python line that
made it; a call that keeps the GIL shows up as missing samples (:attr:`StackSampler.coverage`).

Cost: one stack walk per sample (tens of microseconds) and, while the watched thread runs
Python, a GIL hand-over; at 10 ms that is well under 1% of a step.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType

ANCHORS = ("vlm_treegrpo", "trl")
"""Packages whose nearest frame each sample names beside the innermost ones."""


def _where(frame: FrameType) -> str:
    code = frame.f_code
    return f"{Path(code.co_filename).name}:{frame.f_lineno}:{code.co_name}"


def _package(frame: FrameType) -> str | None:
    parts = Path(frame.f_code.co_filename).parts
    return next((p for p in reversed(parts[:-1]) if p in ANCHORS), None)


def signature(frame: FrameType | None, inner: int = 2) -> str:
    """One sample's place: the ``inner`` innermost frames (``file:line:function``, innermost
    first) and, when none of them is in an :data:`ANCHORS` package, the nearest frame that is."""
    names, anchor = [], None
    while frame is not None:
        if len(names) < inner:
            names.append(_where(frame))
            if _package(frame):
                anchor = ""
        elif anchor is None and _package(frame):
            anchor = _where(frame)
        if len(names) >= inner and anchor is not None:
            break
        frame = frame.f_back
    return " < ".join(names + ([f"... < {anchor}"] if anchor else []))


class StackSampler:
    """Samples ``thread``'s stack (default: the one that makes the sampler) every ``interval``
    seconds while started. :meth:`take` returns what was counted since the last take and starts
    a new count, so a caller that takes once per step gets each step's own samples.

        with StackSampler(0.01) as sampler:
            for step in steps:
                sampler.take()
                run(step)
                places = sampler.take()  # this step's: {"samples": n, "top": [(place, share), ...]}
    """

    def __init__(self, interval: float = 0.01, thread: threading.Thread | None = None, top: int = 6):
        if interval <= 0:
            raise ValueError(f"StackSampler: interval must be > 0 seconds, got {interval}")
        self.interval, self.top = interval, top
        self.ident = (thread or threading.current_thread()).ident
        self._counts: Counter = Counter()
        self._t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self.ident)
            if frame is None:
                continue
            place = signature(frame)
            with self._lock:
                self._counts[place] += 1

    def __enter__(self) -> "StackSampler":
        self._stop.clear()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="vlm-treegrpo-stack-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def take(self) -> dict:
        """The samples since the last take: how many (``samples``), the share of the expected
        ones they are (``coverage``: below 1, the watched thread held the GIL, or the sampler was
        starved), and the ``top`` places with their share of the samples."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
            now, t0, self._t0 = time.perf_counter(), self._t0, time.perf_counter()
        n = sum(counts.values())
        expected = max(1.0, (now - t0) / self.interval)
        return {"samples": n, "coverage": round(min(1.0, n / expected), 3),
                "top": [[place, round(c / n, 3)] for place, c in counts.most_common(self.top)] if n else []}
