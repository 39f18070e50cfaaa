"""User reward functions run in worker processes, where a time limit holds whatever they do.

In the trainer's process a time limit is a signal raised inside the call
(:mod:`vlm_treegrpo.rewards.deadline`), which a reward can defeat: a bare ``except:`` swallows
it, and a call stuck in C code never sees it. Here each reward given by import path runs in
``algo.reward_workers`` forked processes (forked as torch's DataLoader workers are: no pickling
of the function, the module already imported). A batch is split between the workers, each
answers call by call, and a call that runs past ``algo.reward_timeout_s`` has its worker killed
(SIGKILL: nothing to catch) and replaced; the call counts as a failure and the worker's
remaining calls go to the replacement. A worker that dies (a crash, ``os._exit``) costs the
same: its call fails, the rest go on.

A reward runs here with the state its module had when the worker was forked (a fresh copy after
each replacement), and must not use the GPU (a forked process cannot); set
``algo.reward_workers=0`` for a reward that needs the trainer's process.
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import numbers
import os
import signal
import time
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

import torch

Outcome = tuple[float | None, str | None]
"""A call's result: ``(value, None)`` or ``(None, error message)``."""


def import_path(spec: str) -> Callable:
    """The callable named by ``"package.module:attr.attr"``; ``ValueError`` naming ``spec``
    when it cannot be imported or is not callable."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # (any import-time failure of user code is the spec's fault)
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e})") from e
    fn: Any = module
    try:
        for part in attr.split("."):
            fn = getattr(fn, part)
    except AttributeError as e:
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no {attr!r}") from e
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {attr!r} is not callable")
    return fn


def _plain(raw: Any) -> Outcome:
    """A returned value as something every process can read: a float, or why it is not one."""
    if isinstance(raw, torch.Tensor) and raw.numel() == 1 and not raw.is_complex():
        raw = raw.item()
    if isinstance(raw, numbers.Real) and not isinstance(raw, bool):
        return float(raw), None
    try:
        text = repr(raw)
    except Exception:
        text = f"<{type(raw).__name__}>"
    return None, f"returned {text[:57] + '...' if len(text) > 60 else text}, not a finite number"


def _serve(conn: Connection, fn: Callable) -> None:
    """A worker: score each ``(index, completion, example)`` of every batch it receives, one
    answer a call, until it receives None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (Ctrl-C is the trainer's to handle; it ends the workers)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        try:
            batch = conn.recv()
        except EOFError:  # (the trainer is gone)
            return
        if batch is None:
            return
        for index, completion, example in batch:
            try:
                out = _plain(fn(completion, example))
            except BaseException as e:  # noqa: BLE001 - whatever a user's reward raises is its failure
                out = (None, f"{type(e).__name__}: {e}")
            conn.send((index, out))


class _Worker:
    def __init__(self, ctx, fn: Callable):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, fn), daemon=True, name="reward-worker")
        self.proc.start()
        child.close()
        self.pending: list[tuple[int, str, Any]] = []
        self.since = 0.0

    def give(self, items: list) -> None:
        self.pending = list(items)
        self.since = time.monotonic()
        if items:
            self.conn.send(items)

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join()
        self.conn.close()


class RewardWorkers:
    """One reward function run by ``n`` worker processes with a per-call limit of ``timeout_s``
    seconds (0 = none). Calling it scores a batch; :meth:`close` ends the workers."""

    def __init__(self, fn: Callable, n: int, timeout_s: float = 0.0):
        if n < 1:
            raise ValueError(f"RewardWorkers needs n >= 1, got {n}")
        self.fn, self.n, self.timeout_s = fn, n, float(timeout_s)
        self.ctx = mp.get_context("fork")
        self.workers: list[_Worker] = []

    def __call__(self, completions: Sequence[str], examples: Sequence[Any]) -> list[Outcome]:
        """The outcome of ``fn(completion, example)`` for each pair, in order."""
        items = [(i, c, e) for i, (c, e) in enumerate(zip(completions, examples))]
        out: list[Outcome | None] = [None] * len(items)
        while len(self.workers) < self.n:
            self.workers.append(_Worker(self.ctx, self.fn))
        for w, worker in enumerate(self.workers):
            worker.give(items[w :: self.n])  # [~B/n]
        while any(worker.pending for worker in self.workers):
            busy = [worker for worker in self.workers if worker.pending]
            left = None
            if self.timeout_s > 0:
                left = max(0.0, min(worker.since + self.timeout_s for worker in busy) - time.monotonic())
            ready = wait([worker.conn for worker in busy], timeout=left)
            now = time.monotonic()
            for k, worker in enumerate(self.workers):
                if not worker.pending:
                    continue
                failed = None
                if worker.conn in ready:
                    try:
                        index, outcome = worker.conn.recv()
                    except (EOFError, OSError):
                        worker.proc.join(timeout=5)  # (reaped, so its exit code is known)
                        failed = f"WorkerDied: the reward's process ended (exit code {worker.proc.exitcode})"
                    else:
                        out[index] = outcome
                        worker.pending.pop(0)
                        worker.since = now
                        continue
                elif self.timeout_s > 0 and now - worker.since >= self.timeout_s:
                    failed = f"CallTimeout: took longer than {self.timeout_s:g} s (its worker process was killed)"
                if failed is None:
                    continue
                index = worker.pending[0][0]
                out[index] = (None, failed)
                rest = worker.pending[1:]
                worker.kill()
                self.workers[k] = _Worker(self.ctx, self.fn)
                self.workers[k].give(rest)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        """End the workers (each finishes nothing more: killed)."""
        for worker in self.workers:
            worker.kill()
        self.workers = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # (interpreter shutdown: the daemon workers end with it)
            pass
