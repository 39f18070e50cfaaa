"""Verifiable rewards: answer extraction, math-verify correctness, format, and a weighted set.

A reward function has the signature ``fn(completion: str, example: Example) -> float``.
:class:`RewardSet` calls several of them on a batch, weights and sums the results,
and turns any exception or non-finite / non-number return value into a 0.0 reward
that is counted in :attr:`RewardOutput.failures` (a buggy user reward never kills a run). A call
that runs past the set's time limit (``algo.reward_timeout_s``) is stopped and counted the same way
(a hanging reward never stalls one): rewards given by import path run in worker processes that
are killed at the limit (``algo.reward_workers``, :mod:`vlm_treegrpo.rewards.workers`), the
built-ins (and every reward with ``reward_workers=0``) in this process under a signal-based limit
(:mod:`vlm_treegrpo.rewards.deadline`).

A reward path runs arbitrary code from the config: use configs you trust.
"""
from __future__ import annotations

import math
import numbers
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from vlm_treegrpo.data.loaders import last_boxed
from vlm_treegrpo.data.types import Example
from vlm_treegrpo.rewards.deadline import CallTimeout, Deadlines
from vlm_treegrpo.rewards.workers import RewardWorkers, import_path
from vlm_treegrpo.rewards.shaping import printable_reward

__all__ = [
    "BUILTIN_REWARDS",
    "RewardFn",
    "RewardOutput",
    "RewardSet",
    "correctness_reward",
    "extract_final_answer",
    "format_reward",
    "resolve_reward",
]

RewardFn = Callable[[str, Example], float]

MAIN_THREAD_TIMEOUT_S = 5
"""math-verify timeout (seconds) used in the main thread; other threads run without one."""

MAX_ERRORS_KEPT = 8
"""How many error messages :class:`RewardSet` keeps per call."""

_ANSWER_RE = re.compile(r"answer\s*:", re.IGNORECASE)
_FORMAT_LINE_RE = re.compile(r"^Answer:\s*-?[\d,]+(\.\d+)?\s*$", re.MULTILINE)


def extract_final_answer(completion: str) -> str:
    r"""The final-answer text of a completion.

    The content of the last ``\boxed{...}`` if any; else the text after the last
    ``Answer:`` (case-insensitive) up to the end of that line (or the next non-empty
    line when the marker ends its line); else the whole completion, stripped.
    """
    if not completion:
        return ""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed.strip()
    matches = list(_ANSWER_RE.finditer(completion))
    if matches:
        rest = completion[matches[-1].end() :]
        for line in rest.splitlines():
            if line.strip():
                return line.strip()
        return ""
    return completion.strip()


def _mv_timeout() -> int | None:
    """math-verify's signal-based timeout only works in the main thread: disable it elsewhere."""
    if threading.current_thread() is threading.main_thread():
        return MAIN_THREAD_TIMEOUT_S
    return None


def _parse_gold(answer: str, timeout: int | None) -> list:
    """Parse a reference answer (plain number or LaTeX) with math-verify."""
    from math_verify import parse

    text = answer.strip()
    if not text:
        return []
    if not (text.startswith("$") or text.startswith("\\(") or text.startswith("\\[")):
        text = f"${text}$"
    gold = parse(text, parsing_timeout=timeout)
    if not gold:
        gold = parse(answer, parsing_timeout=timeout)
    return gold


def _parse_pred(extracted: str, timeout: int | None) -> list:
    """Parse an extracted answer; retry wrapped in ``$...$`` when plain parsing finds nothing."""
    from math_verify import parse

    if not extracted.strip():
        return []
    pred = parse(extracted, parsing_timeout=timeout)
    if not pred:
        pred = parse(f"${extracted}$", parsing_timeout=timeout)
    return pred


def correctness_reward(completion: str, example: Example) -> float:
    """1.0 if math-verify finds the completion's final answer equal to ``example.answer``.

    The gold is parsed as ``$answer$``; the prediction is :func:`extract_final_answer`
    of the completion (math-verify picks the last number / expression in plain text).
    Compared with ``verify(gold, pred)``.  Timeouts are signal-based in the main
    thread and disabled in other threads, so this works anywhere.
    """
    from math_verify import verify

    if not completion or not example.answer:
        return 0.0
    timeout = _mv_timeout()
    gold = _parse_gold(str(example.answer), timeout)
    if not gold:
        return 0.0
    pred = _parse_pred(extract_final_answer(completion), timeout)
    if not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=timeout) else 0.0


def format_reward(completion: str, example: Example) -> float:
    r"""1.0 if the completion has exactly one ``Answer: <number>`` line or a ``\boxed{}``."""
    if not completion:
        return 0.0
    if len(_FORMAT_LINE_RE.findall(completion)) == 1:
        return 1.0
    boxed = last_boxed(completion)
    return 1.0 if boxed is not None and boxed.strip() else 0.0


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "correctness": correctness_reward,
    "format": format_reward,
    "printable": printable_reward,
}
"""Reward functions available by short name."""


def resolve_reward(spec: str) -> RewardFn:
    """A reward function from a built-in name or an ``"package.module:function"`` path.

    Raises ``ValueError`` naming ``spec`` when it is unknown or cannot be imported.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise ValueError(
            f"unknown reward {spec!r}: expected one of {sorted(BUILTIN_REWARDS)} "
            "or an import path 'package.module:function'"
        )
    return import_path(spec)


@dataclass
class RewardOutput:
    """Rewards for one batch."""

    total: torch.Tensor
    """``[B]`` float32 weighted sum over reward functions."""
    per_fn: dict[str, torch.Tensor] = field(default_factory=dict)
    """Unweighted ``[B]`` float32 values per reward name (failures are 0.0)."""
    failures: dict[str, int] = field(default_factory=dict)
    """Per reward name: calls that raised or returned a non-finite / non-number value."""
    errors: list[str] = field(default_factory=list)
    """The first few failure messages, e.g. ``"reward 'x' on sample 3: ZeroDivisionError: ..."``."""


def _as_float(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` when it is not a finite real number."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return None
        value = value.item()
    if not isinstance(value, numbers.Real):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


class RewardSet:
    """A weighted sum of named reward functions, robust to failing functions."""

    def __init__(self, fns: Sequence[tuple[str, RewardFn, float]], timeout_s: float = 0.0, workers: int = 0,
                 in_workers: Sequence[str] = ()) -> None:
        """``fns``: ``(name, fn, weight)`` triples with unique names and finite weights;
        ``timeout_s``: the time limit of one call (0 = none); the rewards named in
        ``in_workers`` run in ``workers`` worker processes (:class:`RewardWorkers`)."""
        self.timeout_s = timeout_s
        if not fns:
            raise ValueError("RewardSet needs at least one reward function")
        self.fns: list[tuple[str, RewardFn, float]] = []
        seen: set[str] = set()
        for name, fn, weight in fns:
            if name in seen:
                raise ValueError(f"duplicate reward name {name!r}")
            if not callable(fn):
                raise ValueError(f"reward {name!r} is not callable")
            w = _as_float(weight)
            if w is None or isinstance(weight, bool):
                raise ValueError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
            seen.add(name)
            self.fns.append((name, fn, w))
        self.pools = {name: RewardWorkers(fn, workers, timeout_s) for name, fn, _ in self.fns if workers > 0 and name in in_workers}

    def close(self) -> None:
        """End the worker processes, if any."""
        for pool in self.pools.values():
            pool.close()

    def __enter__(self) -> RewardSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def names(self) -> list[str]:
        """Reward names in order."""
        return [name for name, _, _ in self.fns]

    @classmethod
    def from_config(cls, specs: Sequence[str | dict], timeout_s: float = 0.0, workers: int = 0) -> RewardSet:
        """Build from config entries: ``"correctness"`` (weight 1.0) or
        ``{"name": "pkg.mod:fn", "weight": 0.5}``; the name is also the reward's key. Rewards
        given by import path run in ``workers`` worker processes (0: in this one)."""
        if isinstance(specs, (str, dict)):
            specs = [specs]
        fns: list[tuple[str, RewardFn, float]] = []
        for spec in specs:
            if isinstance(spec, str):
                name, weight = spec.strip(), 1.0
            elif isinstance(spec, dict):
                unknown = set(spec) - {"name", "weight"}
                if unknown:
                    raise ValueError(f"reward entry {spec!r}: unknown keys {sorted(unknown)}")
                if "name" not in spec:
                    raise ValueError(f"reward entry {spec!r}: missing 'name'")
                name, weight = str(spec["name"]).strip(), spec.get("weight", 1.0)
            else:
                raise ValueError(f"reward entry must be a string or dict, got {spec!r}")
            fns.append((name, resolve_reward(name), weight))
        return cls(fns, timeout_s, workers, [name for name, _, _ in fns if name not in BUILTIN_REWARDS])

    def __call__(self, completions: Sequence[str], examples: Sequence[Example]) -> RewardOutput:
        """Score each ``(completion, example)`` pair with every reward function."""
        if len(completions) != len(examples):
            raise ValueError(
                f"got {len(completions)} completions but {len(examples)} examples"
            )
        batch = len(completions)
        total = torch.zeros(batch, dtype=torch.float32)
        per_fn: dict[str, torch.Tensor] = {}
        failures: dict[str, int] = {}
        errors: list[str] = []
        with Deadlines(self.timeout_s) as deadlines:
            for name, fn, weight in self.fns:
                values = [0.0] * batch
                n_fail = 0
                if name in self.pools:
                    for i, (raw, error) in enumerate(self.pools[name](completions, examples)):
                        value = None if raw is None else _as_float(raw)
                        if value is None:
                            n_fail += 1
                            if len(errors) < MAX_ERRORS_KEPT:
                                errors.append(f"reward {name!r} on sample {i}: {error or f'returned {raw!r}, not a finite number'}")
                        else:
                            values[i] = value
                    fn_calls = ()
                else:
                    fn_calls = enumerate(zip(completions, examples))
                for i, (completion, example) in fn_calls:
                    try:
                        with deadlines.limit():
                            raw = fn(completion, example)
                    except (Exception, CallTimeout) as e:  # a user reward must never kill (or stall) the run
                        n_fail += 1
                        if len(errors) < MAX_ERRORS_KEPT:
                            errors.append(f"reward {name!r} on sample {i}: {type(e).__name__}: {e}")
                        continue
                    value = _as_float(raw)
                    if value is None:
                        n_fail += 1
                        if len(errors) < MAX_ERRORS_KEPT:
                            errors.append(
                                f"reward {name!r} on sample {i}: returned {_short_repr(raw)}, "
                                "not a finite number"
                            )
                        continue
                    values[i] = value
                tensor = torch.tensor(values, dtype=torch.float32)
                per_fn[name] = tensor
                failures[name] = n_fail
                total += weight * tensor
        return RewardOutput(total=total, per_fn=per_fn, failures=failures, errors=errors)

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}*{weight:g}" for name, _, weight in self.fns)
        return f"RewardSet({inner})"


def _short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (never raises)."""
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
