"""The vision-language policy: the :class:`~vlm_treegrpo.policy.base.Policy` interface over a family adapter.

The trainer, the tree sampler (:func:`vlm_treegrpo.rollout.tree.grow_trees`), the rewards and the
losses are the text path's; only what touches the model differs, and that goes through the
family's :class:`~vlm_treegrpo.vlm.adapter.VLMAdapter`:

* **Prompts** are :class:`~vlm_treegrpo.vlm.adapter.Encoded` (the processor runs once per prompt,
  in :meth:`VLMPolicy.encode`). Sampling collates them, each repeated once per sample, and calls
  ``model.generate`` with their image tensors; a continuation's prompt is the Encoded prompt with
  the thought's ids appended (:func:`with_completion`): same image tensors, nothing re-processed.
  Image placeholder tokens are never sampled (one without an image behind it breaks the forward).
* **Training batch**: one row PER TREE (:mod:`vlm_treegrpo.vlm.tree_batch`): the prompt with its
  image tokens once, each thought once, each continuation once, under a 4-D tree mask with the
  family's own prompt positions (Qwen's mRoPE included), as on the text path. Families whose
  forward builds its own non-causal mask (Gemma3's bidirectional image blocks;
  ``VLMAdapter.tree_packing = False``) get one row PER LEAF (:class:`LeafBatch`, prompt then
  thought + continuation). There GRPO-MA (arXiv 2509.24494) still trains each thought once with
  its thought advantage: a thought that was continued appears in its M leaf rows with weight
  ``1/M`` on each of its tokens in ``target_mask``, so it counts once under ``token_mean``;
  continuation tokens weigh 1. A finished thought (EOS inside its budget, its M leaves
  identical) is one row with weight 1. Departure: under ``agg: seq_mean`` the rows averaged are
  leaves there, trees on the packed paths.
* **Images in the forward**: both batches call ``adapter.forward_logits`` with image dedupe, so
  each distinct image goes through the vision tower once per forward (per micro-batch of rows),
  however many rows repeat it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from vlm_treegrpo.data.images import decoded
from vlm_treegrpo.data.types import Example
from vlm_treegrpo.models.loader import pick_attn_implementation, pick_dtype, save_weights
from vlm_treegrpo.rollout.kv_cache import continuation_cache
from vlm_treegrpo.rollout.logprobs import entropy_wanted, logsumexp_and_entropy, record_entropy
from vlm_treegrpo.rollout.prompts import user_message
from vlm_treegrpo.rollout.tree import SamplingParams, Tree, generate_batch, grow_trees, resuming_generator
from vlm_treegrpo.vlm.adapter import Encoded, VLMAdapter
from vlm_treegrpo.vlm.batching import flat_image_keys
from vlm_treegrpo.vlm.registry import get_adapter
from vlm_treegrpo.vlm.tree_batch import VLMTreeBatch, pack_vlm_trees


def with_completion(prompt: Encoded, ids: list[int]) -> Encoded:
    """``prompt`` followed by generated ``ids``: the same image tensors, per-token extras 0 (= text)
    on the new tokens, as :meth:`VLMAdapter.append_completion` does for a batch."""
    new = torch.tensor(ids, dtype=prompt.input_ids.dtype)  # [n]
    return dataclasses.replace(
        prompt,
        input_ids=torch.cat([prompt.input_ids, new]),  # [T + n]
        token_inputs={k: torch.cat([v, v.new_zeros(len(ids))]) for k, v in prompt.token_inputs.items()},
    )


@dataclass
class LeafBatch:
    """Leaves as rows: each row's prompt (left-padded, with its images) then its completion
    (right-padded). ``L = T + C`` (prompt width + completion width).

    Rows are rebuilt from the per-row prompts by :meth:`rows`, so any subset collates its own
    image tensors (which are concatenated per image / patch and cannot be sliced by row).
    """

    prompts: list[Encoded]
    """The prompt of each row (shared objects, not copies)."""
    completion_ids: Tensor  # [B, C]
    completion_mask: Tensor  # [B, C] long, 1 on the completion's tokens
    weights: Tensor  # [B, C] float per-token weight (1/M on a continued thought, 1 elsewhere)
    completion_adv: Tensor  # [B, C] thought_adv on thought tokens, answer_adv on continuation tokens
    thought_flag: Tensor  # [B, C] bool, tokens of a continued (unfinished) thought
    leaf: Tensor  # [B, 3] long: (tree, thought k, continuation m) of the row
    inputs: dict[str, Tensor]
    """Model kwargs of the rows (``adapter.collate`` + ``append_completion``): ``input_ids [B, L]``,
    ``attention_mask [B, L]``, image tensors, per-token extras."""
    image_keys: tuple
    """The batch's images in concatenation order (for the dedupe forward)."""
    target_mask: Tensor  # [B, L] float weights, 0 on prompt and padding
    advantages: Tensor  # [B, L]
    is_thought: Tensor  # [B, L] bool
    adapter: VLMAdapter
    pad_id: int

    @property
    def input_ids(self) -> Tensor:
        return self.inputs["input_ids"]  # [B, L]

    def rows(self, sel: slice | Tensor) -> "LeafBatch":
        """The rows ``sel`` (slice, index or bool tensor), re-collated; completions trimmed to the
        longest selected one."""
        idx = torch.arange(len(self.prompts), device=self.completion_ids.device)[sel]
        keep = idx.tolist()
        width = max(1, int(self.completion_mask[idx].sum(-1).max())) if keep else 1
        return leaf_batch(
            self.adapter,
            self.pad_id,
            [self.prompts[i] for i in keep],
            *(t[idx][:, :width] for t in (self.completion_ids, self.completion_mask, self.weights, self.completion_adv, self.thought_flag)),
            self.leaf[idx],
        )

    def logp(self, model, temperature: float = 1.0) -> Tensor:
        """Per-token log-probs ``[B, L]`` of the completion tokens (0 on prompt, padding and
        zero-weight tokens). Only the completion's predictor positions get logits."""
        B, C = self.completion_ids.shape
        T = self.input_ids.shape[1] - C
        logits = self.adapter.forward_logits(
            model, self.inputs, image_keys=self.image_keys, dedupe_images=True, logits_to_keep=C + 1
        )  # [B, C+1, V]: positions T-1 .. T+C-1
        logits = logits[:, :C].float()  # [B, C, V] the predictor of each completion token
        if temperature != 1.0:
            logits = logits / temperature
        picked = logits.gather(-1, self.completion_ids[..., None]).squeeze(-1)  # [B, C]
        lse = torch.logsumexp(logits, dim=-1)  # [B, C]
        logp = picked - lse
        if entropy_wanted():
            with torch.no_grad():
                record_entropy((logsumexp_and_entropy(logits)[1] * self.weights).sum(), self.weights.sum())
        logp = torch.where(self.weights > 0, logp, torch.zeros_like(logp))
        return torch.cat([logp.new_zeros((B, T)), logp], dim=1)  # [B, T+C]

    def to(self, device) -> "LeafBatch":
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), Tensor)}
        return dataclasses.replace(self, inputs={k: v.to(device) for k, v in self.inputs.items()}, **moved)


def leaf_batch(
    adapter: VLMAdapter,
    pad_id: int,
    prompts: list[Encoded],
    completion_ids: Tensor,
    completion_mask: Tensor,
    weights: Tensor,
    completion_adv: Tensor,
    thought_flag: Tensor,
    leaf: Tensor,
) -> LeafBatch:
    """Collate ``prompts`` with their right-padded completions ``[B, C]`` into a :class:`LeafBatch`
    on the device of ``completion_ids``."""
    device = completion_ids.device
    if prompts:
        prompt_batch = adapter.collate(prompts, pad_id)
        inputs = adapter.append_completion(prompt_batch, completion_ids.cpu(), completion_mask.cpu())
        inputs = {k: v.to(device) for k, v in inputs.items()}
    else:  # nothing selected: an empty batch the trainer skips
        inputs = {"input_ids": completion_ids, "attention_mask": completion_mask}
    B, C = completion_ids.shape
    T = inputs["input_ids"].shape[1] - C

    def left(t: Tensor) -> Tensor:  # [B, C] -> [B, T + C], zeros over the prompt
        return torch.cat([t.new_zeros((B, T)), t], dim=1)

    return LeafBatch(
        prompts=list(prompts),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        weights=weights,
        completion_adv=completion_adv,
        thought_flag=thought_flag,
        leaf=leaf,
        inputs=inputs,
        image_keys=flat_image_keys(prompts),
        target_mask=left(weights),
        advantages=left(completion_adv),
        is_thought=left(thought_flag),
        adapter=adapter,
        pad_id=pad_id,
    )


def _right_pad(rows: list[list], value, dtype: torch.dtype) -> Tensor:
    """Right-pad equal-typed lists into ``[B, max(1, longest)]``."""
    width = max([1, *map(len, rows)])
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


class VLMPolicy:
    """A vision-language model, its processor and its family adapter (see the module docstring)."""

    def __init__(self, model, processor, adapter: VLMAdapter):
        self.model, self.processor, self.adapter = model, processor, adapter
        self.tokenizer = processor.tokenizer
        self.reuse_thought_cache = True
        """Continuations resume the thought pass's KV cache (off: prompt + thought prefilled again)."""
        self.warm_start: str | None = None
        """What warm-started this model before the run (an alignment stage), if anything: the
        trainer then also reports its ``eval_before`` as ``eval_warm``."""

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def limit_pixels(self, min_pixels: int, max_pixels: int) -> None:
        """Bound each image's pixel count in the processor (:meth:`VLMAdapter.limit_pixels`; 0 = the
        processor's own bound); ValueError for a family whose processor takes no bounds."""
        self.adapter.limit_pixels(self.processor, min_pixels, max_pixels)

    def encode(self, example: Example, instruction: str) -> Encoded:
        """Process the prompt (question + instruction) with the example's images, once."""
        return self.adapter.encode(self.processor, user_message(example, instruction), decoded(example.images), example.system)

    def _generate(self, prompts: list[Encoded], n: int, max_new_tokens: int, sampling: SamplingParams, stop_strings=None, keep=None):
        """``n`` samples per prompt (sequence-major). Each prompt, its images included, is
        prefilled once (distinct images encoded once, ``mm_encoder_outputs``); ``generate`` then
        continues the ``n`` copies, re-collated without their pixel tensors (image tensors are
        concatenated per image, so copies are re-collated rather than expanded)."""
        inputs = {k: v.to(self.model.device) for k, v in self.adapter.collate(prompts, self.pad_id).items()}
        with torch.no_grad():
            inputs = self.adapter.unique_image_inputs(self.model, inputs, flat_image_keys(prompts))
        copies = self._copies(prompts, n) if n > 1 else None
        suppress = self.adapter.placeholder_token_ids(self.model)
        return generate_batch(self.model, self.tokenizer, inputs, n, max_new_tokens, sampling, stop_strings, suppress, copies,
                              self.adapter.row_state(self.model), keep=keep)

    def _resume(self, prompts: list[Encoded], n: int, max_new_tokens: int, sampling: SamplingParams, reuse):
        """``n`` continuations of each prompt + thought, from the thought pass's cache
        (:func:`~vlm_treegrpo.rollout.kv_cache.continuation_cache`): no image is encoded and no prompt
        prefilled again. None where the cache cannot be reused (a sliding window)."""
        thought, rows, lens = reuse
        copies = self._copies(prompts, n)
        cache = continuation_cache(thought, rows, lens, copies["input_ids"].shape[1], n)
        if cache is None:
            return None
        state = self.adapter.row_state(self.model)
        state.set(thought.state)
        state.select(rows, n)
        suppress = self.adapter.placeholder_token_ids(self.model)
        # (the copies are the decode batch itself; as ``inputs`` they only give the prompt width)
        return generate_batch(self.model, self.tokenizer, copies, n, max_new_tokens, sampling, None, suppress, copies,
                              state, prefilled=cache)

    def _copies(self, prompts: list[Encoded], n: int) -> dict[str, Tensor]:
        """The ``n`` copies of each prompt (row-major), collated without their pixel tensors: the
        batch ``generate`` decodes once the prompts' cache holds the images."""
        repeated = [p for p in prompts for _ in range(n)]
        return {k: v for k, v in self.adapter.collate(repeated, self.pad_id).items() if not k.startswith("pixel_")}

    def sample(self, prompts, K, M, thought_max_tokens, answer_max_tokens, sampling, branch_delimiters) -> list[Tree]:
        """K x M trees; the continuations resume the thought pass's KV cache
        (:func:`~vlm_treegrpo.rollout.tree.resuming_generator`) unless ``reuse_thought_cache`` is off."""
        def sample_(items, n, max_new_tokens, stop, keep):
            return self._generate(items, n, max_new_tokens, sampling, stop, keep if self.reuse_thought_cache else None)

        def resume(items, n, max_new_tokens, reuse):
            return self._resume(items, n, max_new_tokens, sampling, reuse)

        gen = resuming_generator(M, sample_, resume)
        return grow_trees(
            prompts, lambda p: p.input_ids.tolist(), with_completion, gen, K, M, thought_max_tokens, answer_max_tokens, branch_delimiters
        )

    def greedy(self, prompts, max_new_tokens) -> list[list[int]]:
        outs, _ = self._generate(prompts, 1, max_new_tokens, SamplingParams(greedy=True))
        return outs

    def pack(self, trees: list[Tree], thought_adv: Tensor, answer_adv: Tensor) -> "LeafBatch | VLMTreeBatch":
        """The training batch: one row per tree where the family packs trees
        (:mod:`vlm_treegrpo.vlm.tree_batch`), else one row per leaf (:meth:`leaf_rows`);
        ``thought_adv [N, K]``, ``answer_adv [N, K, M]``."""
        if self.adapter.tree_packing:
            return pack_vlm_trees(self.adapter, self.pad_id, trees, thought_adv, answer_adv)
        return self.leaf_rows(trees, thought_adv, answer_adv)

    def leaf_rows(self, trees: list[Tree], thought_adv: Tensor, answer_adv: Tensor) -> LeafBatch:
        """One row per leaf (see the module docstring)."""
        prompts, comps, weights, advs, flags, leaves = [], [], [], [], [], []
        for n, tree in enumerate(trees):
            for k, thought in enumerate(tree.thoughts):
                done = tree.thought_done[k]
                conts = [[]] if done else tree.answers[k]
                w = 1.0 / len(conts)
                for m, ans in enumerate(conts):
                    prompts.append(tree.prompt)
                    comps.append(thought + ans)
                    weights.append([w] * len(thought) + [1.0] * len(ans))
                    a_ans = 0.0 if done else float(answer_adv[n, k, m])
                    advs.append([float(thought_adv[n, k])] * len(thought) + [a_ans] * len(ans))
                    flags.append([not done] * len(thought) + [False] * len(ans))
                    leaves.append([n, k, m])
        ids = _right_pad(comps, self.pad_id, torch.long)  # [B, C]
        mask = _right_pad([[1] * len(c) for c in comps], 0, torch.long)  # [B, C]
        return leaf_batch(
            self.adapter,
            self.pad_id,
            prompts,
            ids,
            mask,
            _right_pad(weights, 0.0, torch.float32),
            _right_pad(advs, 0.0, torch.float32),
            _right_pad(flags, False, torch.bool),
            torch.tensor(leaves, dtype=torch.long).view(-1, 3),
        )

    def logp(self, batch: "LeafBatch | VLMTreeBatch", temperature: float = 1.0) -> Tensor:
        """Per-token log-probs ``[B, L]`` of the batch's completion tokens (0 elsewhere)."""
        return batch.logp(self.model, temperature)

    def decode(self, ids: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        """The weights and the processor, loadable by name as a local directory; a LoRA model is
        saved merged, and its adapters in ``path/adapter`` (:func:`~vlm_treegrpo.models.loader.save_weights`)."""
        self.model = save_weights(self.model, path)
        self.processor.save_pretrained(path)


def _ready(model, processor, adapter: VLMAdapter, device) -> VLMPolicy:
    """Left padding, a pad token, the pad id on the configs, model on ``device``."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config.eos_token_id is None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
    return VLMPolicy(model, processor, adapter)


def tiny_vlm_policy(family: str, device, dtype: str = "auto", attn_implementation: str = "auto", seed: int = 0) -> VLMPolicy:
    """The family's seeded random-init tiny model (``adapter.build_tiny``), offline."""
    adapter = get_adapter(family)
    model, processor = adapter.build_tiny(seed=seed)
    model = model.to(pick_dtype(device, dtype))
    if attn_implementation != "auto":
        model.set_attn_implementation(attn_implementation)
    return _ready(model, processor, adapter, device)


def random_vlm_policy(adapter: VLMAdapter, shape, device, dtype: str = "auto", attn_implementation: str = "auto",
                      layers: int | None = None, seed: int = 0) -> VLMPolicy:
    """A released VLM architecture with seeded random weights (``adapter.build_random``), offline."""
    model, processor = adapter.build_random(shape, layers, seed=seed)
    model = model.to(pick_dtype(device, dtype))
    if attn_implementation != "auto":
        model.set_attn_implementation(attn_implementation)
    return _ready(model, processor, adapter, device)


def load_vlm_policy(family: str, name_or_path: str, device, dtype: str = "auto", attn_implementation: str = "auto") -> VLMPolicy:
    """A real checkpoint (hub id or local directory) through the family adapter's ``load``."""
    adapter = get_adapter(family)
    torch_dtype = pick_dtype(device, dtype)
    attn = attn_implementation
    if attn == "auto":
        attn = pick_attn_implementation(device, torch_dtype)
        if attn == "flash_attention_2" and not adapter.flash_attention:
            attn = "sdpa"
    model, processor = adapter.load(name_or_path, torch_dtype, attn, str(device))
    return _ready(model, processor, adapter, device)
