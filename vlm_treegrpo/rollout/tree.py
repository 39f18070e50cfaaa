"""Tree rollouts for causal LMs: K thoughts per prompt, then M continuations per thought.

GRPO-MA (arXiv 2509.24494) samples several answers per thought. Here a thought ends at the
first branch delimiter (``</think>``, a blank line, ...), at EOS, or at its token budget; each
unfinished thought is then continued M times. A thought that already ended with EOS is a
complete answer: its M leaves share its one reward. Flat GRPO is the K x 1 tree (one pass, no
branch point). Generation is batched over all prompts and branches.

This module only samples and bookkeeps token ids; rewards, advantages and losses live
elsewhere. :func:`grow_trees` is the K x M sampling logic over any prompt type and any batched
generate function (:func:`sample_trees` is it for token-id prompts; the vision-language policy
uses it over processed prompts); :func:`generate_batch` / :func:`cut_completions` are the
batched decode (``model.generate`` with finished rows dropped: :mod:`vlm_treegrpo.rollout.decode`)
and its post-processing shared by both; :func:`resuming_generator` lets
the continuations resume the thought pass's KV cache (the caches: :mod:`vlm_treegrpo.rollout.kv_cache`).
The packed training batch of text trees is :mod:`vlm_treegrpo.rollout.packing`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import CompileConfig, DynamicCache, GenerationConfig, LogitsProcessorList

from vlm_treegrpo.rollout.attention import decode_attention
from vlm_treegrpo.rollout.decode import StopRule, decode, has_delimiter
from vlm_treegrpo.rollout.graphs import graph_decode, supports, wanted
from vlm_treegrpo.rollout.kv_cache import TOKEN_KEYS, RowState, ThoughtPass, continuation_cache, prefill_shared, static_cache
from vlm_treegrpo.rollout.sampling import sampling_processors


@dataclass
class Tree:
    """One prompt's samples, as token ids."""

    prompt_ids: list[int]
    """The chat-formatted prompt."""
    thoughts: list[list[int]] = field(default_factory=list)
    """K thoughts."""
    thought_done: list[bool] = field(default_factory=list)
    """True where the thought ended with EOS (no continuation was sampled)."""
    answers: list[list[list[int]]] = field(default_factory=list)
    """K x M continuations (empty lists under a finished thought)."""
    prompt: Any = None
    """The prompt as the policy encoded it (the token-id list for text, the processed
    :class:`~vlm_treegrpo.vlm.adapter.Encoded` with its image tensors for a VLM)."""

    def leaf_ids(self, k: int, m: int) -> list[int]:
        """Completion tokens of leaf (k, m): thought + continuation."""
        return self.thoughts[k] + self.answers[k][m]


@dataclass
class SamplingParams:
    """Decoding settings shared by the thought and continuation passes."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    compile: bool = False
    """Decode through a static KV cache with the model's forward compiled (:func:`static_cache`)."""
    graphs: bool | str = False
    """Decode steps by replaying a captured CUDA graph (:mod:`vlm_treegrpo.rollout.graphs`;
    eagerly through the same loop without CUDA); ``"auto"``: on a CUDA device only
    (:func:`~vlm_treegrpo.rollout.graphs.wanted`)."""
    drop_finished: bool = True
    """Finished rows leave the decode batch (:mod:`vlm_treegrpo.rollout.decode`; the same draws
    as without). Not with ``compile``: a static cache keeps its batch."""

    @classmethod
    def of(cls, rollout) -> "SamplingParams":
        """The sampling settings of a :class:`~vlm_treegrpo.config.RolloutConfig`."""
        graphs = False if rollout.compile_decode and rollout.decode_graphs == "auto" else rollout.decode_graphs
        return cls(temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k, compile=rollout.compile_decode,
                   graphs=graphs, drop_finished=rollout.drop_finished)

    def generation_config(self, max_new_tokens: int, pad_id: int, eos_ids: list[int]) -> GenerationConfig:
        """A greedy config: sampling, when asked for, is done by :meth:`logits_processors`. With
        ``compile``, ``generate`` compiles the decode step (on every device) when given a
        static cache (:func:`static_cache`)."""
        cfg = GenerationConfig(
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_ids,
            do_sample=False,
        )
        if self.compile:
            cfg.compile_config = CompileConfig()
            cfg.compile_config._compile_all_devices = True  # (transformers compiles on accelerators only, unless told)
        return cfg

    def logits_processors(self, suppress_ids: Sequence[int] = ()) -> LogitsProcessorList:
        """Empty for greedy decoding (``generate`` suppresses ``suppress_ids`` itself then);
        otherwise the one :class:`~vlm_treegrpo.rollout.sampling.Sampler` (suppression,
        temperature, top-k / top-p, the draw), which turns ``generate``'s argmax into an exact
        draw from the warped distribution."""
        if self.greedy:
            return LogitsProcessorList()
        return LogitsProcessorList(sampling_processors(self.temperature, self.top_k, self.top_p, suppress_ids))


SPECIAL_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


@contextlib.contextmanager
def neutral_generation_config(model):
    """During ``generate``, the model holds a generation config with only its special token ids.

    ``generate`` fills every field our config leaves unset from the model's own config. A
    checkpoint's ``repetition_penalty``, ``no_repeat_ngram_size``, ``bad_words_ids`` and the
    like would then add logits processors ahead of our sampler, so it would draw from a
    distorted policy; ``num_return_sequences`` or ``return_dict_in_generate`` would change the
    output's shape. Under a PEFT wrapper the base model's config is the one ``generate`` reads.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = base.generation_config
    ids = {k: getattr(saved, k, None) for k in SPECIAL_TOKEN_FIELDS}
    base.generation_config = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
    try:
        yield
    finally:
        base.generation_config = saved


def eos_ids_of(tokenizer, model) -> list[int]:
    """All token ids that end a completion (tokenizer EOS plus the model's generation EOS)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Left-pad id lists into ``input_ids [B, T]`` and ``attention_mask [B, T]``."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s) :] = 1
    return ids.to(device), mask.to(device)


def cut_completions(
    out: Tensor, prompt_len: int, tokenizer, eos_ids: Sequence[int], stop_strings: list[str] | None = None
) -> tuple[list[list[int]], list[bool]]:
    """Post-process a ``model.generate`` output ``out [B, prompt_len + new]``.

    Returns ``(new_ids, ended)`` per row: the new tokens cut after the first EOS (kept) or after
    a stop string (a branch delimiter; trailing padding dropped), and whether the row ended with
    EOS.
    """
    pad_id = tokenizer.pad_token_id
    eos_set = set(eos_ids)
    results: list[list[int]] = []
    ended: list[bool] = []
    for row in out[:, prompt_len:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_set), None)
        if cut is None:
            # Budget reached, or a stop string matched and the rest is padding distinct from EOS.
            toks = row
            while toks and toks[-1] == pad_id and pad_id not in eos_set:
                toks = toks[:-1]
            results.append(toks)
            ended.append(False)
            continue
        head = row[:cut]
        if stop_strings and head and has_delimiter(tokenizer, [head], stop_strings)[0]:
            # Stopped at a branch delimiter; what follows is padding (pad == EOS here).
            results.append(head)
            ended.append(False)
        else:
            results.append(row[: cut + 1])
            ended.append(True)
    return results, ended


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    inputs: dict[str, Tensor],
    n: int,
    max_new_tokens: int,
    sampling: SamplingParams,
    stop_strings: list[str] | None = None,
    suppress_ids: list[int] | None = None,
    decode_inputs: dict[str, Tensor] | None = None,
    state: RowState | None = None,
    prefilled=None,
    keep: list | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """``n`` samples per row of left-padded model kwargs ``inputs`` (``input_ids``,
    ``attention_mask`` and whatever else the model takes, e.g. image tensors), in one batched
    decode (:func:`~vlm_treegrpo.rollout.decode.decode`: ``generate``, finished rows dropped
    along the way); post-processed by :func:`cut_completions` (rows sequence-major).

    With ``n > 1`` the rows' prompts are prefilled once (:func:`prefill_shared`) and ``generate``
    continues the ``B * n`` copies from that cache: ``decode_inputs`` are the copies' kwargs
    (default: every per-token input repeated; a VLM passes its re-collated copies without pixel
    tensors, which the cache already holds). With ``sampling.graphs`` the decode is
    :func:`~vlm_treegrpo.rollout.graphs.graph_decode` (steps replayed from a CUDA graph), the same
    samples. Rows that contain a stop string stop early;
    ``suppress_ids`` are never generated (e.g. image placeholder tokens). ``state``: the
    model's per-row generation state (:class:`RowState`: repeated with the rows' copies, kept
    for the rows left when finished rows are dropped; none for a text model). With ``sampling.compile`` the cache is a static
    one (:func:`static_cache`) and ``generate`` decodes through the compiled forward.

    ``prefilled``: the rows' cache, already made (:func:`continuation_cache`; every column but
    the last, repeated ``n`` times), in place of the shared prefill. ``keep``: a list that gets
    this pass's :class:`ThoughtPass`, for its continuations.
    """
    eos = eos_ids_of(tokenizer, model)
    device = next(model.parameters()).device

    def on_device(kwargs: dict) -> dict:  # (precomputed image features stay as they are)
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in kwargs.items()}

    inputs = on_device(inputs)
    prompt_len = inputs["input_ids"].shape[1]
    gen_cfg = sampling.generation_config(max_new_tokens, tokenizer.pad_token_id, eos)
    if suppress_ids and sampling.greedy:  # (a sampled call suppresses in its Sampler)
        gen_cfg.suppress_tokens = list(suppress_ids)
    # (decode steps replayed from a CUDA graph; greedy suppression stays with generate)
    graphed = wanted(sampling.graphs, device) and prompt_len > 1 and not (suppress_ids and sampling.greedy) and supports(model)
    with decode_attention(model):
        if prefilled is None and prompt_len > 1 and (n > 1 or graphed):
            prefilled = prefill_shared(model, inputs, n, state)
        if prefilled is not None:
            inputs = on_device(decode_inputs) if decode_inputs is not None else {
                k: v.repeat_interleave(n, dim=0) for k, v in inputs.items() if k in TOKEN_KEYS}
        elif n > 1:  # a one-token prompt: nothing to share; greedy generate takes one sequence per row
            inputs = {k: v.repeat_interleave(n, dim=0) for k, v in inputs.items()}
        rule = StopRule(eos, tokenizer, stop_strings or ())
        if graphed:  # (prefilled: supports() asked for plain layers, and prompt_len > 1 made a prefill)
            out, pieces = graph_decode(model, inputs, prefilled, max_new_tokens, tokenizer.pad_token_id,
                                       sampling.logits_processors(suppress_ids or ()), rule, state, keep_cache=keep is not None)
            pass_state = state.get() if state is not None else None
        else:
            if sampling.compile:
                cache = static_cache(model, prompt_len + max_new_tokens, prefilled)
            else:
                cache = prefilled if prefilled is not None else DynamicCache(config=model.config)  # (ours: it outlives generate)
            with neutral_generation_config(model):
                out, pieces, pass_state = decode(model, inputs, cache, gen_cfg, sampling.logits_processors(suppress_ids or ()), rule,
                                                 drop=sampling.drop_finished and not sampling.compile, state=state,
                                                 stash=keep is not None)  # [B*n, prompt_len + new]
    if keep is not None:
        keep.append(ThoughtPass(pieces, prompt_len, pass_state))
    return cut_completions(out, prompt_len, tokenizer, eos, stop_strings)


def generate(
    model,
    tokenizer,
    seqs: list[list[int]],
    n: int,
    max_new_tokens: int,
    sampling: SamplingParams,
    stop_strings: list[str] | None = None,
    keep: list | None = None,
    reuse: tuple[ThoughtPass, list[int], list[int]] | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """Sample ``n`` continuations of every token-id sequence in one batched ``generate`` call.

    Returns ``(new_ids, ended)`` for the ``len(seqs) * n`` outputs (sequence-major): the new
    tokens of each, cut after the first EOS (kept) or after a stop string, and whether it
    ended with EOS. ``keep``: see :func:`generate_batch`. ``reuse = (thought_pass, rows,
    thought_lens)``: the sequences are those rows' prompt + thought, whose cache is taken from
    the thought pass (:func:`continuation_cache`) rather than prefilled again.
    """
    input_ids, attention_mask = left_pad(seqs, tokenizer.pad_token_id, "cpu")
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    prefilled = None
    if reuse is not None and input_ids.shape[1] > 1:
        prefilled = continuation_cache(*reuse, input_ids.shape[1], n)
    return generate_batch(model, tokenizer, inputs, n, max_new_tokens, sampling, stop_strings, prefilled=prefilled, keep=keep)


GenerateFn = Callable[[list, int, int, "list[str] | None"], tuple[list[list[int]], list[bool]]]
"""``gen(prompts, n, max_new_tokens, stop_strings) -> (new_ids, ended)``: ``n`` samples per
prompt, sequence-major, as :func:`generate` returns them."""


def grow_trees(
    prompts: list,
    ids_of: Callable[[Any], list[int]],
    extend: Callable[[Any, list[int]], Any],
    gen: GenerateFn,
    K: int,
    M: int,
    thought_max_tokens: int,
    answer_max_tokens: int,
    branch_delimiters: list[str] | None = None,
) -> list[Tree]:
    """Sample a K x M tree for every prompt, whatever a prompt is.

    ``ids_of(prompt)`` gives its token ids, ``extend(prompt, thought_ids)`` the prompt of a
    continuation (prompt followed by the thought), and ``gen`` samples. Two batched passes: the
    K thoughts of every prompt (stopped at a branch delimiter), then M continuations of every
    unfinished thought. With M = 1 it is flat GRPO: one pass, the whole completion is the thought.
    """
    trees = [Tree(prompt_ids=list(ids_of(p)), prompt=p) for p in prompts]
    if M == 1:
        outs, _ = gen(prompts, K, thought_max_tokens, None)
        for i, tree in enumerate(trees):
            tree.thoughts = outs[i * K : (i + 1) * K]
            tree.thought_done = [True] * K  # nothing is continued
            tree.answers = [[[]] for _ in range(K)]
        return trees
    outs, ended = gen(prompts, K, thought_max_tokens, branch_delimiters or None)
    for i, tree in enumerate(trees):
        tree.thoughts = outs[i * K : (i + 1) * K]
        tree.thought_done = ended[i * K : (i + 1) * K]
        tree.answers = [[[] for _ in range(M)] for _ in range(K)]
    todo = [(i, k) for i, t in enumerate(trees) for k in range(K) if not t.thought_done[k]]
    if todo:
        seqs = [extend(trees[i].prompt, trees[i].thoughts[k]) for i, k in todo]
        conts, _ = gen(seqs, M, answer_max_tokens, None)
        for j, (i, k) in enumerate(todo):
            trees[i].answers[k] = conts[j * M : (j + 1) * M]
    return trees


def resuming_generator(M: int, sample, resume) -> GenerateFn:
    """The ``gen`` of a K x M tree sampler (:func:`grow_trees`) whose continuations resume the
    thought pass's KV cache instead of prefilling prompt + thought again.

    ``sample(prompts, n, max_new_tokens, stop, keep)`` samples (``keep``: None, or a list that
    gets the pass's :class:`ThoughtPass`); ``resume(prompts, n, max_new_tokens, (thought_pass,
    rows, thought_lens))`` samples the continuations of those thought-pass rows from its cache,
    or returns None where it cannot (the prompts are then sampled afresh). ``grow_trees`` asks
    first for the thoughts, then for the continuations of the unfinished ones, in row order.
    """
    kept: list[ThoughtPass] = []
    thoughts: list[tuple[list[list[int]], list[bool]]] = []

    def gen(prompts, n, max_new_tokens, stop):
        if M > 1 and not thoughts:  # the thought pass: keep its cache
            out = sample(prompts, n, max_new_tokens, stop, kept)
            thoughts.append(out)
            return out
        if kept:  # the continuations of the unfinished thoughts, in row order
            ids, ended = thoughts[0]
            rows = [r for r, done in enumerate(ended) if not done]
            thought = kept.pop()
            if len(rows) == len(prompts):
                out = resume(prompts, n, max_new_tokens, (thought, rows, [len(ids[r]) for r in rows]))
                if out is not None:
                    return out
        return sample(prompts, n, max_new_tokens, stop, None)

    return gen


def sample_trees(
    model,
    tokenizer,
    prompts: list[list[int]],
    K: int,
    M: int,
    thought_max_tokens: int,
    answer_max_tokens: int,
    sampling: SamplingParams,
    branch_delimiters: list[str] | None = None,
) -> list[Tree]:
    """Sample a K x M tree for every prompt (token-id lists, already chat-formatted).

    The continuations start from the thought pass's KV cache (:func:`continuation_cache`): each
    prompt + thought is not prefilled a second time."""
    def sample(seqs, n, max_new_tokens, stop, keep):
        return generate(model, tokenizer, seqs, n, max_new_tokens, sampling, stop, keep=keep)

    def resume(seqs, n, max_new_tokens, reuse):
        return generate(model, tokenizer, seqs, n, max_new_tokens, sampling, None, reuse=reuse)

    gen = resuming_generator(M, sample, resume)

    return grow_trees(
        prompts, list, lambda p, thought: list(p) + thought, gen, K, M, thought_max_tokens, answer_max_tokens, branch_delimiters
    )
