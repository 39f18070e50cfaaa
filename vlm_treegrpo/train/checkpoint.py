"""Resumable training state: what a GRPO run needs to go on exactly where it stopped.

``log.checkpoint_every = N`` writes ``<run>/checkpoint/`` every N steps and after the last one;
a run stopped by SIGTERM or SIGINT (:mod:`vlm_treegrpo.train.interrupt`) writes one whatever N is.
``log.resume = auto`` (resume if there is a checkpoint) or ``must`` (fail if there is none)
continues from it: the trained weights (all of them, or the LoRA adapters), the AdamW moments,
the schedule, the prompt sampler's position, every process's random number generators and the
summary fields measured before the first step. Resumed, a run makes the same steps, bit for bit,
as one that was never stopped (``tests/test_checkpoint.py``).

The directory holds ``model.pt`` (the trainable parameters by name), ``reference.pt`` (the KL
reference's, when ``algo.beta > 0`` without LoRA), ``optimizer.pt`` (optimizer and schedule),
``trainer.pt`` (sampler, summary so far, counters), ``rng-<rank>.pt`` per process and, written
last, ``meta.json`` (step, processes, run id, config, and the size of every file), whose presence
marks a complete checkpoint. How a checkpoint is written so that a kill at any moment leaves the
previous one whole and findable, how many are kept (``log.checkpoint_keep``) and what happens when
the disk is full is :mod:`vlm_treegrpo.train.checkpoint_dir`. The reference is frozen for a run, so a
checkpoint whose predecessor has the same run id (:attr:`TrainerState.run_id`, kept through
resumes) hard-links its ``reference.pt`` instead of writing the weights again. Under
``torchrun`` the run directory must be on a file system every process sees.

A checkpoint is also a model (:func:`load_policy`: ``eval --model``, ``model.name``, ``export``),
as is ``<run>/best``, the weights of the best evaluation so far (``log.save_best``,
:func:`save_best`).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlm_treegrpo.config import ConfigError, TrainConfig, config_from_dict
from vlm_treegrpo.train import checkpoint_dir
from vlm_treegrpo.train.distributed import Dist

DIR = checkpoint_dir.DIR
BEST = "best"
FILES = ("model.pt", "optimizer.pt", "trainer.pt")
"""Files every training checkpoint holds (what a ``meta.json`` without a file list must find)."""

MAY_CHANGE = ("optim.steps", "optim.time_budget_s", "optim.max_nonfinite_steps", "algo.reward_timeout_s", "model.threads",
              "model.device", "model.gradient_checkpointing", "eval.", "log.")
"""Config fields a resumed run may set differently from the checkpoint's (a prefix ends with a
dot); any other difference stops the run with a :class:`~vlm_treegrpo.config.ConfigError` that
names the field."""


@dataclass
class TrainerState:
    """The loop's own state at the end of step ``step``."""

    step: int
    sampler: dict
    summary: dict = field(default_factory=dict)
    """Summary fields measured before the first GRPO step (``eval_before``, the warm start's)."""
    failures_total: dict = field(default_factory=dict)
    last_diag: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    """Seconds of GRPO steps so far, over every session of the run."""
    best: dict = field(default_factory=dict)
    """``{"step", "accuracy"}`` of the weights in ``<run>/best`` (``log.save_best``)."""
    run_id: str = ""
    """Names the run (a fresh run draws one, a resumed run keeps its checkpoint's): the reference
    in a checkpoint with the same run id is this run's frozen reference."""
    updates_skipped: int = 0
    """Optimizer updates skipped so far for a non-finite gradient."""


def new_run_id() -> str:
    return uuid.uuid4().hex


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (all, or the LoRA adapters), by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_params(model: torch.nn.Module, saved: dict[str, torch.Tensor], what: Path) -> None:
    params = trainable(model)
    if set(params) != set(saved):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ConfigError(f"log.resume: {what} does not fit this model (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise ConfigError(f"log.resume: {what}: {name} has shape {tuple(saved[name].shape)}, the model {tuple(p.shape)}")
            p.copy_(saved[name])


def rng_state(device: torch.device) -> dict:
    """The random number generators a step draws from: torch's (and CUDA's on a GPU), Python's."""
    out = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def saved_config(values: dict) -> dict:
    """A checkpoint's config as this version reads it. One written before ``model.lora_vision``
    existed put LoRA on the vision tower too, so it reads as ``lora_vision: true``."""
    model = values.get("model", {})
    if "lora_vision" not in model:
        values = {**values, "model": {**model, "lora_vision": True}}
    return values


def check_compatible(saved: dict, cfg: TrainConfig, where: Path) -> None:
    """Stop (naming the field) when ``cfg`` differs from the checkpoint's config ``saved``
    outside :data:`MAY_CHANGE`. A field the checkpoint's config lacks (it is older than the field)
    compares as its default."""
    old, now = _flat(config_from_dict(saved_config(saved)).to_dict()), _flat(cfg.to_dict())
    for key in sorted(set(old) | set(now)):
        if any(key == m or (m.endswith(".") and key.startswith(m)) for m in MAY_CHANGE):
            continue
        if old.get(key) != now.get(key):
            raise ConfigError(f"{key}: the checkpoint in {where} was trained with {old.get(key)!r}, this run sets {now.get(key)!r} "
                              f"(a resumed run may change only {', '.join(m + '*' if m.endswith('.') else m for m in MAY_CHANGE)})")


def find(run: Path) -> Path | None:
    """The newest whole checkpoint of ``run``, or None; a directory that is not whole is skipped
    with a warning (:func:`~vlm_treegrpo.train.checkpoint_dir.find`)."""
    return checkpoint_dir.find(run, FILES)


def read_meta(path: Path) -> dict:
    """The ``meta.json`` of a whole checkpoint (or of ``best``); a :class:`ConfigError` naming
    the path when there is none or it cannot be read."""
    try:
        return json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{Path(path) / 'meta.json'}: not a readable checkpoint ({type(err).__name__}: {err})") from err


def save(run: Path, state: TrainerState, model, optimizer, scheduler, ref_model, cfg: TrainConfig, device: torch.device,
         dist: Dist = Dist()) -> float:
    """Write the checkpoint of ``state`` to ``run/checkpoint`` (every process calls this: each
    writes its generators, process 0 the rest) by the protocol of
    :mod:`~vlm_treegrpo.train.checkpoint_dir`; returns the seconds it took. Raises
    :class:`~vlm_treegrpo.train.checkpoint_dir.DiskFull` (the previous checkpoint kept) when the
    disk has no room for it."""
    t0 = time.time()
    tmp = checkpoint_dir.tmp_dir(run, state.step)
    if dist.main:
        tmp = checkpoint_dir.prepare(run, state.step)
    dist.barrier()
    torch.save(rng_state(device), tmp / f"rng-{dist.rank}.pt")
    dist.barrier()  # (every process's generators are on disk before the checkpoint is committed)

    def payload(into: Path) -> None:
        torch.save({n: p.detach().cpu() for n, p in trainable(model).items()}, into / "model.pt")
        if ref_model is not None:
            save_reference(ref_model, run / DIR, into, state.run_id)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, into / "optimizer.pt")
        torch.save(vars(state), into / "trainer.pt")

    if dist.main:
        checkpoint_dir.commit(run, tmp, state.step, {"processes": dist.world, "run_id": state.run_id, "saved_at": time.time(),
                                                     "config": cfg.to_dict()}, payload, keep=cfg.log.checkpoint_keep)
    dist.barrier()
    return time.time() - t0


def save_reference(ref_model, previous: Path, tmp: Path, run_id: str) -> bool:
    """``tmp/reference.pt``: a hard link to ``previous``'s when that checkpoint is this run's
    (same ``run_id``: the reference is frozen for a run), else the weights written anew. Returns
    whether it linked. A checkpoint of another run in the same directory, or a file system
    without hard links, gets the weights written."""
    target = tmp / "reference.pt"
    old = previous / "reference.pt"
    meta = checkpoint_dir.read_whole(previous, ("reference.pt",))
    if run_id and old.is_file() and meta is not None and meta.get("run_id") == run_id:
        try:
            os.link(old, target)
            return True
        except OSError:
            pass
    torch.save({n: p.detach().cpu() for n, p in ref_model.named_parameters()}, target)
    return False


def load(path: Path, model, optimizer, scheduler, ref_model, device: torch.device, dist: Dist = Dist()) -> tuple[TrainerState, bool]:
    """Restore ``path`` into the freshly built ``model`` (and ``ref_model``), ``optimizer`` and
    ``scheduler``; returns the loop's state and whether this process's generators were restored
    (not when the checkpoint was written by fewer processes than this run has)."""
    load_params(model, torch.load(path / "model.pt", map_location="cpu", weights_only=True), path / "model.pt")
    if ref_model is not None:
        saved = torch.load(path / "reference.pt", map_location="cpu", weights_only=True)
        with torch.no_grad():
            for name, p in ref_model.named_parameters():
                p.copy_(saved[name])
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    state = TrainerState(**torch.load(path / "trainer.pt", map_location="cpu", weights_only=True))
    rng = path / f"rng-{dist.rank}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=True), device)
    return state, rng.exists()


def save_best(run: Path, model, cfg: TrainConfig, step: int, accuracy: float) -> Path:
    """Write ``model``'s trainable weights to ``run/best`` (replacing what is there, by a rename)
    with a ``meta.json`` of ``step`` and ``accuracy``: a directory :func:`load_policy` (and so
    ``eval --model`` and ``export``) reads, though not one a run resumes from."""
    tmp, final = run / f"{BEST}.tmp", run / BEST
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({n: p.detach().cpu() for n, p in trainable(model).items()}, tmp / "model.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "accuracy": accuracy, "saved_at": time.time(), "config": cfg.to_dict()}, indent=1))
    if final.exists():  # (out of sight by one rename before it is deleted: never a half-deleted best)
        trash = run / f"{BEST}{checkpoint_dir.TRASH}{uuid.uuid4().hex[:8]}"
        final.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    tmp.rename(final)
    return final


def is_checkpoint(path) -> bool:
    """Whether ``path`` is a complete checkpoint directory (or ``best``)."""
    return checkpoint_dir.read_whole(Path(path), ("model.pt",)) is not None


def keep_rows(path: Path, last_step: int) -> None:
    """Drop the lines of a ``step``-keyed JSONL log written after ``last_step`` (steps the
    resumed run makes again), and a last line cut short by a kill."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if (row := _row(line)) is not None and row.get("step", 0) <= last_step]
    path.write_text("".join(r + "\n" for r in rows))


def _row(line: str) -> dict | None:
    """A JSONL line's object; None for a blank line or one cut short by a kill mid-write."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None
