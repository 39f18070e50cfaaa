"""SIGTERM and SIGINT during the GRPO loop: finish the step, checkpoint, stop.

A cluster scheduler preempting a job sends SIGTERM and, some seconds later, SIGKILL; Ctrl-C
sends SIGINT. Inside :class:`StopRequests` either signal only sets :attr:`StopRequests.signal`;
the loop checks it after each step (every process agreeing, :mod:`vlm_treegrpo.train.distributed`),
writes a checkpoint (:mod:`vlm_treegrpo.train.checkpoint`) and ends the run without the final
evaluation. A second Ctrl-C stops at once (``KeyboardInterrupt``). Outside the loop, and off the
main thread (where Python cannot take signals), nothing changes.
"""
from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """Context manager that turns SIGTERM / SIGINT into a request to stop after the step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # (the second Ctrl-C)
        self.signal = signum

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
