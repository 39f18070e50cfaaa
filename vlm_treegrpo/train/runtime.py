"""What a run trains with: the device, torch's threads, the attention kernels and the precision
(bf16 autocast). The policy that ``model.*`` describes is built by :mod:`vlm_treegrpo.policy.factory`."""
from __future__ import annotations

import contextlib

import torch

from vlm_treegrpo.config import ModelConfig, resolve_autocast


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


GPU_HOST_THREADS = 4
"""torch CPU threads by default when the model runs on a GPU. There the host only runs small
bookkeeping ops and launches kernels, and more threads cost wake-ups: on an H200 host (16 cores)
our SmolLM2-shaped step sampled in 1.13-1.18 s with 4 threads against 1.27-1.88 s with 16."""


def set_threads(threads: int, device: torch.device) -> None:
    """torch's CPU threads for ``model.threads``: that many when set; else all cores on the CPU
    (torch's default, left alone) and :data:`GPU_HOST_THREADS` when the model is on a GPU."""
    if threads:
        torch.set_num_threads(threads)
    elif device.type != "cpu":
        torch.set_num_threads(min(GPU_HOST_THREADS, torch.get_num_threads()))


def disable_sdpa_kernels(names) -> None:
    """Keep torch's sdpa from picking these kernels for the whole process (``flash``,
    ``mem_efficient``, ``cudnn``: ``torch.backends.cuda.enable_<name>_sdp``)."""
    for name in names:
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(False)


def set_attention_kernels(cudnn: bool, device: torch.device) -> None:
    """``model.cudnn_attention``: on a GPU, keep torch's sdpa off cuDNN's kernel unless asked
    (process-wide, as the thread count; ``True`` leaves torch's setting as it is)."""
    if device.type == "cuda" and not cudnn:
        disable_sdpa_kernels(("cudnn",))


def setup(model: ModelConfig, device: torch.device) -> None:
    """What ``model.*`` sets for the whole process on ``device``: the threads and the attention kernels."""
    set_threads(model.threads, device)
    set_attention_kernels(model.cudnn_attention, device)


def autocast_ctx(device: torch.device, kind: str):
    """bf16 autocast for the training forward when asked (``model.autocast``; ``auto`` is bf16 on
    a GPU: :func:`~vlm_treegrpo.config.resolve_autocast`). About 2x faster on CPUs with
    AVX512-BF16/AMX."""
    if resolve_autocast(kind, device.type) == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
