"""Exact categorical sampling by inverse CDF, as logits processors for ``model.generate``.

``torch.multinomial`` (what ``generate(do_sample=True)`` calls) draws one exponential variate per
vocabulary entry: on the CPU that is ~48 ms per decode step for 64 rows over SmolLM2's 49,152
tokens, more than the 135M model's own forward. Inverse-CDF sampling draws ONE uniform per row
and binary-searches the cumulative probabilities: the same distribution, ~2 ms for that batch.
Likewise transformers' top-p warper sorts the whole vocabulary of every row (~120 ms per step for
that batch); :func:`nucleus` finds the nucleus among the 256 most likely tokens (``topk``, ~5 ms)
and sorts everything only for rows whose 256 best tokens hold less than ``top_p`` of the mass,
so the kept set and its probabilities are exactly the warpers'.

The draw runs inside ``generate`` as the one logits processor of a greedy (``do_sample=False``)
call, :class:`Sampler`: token suppression and temperature first, as in sampling mode, then
:class:`InverseCDFSampler` (or :class:`NucleusSampler` under top-k / top-p) draws a token and
returns logits that are 0 there and ``-inf`` elsewhere, so greedy's argmax picks it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import LogitsProcessor

NUCLEUS_CANDIDATES = 256
"""Tokens :func:`nucleus` looks at first (all of them where these hold less than ``top_p``)."""


def inverse_cdf_sample(logits: Tensor, generator: torch.Generator | None = None, work: Tensor | None = None,
                       u: Tensor | None = None) -> Tensor:
    """One token per row of ``logits [B, V]`` drawn from ``softmax(logits)``; returns ``[B]`` long.

    Tokens with logit ``-inf`` (zero probability) are never drawn: the search returns the first
    index whose cumulative mass exceeds the uniform ``u``, and a zero-mass entry never raises the
    cumulative sum. ``u`` is kept below the total even where ``u * total`` rounds up to it, so
    the search always lands on a token, with no host-side check (a device sync per decode step
    on a GPU). The cumulative sum is in float64, so the rounding over a large vocabulary
    does not shift mass between tokens. ``work``: a float64 buffer of ``logits``' shape to compute
    in (:func:`workspace`); on the CPU a fresh 25 MB buffer per decode step (64 rows of SmolLM2's
    vocabulary) costs more in page faults than the arithmetic. ``u``: the rows' uniforms ``[B, 1]``
    float64 in ``[0, 1)``, drawn by the caller (:meth:`Sampler.keep_rows`); else drawn here.
    """
    x = work if work is not None else torch.empty(logits.shape, dtype=torch.float64, device=logits.device)
    x.copy_(logits)
    cdf = x.sub_(x.amax(-1, keepdim=True)).exp_().cumsum_(-1)  # [B, V]: weights with max entry 1, summed
    total = cdf[:, -1:]  # [B, 1]
    if u is None:
        u = torch.rand(total.shape, dtype=torch.float64, device=logits.device, generator=generator)
    u = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # [B, 1] in [0, total), rounding included
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)  # [B]: first index with cdf > u (it exists: cdf[-1] = total > u)
    return idx.clamp_(max=logits.shape[-1] - 1)  # (only a NaN row has no such index: garbage in, but no index past the vocabulary)


def nucleus(logits: Tensor, top_k: int = 0, top_p: float = 1.0, candidates: int = NUCLEUS_CANDIDATES,
            work: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The tokens that transformers' top-k then top-p warpers keep, and their probabilities.

    Returns ``(idx [B, k], probs [B, k])``, most likely first: ``probs`` is ``softmax(logits)``
    renormalized over the top ``top_k`` tokens (all when 0), then zero on every token whose more
    likely tokens already hold ``top_p`` of that mass (the first token is always kept). Only the
    ``candidates`` most likely tokens are searched when they hold at least ``top_p`` (every kept
    token is among them then); otherwise all are sorted. ``work``: a float32 buffer of
    ``logits``' shape for the softmax (:func:`workspace`).
    """
    probs = torch.softmax(logits.float(), -1, out=work) if work is not None else logits.float().softmax(-1)  # [B, V]
    V = probs.shape[-1]
    k = min(top_k if top_k > 0 else candidates, V)
    vals, idx = probs.topk(k, dim=-1)  # [B, k] descending
    if top_k > 0:
        vals = vals / vals.sum(-1, keepdim=True)  # the softmax over the top-k survivors
    elif k < V and bool((vals.sum(-1) < top_p).any()):
        vals, idx = probs.sort(dim=-1, descending=True)  # the nucleus may reach past the candidates
    if top_p < 1.0:
        before = vals.cumsum(-1) - vals  # [B, k] mass of the more likely tokens
        keep = before < top_p
        keep[:, 0] = True
        vals = torch.where(keep, vals, torch.zeros_like(vals))
    return idx, vals


def _argmax_at(scores: Tensor, token: Tensor) -> Tensor:
    """``scores``, overwritten: 0 at ``token [B, 1]`` and ``-inf`` elsewhere (greedy then picks
    it). In place: ``generate`` hands each step's processors a fresh copy of the logits."""
    return scores.fill_(float("-inf")).scatter_(-1, token, 0.0)


def workspace(held: Tensor | None, like: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """``held`` when it is a ``dtype`` buffer of ``like``'s shape and device, else a new one: a
    sampler keeps one across the decode steps of a batch."""
    if held is None or held.shape != like.shape or held.device != like.device or held.dtype != dtype:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    return held


class InverseCDFSampler(LogitsProcessor):
    """Draws the next token (:func:`inverse_cdf_sample`) and returns logits that make it the
    argmax; one float64 buffer serves every step of the same batch shape."""

    def __init__(self):
        self.work: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor, u: Tensor | None = None) -> Tensor:
        self.work = workspace(self.work, scores)
        return _argmax_at(scores, inverse_cdf_sample(scores, work=self.work, u=u)[:, None])


class NucleusSampler(LogitsProcessor):
    """Top-k / top-p and the draw in one step (:func:`nucleus`, :func:`inverse_cdf_sample`)."""

    def __init__(self, top_k: int = 0, top_p: float = 1.0):
        self.top_k, self.top_p = top_k, top_p
        self.work: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor, u: Tensor | None = None) -> Tensor:
        self.work = workspace(self.work, scores, torch.float32)
        idx, probs = nucleus(scores, self.top_k, self.top_p, work=self.work)  # [B, k]
        choice = inverse_cdf_sample(probs.log(), u=u)  # [B] (log 0 = -inf: never drawn)
        return _argmax_at(scores, idx.gather(-1, choice[:, None]))


class Sampler(LogitsProcessor):
    """Everything a sampled decode step does to the logits, as ONE processor (``generate`` pays
    its per-processor overhead once): suppressed tokens to ``-inf`` (as transformers'
    ``SuppressTokensLogitsProcessor``), division by the temperature (``TemperatureLogitsWarper``),
    then the draw (:class:`InverseCDFSampler`, or :class:`NucleusSampler` under top-k / top-p)."""

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, suppress_ids: Sequence[int] = ()):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 to sample, got {temperature}")
        self.temperature = float(temperature)
        self.suppress = torch.tensor(sorted(set(int(i) for i in suppress_ids)), dtype=torch.long)
        nucleus_on = (top_k and top_k > 0) or top_p < 1.0
        self.draw = NucleusSampler(max(top_k or 0, 0), top_p) if nucleus_on else InverseCDFSampler()
        self.rows: Tensor | None = None
        self.n_rows = 0

    def keep_rows(self, rows: Tensor | None, n_rows: int = 0) -> None:
        """From now on draw ``n_rows`` uniforms per step and use those at ``rows [B']`` (the
        batch's rows, as indices into a batch of ``n_rows``): a decode that drops finished rows
        (:mod:`vlm_treegrpo.rollout.decode`) then samples exactly what the full batch samples.
        None: one uniform per batch row."""
        self.rows, self.n_rows = rows, n_rows

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.suppress.numel():
            if self.suppress.device != scores.device:
                self.suppress = self.suppress.to(scores.device)  # once, not a copy per decode step
            scores = scores.index_fill(-1, self.suppress, float("-inf"))
        if self.temperature != 1.0:
            scores = scores / self.temperature
        u = None
        if self.rows is not None:
            if self.rows.device != scores.device:
                self.rows = self.rows.to(scores.device)
            u = torch.rand((self.n_rows, 1), dtype=torch.float64, device=scores.device).index_select(0, self.rows)  # [B', 1]
        return self.draw(input_ids, scores, u)


def sampling_processors(temperature: float, top_k: int, top_p: float, suppress_ids: Sequence[int] = ()) -> list[LogitsProcessor]:
    """The logits processors of a sampled ``generate`` call: one :class:`Sampler`."""
    return [Sampler(temperature, top_k, top_p, suppress_ids)]
