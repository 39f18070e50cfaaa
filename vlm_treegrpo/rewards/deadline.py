"""Time limits for calls into code we do not control (user reward functions).

A reward that hangs (a judge that never answers, a loop on an odd completion) would stall the
whole run. Inside ``with Deadlines(seconds) as d:``, each ``with d.limit():`` block that runs
longer than ``seconds`` gets :class:`CallTimeout` raised in it, and the caller counts the call as
a failure. One watchdog thread serves every call of the ``with``; at a call's deadline it sends
:data:`SIGNAL` to the main thread, whose handler raises there. So a sleep or a blocking read is
cut short as well as Python code. Code that stays inside one C call without returning to the
interpreter is stopped only when that call returns.

The exception unwinds the call like any other, so a reward that starts a process or opens a
connection should close it in a ``finally`` (or a ``with``): the limit stops the call, not what
it started.

Limits hold in the main thread only (Python takes signals there); elsewhere, or on a platform
without ``signal.pthread_kill``, or with ``seconds = 0``, calls run without one. The signal is
``SIGUSR2``, not ``SIGALRM``, so math-verify's own alarm-based timeouts work unchanged inside a
limited call.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time

SIGNAL = getattr(signal, "SIGUSR2", None)


class CallTimeout(BaseException):
    """Raised inside a call that ran past its limit. A ``BaseException`` (as ``KeyboardInterrupt``
    is), so a reward's own ``except Exception`` does not swallow it."""


class _Limit:
    __slots__ = ("deadlines",)

    def __init__(self, deadlines: "Deadlines"):
        self.deadlines = deadlines

    def __enter__(self) -> None:
        self.deadlines._begin()

    def __exit__(self, *exc) -> None:
        self.deadlines._end()


_UNLIMITED = contextlib.nullcontext()


class Deadlines:
    """Per-call time limits for the calls made inside one ``with`` (see the module docstring)."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.enabled = False
        self._cond = threading.Condition()
        self._active: int | None = None  # the id of the call being limited
        self._due = 0.0
        self._fired: int | None = None  # the call the watchdog signalled for
        self._calls = 0
        self._stop = False
        self._idle = False
        self._limit = _Limit(self)

    def __enter__(self) -> "Deadlines":
        self.enabled = (self.seconds > 0 and SIGNAL is not None and hasattr(signal, "pthread_kill")
                        and threading.current_thread() is threading.main_thread())
        if self.enabled:
            self._main = threading.get_ident()
            self._previous = signal.signal(SIGNAL, self._on_signal)
            self._watchdog = threading.Thread(target=self._watch, name="reward-deadlines", daemon=True)
            self._watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._watchdog.join()
        signal.signal(SIGNAL, self._previous)
        self.enabled = False

    def limit(self):
        """``with d.limit():`` the block is one limited call."""
        return self._limit if self.enabled else _UNLIMITED

    def _begin(self) -> None:
        with self._cond:
            self._calls += 1
            self._active, self._due = self._calls, time.monotonic() + self.seconds
            if self._idle:  # (a watchdog waiting on an earlier deadline wakes by itself: this one is later)
                self._cond.notify()

    def _end(self) -> None:
        with self._cond:
            self._active = None

    def _watch(self) -> None:
        with self._cond:
            while not self._stop:
                if self._active is None or self._fired == self._active:
                    self._idle = True  # (no call, or this one was signalled already)
                    self._cond.wait()
                    self._idle = False
                    continue
                left = self._due - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._fired = self._active
                signal.pthread_kill(self._main, SIGNAL)

    def _on_signal(self, signum, frame) -> None:
        # (a signal that arrives after its call ended, or during a later call, raises nothing)
        if self._fired is not None and self._fired == self._active:
            raise CallTimeout(f"took longer than {self.seconds:g} s")
