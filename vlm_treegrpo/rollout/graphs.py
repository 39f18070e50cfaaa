"""Decoding whose steps replay a captured CUDA graph (``rollout.decode_graphs``).

On a GPU a small model's decode step is bound by kernel launches: SmolLM2-135M dispatches about
1,240 ops a token (30 layers), each launched by the host, and the H200 runs them faster than
the host issues them. TRL's ``generate`` and ours both pay this; on the H200 both took 40-60 ms
a token. A CUDA graph of the step is replayed with one launch.

:func:`graph_decode` does what one ``generate`` call over a prefilled cache does (the same
logits processors called in the same order, so the same draws; padding after a row finished;
the same stopping) with its own loop over fixed buffers: a :class:`StepGraph` holds a static KV
cache of ``L`` positions for ``B`` rows, the step's input token, positions and 4-D attention
mask, and the graph of one forward over them. Each pass loads its prefill into the cache and
each step writes its token, bumps the position, opens one mask column and replays. The graphs
are kept per batch shape (rows rounded up, :func:`row_bucket`; cache length), cache dtype and
autocast state for each model (:data:`POOL_SIZE`), so a training run captures each shape once;
the optimizer updates the weights in place, which the graphs read.

Without CUDA (or when capture fails: the reason is counted in :data:`STATS` and warned once) the
same loop runs the forward eagerly, which is how the CPU tests check it against ``generate``.
Text models and VLMs alike (a VLM's steps need no image input once the cache holds the prompt;
the adapter's row state places them, :meth:`~vlm_treegrpo.rollout.kv_cache.RowState.decode_positions`:
Qwen's mRoPE offsets). A model whose cache is not plain per-token keys and values (a sliding
window, Gemma3) or whose attention takes no 4-D mask (flash) decodes through ``generate``
(:func:`supports`).
"""
from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import LogitsProcessorList, StaticCache

from vlm_treegrpo.rollout.attention import causal_configs
from vlm_treegrpo.rollout.decode import RowStop, StopRule
from vlm_treegrpo.rollout.kv_cache import CACHE_KWARG, STATIC_CACHE_BUCKET, CachePiece, RowState, is_plain, select_rows

POOL_SIZE = 8
"""Step graphs kept per model (least recently used dropped first). A K x M tree run needs one
for its thoughts and a few for its continuations (:func:`row_bucket`; more where prompt lengths
cross a :data:`STATIC_CACHE_BUCKET`). Each holds a static cache of its rows x length: for a
large model or long completions, that is the memory to watch."""

WARMUP_RUNS = 2
"""Eager forwards on a side stream before capture (CUDA's libraries set up their workspaces)."""


@dataclass
class GraphStats:
    """What graph decoding did in this process (the bench reports it)."""

    captured: int = 0
    """Step graphs captured."""
    replays: int = 0
    """Decode steps run by replaying a graph."""
    eager_steps: int = 0
    """Decode steps run eagerly through the same loop (no CUDA, or a failed capture)."""
    failures: list[str] = field(default_factory=list)
    """Why a capture failed (each distinct reason once)."""

    def as_dict(self) -> dict:
        return {"captured": self.captured, "replays": self.replays, "eager_steps": self.eager_steps,
                "failures": list(self.failures)}


STATS = GraphStats()


MASKED_KERNELS = ("sdpa",)
"""Attention kernels that take the step's 4-D bool mask: sdpa (decoding reroutes it through
:func:`~vlm_treegrpo.rollout.attention.attention_forward`). transformers' eager kernel adds a
mask to the scores (a bool one would add 1 and 0) and flash-attention takes none."""


def supports(model) -> bool:
    """Whether :func:`graph_decode` can decode for ``model``'s decoder: a static cache of plain
    keys and values for every column (no sliding-window layer) and an attention kernel that
    takes a 4-D mask (:data:`MASKED_KERNELS`)."""
    if not is_plain(StaticCache(config=model.config, max_cache_len=STATIC_CACHE_BUCKET)):  # (layers allocate lazily)
        return False
    return all(c._attn_implementation in MASKED_KERNELS for c in causal_configs(model))


def _fingerprint(model) -> tuple:
    """Where the weights and buffers (rotary frequencies too) are: a graph reads them there."""
    return tuple((t.data_ptr(), t.dtype, t.device) for t in (*model.parameters(), *model.buffers()))


def wanted(setting: bool | str, device) -> bool:
    """Whether ``rollout.decode_graphs`` (``SamplingParams.graphs``) asks for the graph loop on
    ``device``: ``True`` everywhere, ``"auto"`` where graphs are captured (CUDA), ``False`` never."""
    return setting is True or (setting == "auto" and torch.device(device).type == "cuda")


BUCKET_DEVICES = ("cuda",)
"""Devices whose step buffers are made for :func:`row_bucket` rows (where graphs are captured)."""


def row_bucket(B: int) -> int:
    """The rows a step graph is made for: ``B`` rounded up to a power of two up to 16, then to a
    multiple of 16, so a continuation pass (its rows are the unfinished thoughts times M, a number
    that changes from step to step) reuses a few graphs instead of capturing one per count. The
    extra rows repeat the last row and are dropped from the logits before sampling."""
    return 1 << (B - 1).bit_length() if B <= 16 else -(-B // 16) * 16


class StepGraph:
    """One decode step of ``B`` rows over a static cache of ``L`` positions, on fixed buffers,
    captured as a CUDA graph where possible."""

    def __init__(self, model, B: int, L: int, device: torch.device, axes: int = 0):
        self.B, self.device = B, device  # (not the model: the pool's values must not keep its key alive)
        self.cache = StaticCache(config=model.config, max_cache_len=L)
        self.ids = torch.zeros((B, 1), dtype=torch.long, device=device)
        self.pos = torch.zeros((axes, B, 1) if axes else (B, 1), dtype=torch.long, device=device)  # (axes: mRoPE's 3)
        self.mask = torch.zeros((B, 1, 1, L), dtype=torch.bool, device=device)
        self.graph = None
        self.logits: Tensor | None = None
        self.tried = False
        self.step_col = 0  # the cache column the next fed token goes to

    def forward(self, model) -> Tensor:
        """One eager forward over the buffers: logits ``[B, V]`` of the fed tokens."""
        out = model(input_ids=self.ids, position_ids=self.pos, attention_mask=self.mask, use_cache=True, logits_to_keep=1,
                    **{CACHE_KWARG: self.cache})
        return out.logits[:, -1]

    def load(self, prefilled, attention_mask: Tensor, positions: Tensor) -> None:
        """Start a pass: the cache holds ``prefilled`` (every column but the last, ``T - 1``)
        at its first positions, the mask opens the prompt's real columns, the positions are
        the last prompt token's (``positions [B']``, or ``[3, B']`` for mRoPE). With fewer rows
        than the buffers' ``B``, the last row fills the rest."""
        T1 = attention_mask.shape[1] - 1
        if len(prefilled.layers) != len(self.cache.layers):
            raise ValueError(f"graph_decode: the prefilled cache has {len(prefilled.layers)} layers, the model {len(self.cache.layers)}")
        fill = self.B - attention_mask.shape[0]
        self.cache.reset()  # (in place: the graph's addresses stay)
        for static, layer in zip(self.cache.layers, prefilled.layers):
            static.update(_fill(layer.keys, fill), _fill(layer.values, fill))  # (allocates on first use) columns 0 .. T-2
        self.mask.zero_()
        self.mask[:, 0, 0, :T1] = _fill(attention_mask[:, :T1], fill).bool()
        self.pos.copy_(_fill(positions, fill, dim=positions.dim() - 1)[..., None])
        self.step_col = T1

    def capture(self, model, stats: GraphStats) -> None:
        """Capture the step as a CUDA graph (once per buffers). Warm-up forwards write into the
        cache and advance it: the caller reloads it (:meth:`load`) after this."""
        self.tried = True
        if self.device.type != "cuda":
            return
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda") if autocast else None
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self.forward(model)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # (autocast's weight-cast cache off: a cached cast made during capture would be freed
            # when the outer autocast region ends, while the graph still reads it)
            with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False), torch.cuda.graph(graph):
                self.logits = self.forward(model)
            self.graph = graph
            stats.captured += 1
        except Exception as exc:  # the loop runs eagerly instead; the reason is reported
            self.graph, self.logits = None, None
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            if reason not in stats.failures:
                stats.failures.append(reason)
                warnings.warn(f"rollout.decode_graphs: CUDA graph capture failed, decoding eagerly ({reason})", stacklevel=2)

    def step(self, model, token: Tensor, stats: GraphStats) -> Tensor:
        """Feed ``token [B']`` at the next position (the extra rows get the last row's); the
        logits ``[B', V]`` (float32, a copy)."""
        rows = token.shape[0]
        self.ids.copy_(_fill(token, self.B - rows)[:, None])
        self.mask[:, 0, 0, self.step_col] = True
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
            stats.replays += 1
        else:
            logits = self.forward(model)
            stats.eager_steps += 1
        self.pos.add_(1)
        self.step_col += 1
        return logits[:rows].to(copy=True, dtype=torch.float32)


def _fill(t: Tensor, extra: int, dim: int = 0) -> Tensor:
    """``t`` with its last entry along ``dim`` repeated ``extra`` more times."""
    if extra <= 0:
        return t
    last = t.narrow(dim, t.shape[dim] - 1, 1)
    return torch.cat([t, last.expand(*[extra if d == dim else -1 for d in range(t.dim())])], dim=dim)


_POOLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
"""Each model's step graphs, ``(weights' fingerprint, {key: StepGraph})`` keyed by rows, cache
length, device, cache dtype, autocast dtype and position axes (:func:`step_graph`): beside the
model, not on it, so copying or saving a model never meets a CUDA graph."""


def _pool(model) -> OrderedDict:
    pool = _POOLS.get(model)
    fingerprint = _fingerprint(model)
    if pool is None or pool[0] != fingerprint:  # new weights (a merge, a move): the graphs read the old ones
        pool = (fingerprint, OrderedDict())
        _POOLS[model] = pool
    return pool[1]


def step_graph(model, B: int, L: int, prefilled, attention_mask: Tensor, positions: Tensor, stats: GraphStats) -> StepGraph:
    """The model's :class:`StepGraph` for ``B`` rows (:func:`row_bucket`) and ``L`` positions,
    the cache's dtype and the autocast state (a graph computes as it was captured), made and
    captured on first use, loaded for this pass."""
    pool = _pool(model)
    device = attention_mask.device
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    axes = positions.shape[0] if positions.dim() == 2 else 0
    rows = row_bucket(B) if device.type in BUCKET_DEVICES else B  # (padding rows costs compute where nothing is captured)
    key = (rows, L, device, prefilled.layers[0].keys.dtype, autocast, axes)
    graph = pool.get(key)
    if graph is None:
        graph = StepGraph(model, rows, L, device, axes)
        pool[key] = graph
        while len(pool) > POOL_SIZE:
            pool.popitem(last=False)
    pool.move_to_end(key)
    graph.load(prefilled, attention_mask, positions)
    if not graph.tried:
        graph.capture(model, stats)
        graph.load(prefilled, attention_mask, positions)
    return graph


@torch.no_grad()
def graph_decode(model, inputs: dict, prefilled, max_new_tokens: int, pad_id: int, processors: LogitsProcessorList,
                 rule: StopRule, state: RowState | None = None, keep_cache: bool = False,
                 stats: GraphStats = STATS) -> tuple[Tensor, list[CachePiece]]:
    """What ``generate`` returns for the rows of ``inputs`` (left-padded ``input_ids`` and
    ``attention_mask [B, T]``; other per-token inputs are not needed once the cache holds the
    prompt) continued from ``prefilled`` (the cache of their first ``T - 1`` columns), up to
    ``max_new_tokens``: ``out [B, T + new]`` padded after each row finished, and with
    ``keep_cache`` the rows' cache as one :class:`CachePiece` (a copy: the step graph's own cache
    is the next pass's). ``state``: the model's per-row generation state, which places the decode
    steps (:meth:`RowState.decode_positions`; a text model's: :class:`RowState`)."""
    ids = inputs["input_ids"]
    B, T = ids.shape
    if max_new_tokens < 1:
        return ids, []
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    positions = (state or RowState()).decode_positions(mask)  # [B] (or [3, B]): the last prompt token's
    L = -(-(T + max_new_tokens) // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET
    graph = step_graph(model, B, L, prefilled, mask, positions, stats)
    out = torch.full((B, T + max_new_tokens), pad_id, dtype=torch.long, device=ids.device)
    out[:, :T] = ids
    unfinished = torch.ones(B, dtype=torch.bool, device=ids.device)
    pads = torch.full((B,), pad_id, dtype=torch.long, device=ids.device)
    stop = RowStop(rule, T, T + max_new_tokens)
    token, width = ids[:, -1], T
    for t in range(max_new_tokens):
        logits = graph.step(model, token, stats)
        scores = processors(out[:, :width], logits)
        token = torch.where(unfinished, scores.argmax(-1), pads)
        out[:, width] = token
        width += 1
        unfinished &= ~stop(out[:, :width], scores)
        if not bool(unfinished.any()):
            break
    pieces = [CachePiece(torch.arange(B, device=ids.device), select_rows(graph.cache, torch.arange(B)))] if keep_cache else []
    return out[:, :width], pieces
