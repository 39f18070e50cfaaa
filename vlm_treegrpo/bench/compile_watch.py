"""What ``torch.compile`` did while decoding was compiled (``rollout.compile_decode``).

On the H200 (tenth session) compiled decoding sampled no faster than eager decoding, and the
bench kept no trace of why. :class:`CompileWatch` records, for the span of a ``with`` block,
the growth of torch's compile counters (graphs captured, recompiles, graph breaks, inductor's
``cudagraph_skips``) and the log lines in which torch says why it recompiled, broke a graph or
ran a graph without CUDA graphs, so that a benchmark's JSON carries the answer.
"""
from __future__ import annotations

import logging
from collections import deque

import torch

COUNTER_GROUPS = ("stats", "frames", "graph_break", "recompiles", "inductor")
"""The groups of ``torch._dynamo.utils.counters`` that are reported."""

LOG_ARTIFACTS = {"perf_hints": True, "recompiles": True, "graph_breaks": True, "cudagraphs": True}
"""Torch log artifacts turned on inside the block (``cudagraphs`` says why a graph ran without
CUDA graphs, and when one was recorded again)."""

FIRST_LINES, LAST_LINES = 20, 40
"""Log lines kept: the first ones (why the first graphs went as they did) and the last ones."""


def _counters() -> dict[str, dict[str, int]]:
    from torch._dynamo.utils import counters

    return {g: {str(k): int(v) for k, v in counters[g].items()} for g in COUNTER_GROUPS if g in counters}


def _torch_loggers() -> list[logging.Logger]:
    """Torch's top loggers: they do not propagate to ``torch``, so each gets the handler."""
    names = {"torch"}
    try:
        from torch._logging._internal import log_registry

        names |= set(log_registry.get_log_qnames())
    except (ImportError, AttributeError):  # (a private registry: without it only ``torch`` is heard)
        pass
    return [logging.getLogger(n) for n in sorted(names)]


class _Keep(logging.Handler):
    """Keeps the first :data:`FIRST_LINES` and the last :data:`LAST_LINES` records, and counts all."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.first: list[str] = []
        self.last: deque[str] = deque(maxlen=LAST_LINES)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception as exc:  # a record whose arguments do not format is still worth a line
            text = f"{record.msg!r} (unformattable: {type(exc).__name__})"
        line = f"{record.name}: {text.strip()[:500]}"
        self.count += 1
        (self.first.append if len(self.first) < FIRST_LINES else self.last.append)(line)


class CompileWatch:
    """``with CompileWatch() as w: ...`` then ``w.report()``: the counters' growth inside the
    block (groups of :data:`COUNTER_GROUPS`, zero entries left out), the number of lines torch
    logged there about recompiles, graph breaks and CUDA graphs, and the first and last of them
    (:data:`FIRST_LINES`, :data:`LAST_LINES`). Torch's log settings go back to its defaults on
    exit (settings made before, ``TORCH_LOGS`` included, are not restored)."""

    def __init__(self):
        self._keep = _Keep()
        self._before: dict = {}
        self._after: dict | None = None

    def __enter__(self) -> "CompileWatch":
        self._before = _counters()
        torch._logging.set_logs(**LOG_ARTIFACTS)  # (resets the handlers of torch's loggers: ours go on after)
        self._loggers = _torch_loggers()
        for logger in self._loggers:
            logger.addHandler(self._keep)
        return self

    def __exit__(self, *exc) -> None:
        self._after = _counters()
        for logger in self._loggers:
            logger.removeHandler(self._keep)
        torch._logging.set_logs()  # (back to torch's defaults)

    def report(self) -> dict:
        after = self._after if self._after is not None else _counters()
        grown = {}
        for group, values in after.items():
            delta = {k: v - self._before.get(group, {}).get(k, 0) for k, v in values.items()}
            delta = {k: v for k, v in delta.items() if v}
            if delta:
                grown[group] = delta
        k = self._keep
        return {"counters": grown, "log_lines": k.count, "log_first": list(k.first), "log_last": list(k.last)}
