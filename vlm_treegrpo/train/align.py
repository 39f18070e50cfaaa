"""The alignment stage of ``smolvlm-smollm2``: teach a new image encoder to talk to a frozen LM.

As in the first stage of LLaVA / Idefics-style training, only the image side learns: the
SigLIP tower and the connector of :mod:`vlm_treegrpo.models.smolvlm_smollm2` are trained, the
pretrained SmolLM2-135M-Instruct (embeddings and head included) stays frozen. The objective is
the supervised warm start's (:func:`vlm_treegrpo.train.sft.warm_start`: token-mean NLL of the target
after the prompt, through the same policy packing): the prompt is the image and "Describe the
image.", the target the scene's description ("The cards show 3 and 7.", "There are 2 circles
and 4 squares.", "The bars are 5, 1 and 6 tall."), drawn over every kind and level of
:mod:`vlm_treegrpo.data.visual_math`. The task's questions are never shown.

Departures from SmolVLM's recipe: its encoder is a pretrained SigLIP and its second stage tunes
the whole model on instruction data; here the encoder starts from random weights (there is
nothing to download) and the only data are synthetic descriptions.

:func:`prepare` runs it and caches the result (:func:`~vlm_treegrpo.models.smolvlm_smollm2.model_dir`),
with ``alignment.json`` saying how long it took and how well the aligned model reads held-out
images (greedy descriptions, exact match, per kind).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from vlm_treegrpo.data.types import Example
from vlm_treegrpo.data.visual_math import cell_words, description_examples
from vlm_treegrpo.models import smolvlm_smollm2
from vlm_treegrpo.train.optim import adamw, clipped_step
from vlm_treegrpo.train.sft import warm_start
from vlm_treegrpo.policy.vlm import VLMPolicy, load_vlm_policy
from vlm_treegrpo.vlm.registry import get_adapter


@dataclass(frozen=True)
class AlignSettings:
    """How the alignment stage runs (defaults: the cached ``smolvlm-smollm2``)."""

    ground_steps: int = 300
    """Steps of the grounding warm-up (:func:`ground`; milliseconds each)."""
    ground_batch_size: int = 32
    """Images per grounding step."""
    ground_lr: float = 2e-3
    """AdamW learning rate of the grounding warm-up."""
    steps: int = 200
    """Optimizer steps of the description stage (through the frozen language model)."""
    batch_size: int = 16
    """Descriptions per step."""
    lr: float = 1e-3
    """AdamW learning rate of the encoder and connector (constant)."""
    n_train: int = 2000
    """Distinct training images (cycled through in a seeded order)."""
    n_test: int = 60
    """Held-out images whose greedy descriptions are scored after training."""
    seed: int = 0
    """Seed of the images, the draw order and the encoder's initialisation."""
    threads: int = 1
    """torch CPU threads (0: leave torch's default). One: on a shared 2-core CPU, a step with two
    threads took 3-4x longer than with one (thread barriers wait on descheduled threads)."""
    autocast: bool = True
    """bf16 autocast for the forward and backward (about 2x on CPUs with AVX512-BF16)."""

    def __post_init__(self) -> None:
        if self.ground_steps < 0:
            raise ValueError(f"align.ground_steps: must be >= 0, got {self.ground_steps}")
        for name in ("steps", "batch_size", "ground_batch_size", "n_train", "n_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"align.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "ground_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"align.{name}: must be > 0, got {getattr(self, name)}")


class _Order:
    """Cycles through ``n`` indices in a fresh seeded order each epoch (``take(k)``)."""

    def __init__(self, n: int, seed: int):
        self.n, self.gen, self.order = n, torch.Generator().manual_seed(seed), []

    def take(self, k: int) -> list[int]:
        while len(self.order) < k:
            self.order += torch.randperm(self.n, generator=self.gen).tolist()
        out, self.order = self.order[:k], self.order[k:]
        return out


def freeze_language_model(model) -> list[str]:
    """Freeze everything but the vision tower and the connector; return the names left trainable."""
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(".vision_model." in f".{name}" or ".connector." in f".{name}")
        if p.requires_grad:
            trainable.append(name)
    return trainable


def cell_targets(tokenizer, examples: list[Example]) -> Tensor:
    """Token ids ``[B, 16]`` of each example's cell words (:func:`~vlm_treegrpo.data.visual_math.cell_words`):
    a digit's own token, `` circle`` for a shape, the space token for an empty cell."""
    vocab: dict[str, int] = {}
    rows = []
    for ex in examples:
        row = []
        for word in cell_words(ex.meta):
            if word not in vocab:
                vocab[word] = tokenizer(word if word.isdigit() else f" {word}", add_special_tokens=False)["input_ids"][-1]
            row.append(vocab[word])
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def ground(policy: VLMPolicy, examples: list[Example], prompts: list, settings: AlignSettings, log=None) -> list[dict]:
    """The grounding warm-up: ``settings.ground_steps`` steps of mean squared error between each
    image token (the connector's output for one 16-pixel cell) and the frozen language model's
    input embedding of that cell's word. Only the encoder and connector run, so a step costs
    milliseconds; it gives the description stage image tokens that already read as words."""
    model = policy.model
    core = policy.adapter.core(model)
    table = model.get_input_embeddings().weight.detach()  # [V, D]
    targets = cell_targets(policy.tokenizer, examples)  # [B_all, 16]
    pixels = torch.stack([p.image_inputs["pixel_values"] for p in prompts])  # [B_all, 1, C, H, W]
    masks = torch.stack([p.image_inputs["pixel_attention_mask"] for p in prompts])  # [B_all, 1, H, W]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, settings.ground_lr)
    order = _Order(len(examples), settings.seed + 7)
    model.train()
    rows, t0 = [], time.time()
    for step in range(1, settings.ground_steps + 1):
        idx = torch.tensor(order.take(settings.ground_batch_size))
        features = core.get_image_features(pixels[idx], masks[idx], return_dict=True).pooler_output  # [b, 16, D]
        features = torch.stack(features)  # [b, 16, D] (one image per example)
        loss = (features - table[targets[idx]]).pow(2).mean() / table.pow(2).mean()  # relative MSE
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clipped_step(optimizer, params, 1.0)
        row = {"step": step, "ground_loss": loss.item(), "seconds": round(time.time() - t0, 2)}
        rows.append(row)
        if log is not None:
            log(row)
    model.eval()
    return rows


def describe_accuracy(policy: VLMPolicy, examples: list[Example], batch_size: int = 30) -> dict:
    """Greedy descriptions of ``examples`` scored by exact match, overall and per kind."""
    hits: Counter = Counter()
    totals: Counter = Counter()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        outs = policy.decode(policy.greedy([policy.encode(ex, "") for ex in chunk], 24))
        for ex, text in zip(chunk, outs):
            totals[ex.meta["kind"]] += 1
            hits[ex.meta["kind"]] += int(text.strip() == ex.answer)
    per_kind = {k: round(hits[k] / totals[k], 3) for k in sorted(totals)}
    return {"describe_exact": round(sum(hits.values()) / max(1, sum(totals.values())), 3), "describe_exact_by_kind": per_kind}


def align(policy: VLMPolicy, settings: AlignSettings, log=None) -> dict:
    """Train ``policy``'s encoder and connector on descriptions with its language model frozen
    (all weights trainable again afterwards); returns the stage's summary."""
    train = description_examples(settings.n_train, settings.seed)
    test = description_examples(settings.n_test, settings.seed + 1)
    trainable = freeze_language_model(policy.model)
    prompts = [policy.encode(ex, "") for ex in train]
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if settings.autocast else contextlib.nullcontext
    device = next(policy.model.parameters()).device
    t0 = time.time()
    grounding = ground(policy, train, prompts, settings, log)
    ground_seconds = time.time() - t0
    rows = warm_start(policy, train, prompts, _Order(len(train), settings.seed), settings.steps, settings.lr,
                      settings.batch_size, "{answer}", settings.batch_size, 1.0, device, amp, log)
    seconds = time.time() - t0
    policy.model.requires_grad_(True)
    policy.model.eval()
    scores = describe_accuracy(policy, test)
    return {"settings": asdict(settings), "trainable_params": sum(p.numel() for n, p in policy.model.named_parameters() if n in trainable),
            "total_params": sum(p.numel() for p in policy.model.parameters()), "ground_seconds": round(ground_seconds, 1),
            "align_seconds": round(seconds, 1), "ground_final_loss": round(grounding[-1]["ground_loss"], 4) if grounding else None,
            "final_nll": rows[-1]["nll"], **scores}


def _printer(settings: AlignSettings):
    def log(row: dict) -> None:
        if "ground_loss" in row:
            if row["step"] % 100 == 0 or row["step"] == settings.ground_steps:
                print(f"align: grounding step {row['step']}/{settings.ground_steps} loss {row['ground_loss']:.3f} "
                      f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
        elif row["step"] == 1 or row["step"] % 10 == 0 or row["step"] == settings.steps:
            print(f"align: descriptions step {row['step']}/{settings.steps} nll {row['nll']:.3f} ({row['seconds']:.0f} s)",
                  file=sys.stderr, flush=True)
    return log


def prepare(force: bool = False, settings: AlignSettings = AlignSettings(), quiet: bool = False) -> Path:
    """Make sure the aligned ``smolvlm-smollm2`` is cached; return its directory. Builds and
    aligns it (minutes on a CPU) when it is missing or ``force``."""
    out = smolvlm_smollm2.model_dir()
    if smolvlm_smollm2.is_prepared() and not force:
        return out
    t0 = time.time()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model, processor = smolvlm_smollm2.build(seed=settings.seed)
    policy = VLMPolicy(model, processor, get_adapter("smolvlm"))
    summary = align(policy, settings, None if quiet else _printer(settings))
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    policy.save(staging)
    summary["prepare_seconds"] = round(time.time() - t0, 1)
    (staging / "alignment.json").write_text(json.dumps(summary, indent=2))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    if not quiet:
        print(f"aligned {smolvlm_smollm2.NAME} in {summary['prepare_seconds']:.0f} s: held-out descriptions "
              f"{summary['describe_exact']:.0%} exact {summary['describe_exact_by_kind']} -> {out}", file=sys.stderr, flush=True)
    return out


ALIGNED_VLM = smolvlm_smollm2.NAME


def aligned_vlm_policy(device, dtype: str = "auto", attn_implementation: str = "auto") -> VLMPolicy:
    """The cached aligned ``smolvlm-smollm2`` (aligned first when it is not cached)."""
    path = prepare()
    policy = load_vlm_policy("smolvlm", str(path), device, dtype, attn_implementation)
    policy.warm_start = f"alignment stage of {ALIGNED_VLM} ({path / 'alignment.json'})"
    return policy
