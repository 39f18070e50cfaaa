"""Throughput of a step: tokens/s overall (EasyR1's measure), of the rollout and of the update,
and the update's model FLOPs utilisation against the device's published peak."""
from __future__ import annotations

import torch

PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM (torch names it "NVIDIA H100 80GB HBM3")
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
)
"""Dense bf16 tensor-core peak (no sparsity) from NVIDIA's datasheets, by a substring of
``torch.cuda.get_device_name`` (first match wins, so more specific names come first)."""


def peak_for_name(name: str) -> dict:
    """``{"device", "peak_tflops", "dtype", "reason"}`` for a device name; ``peak_tflops`` is None
    (and ``reason`` says why) for a device not in :data:`PEAK_BF16_TFLOPS`."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return {"device": name, "peak_tflops": tflops, "dtype": "bf16 dense", "reason": f"NVIDIA datasheet, {key}"}
    return {"device": name, "peak_tflops": None, "dtype": None,
            "reason": "no published peak in the table (vlm_treegrpo/train/throughput.py): update_mfu is null"}


def device_peak(device: torch.device) -> dict:
    """The peak used for ``update_mfu`` on ``device`` (:func:`peak_for_name`); a CPU has none:
    its peak depends on cores, clocks and vector units, and this machine's share of them."""
    if device.type == "cuda":
        return peak_for_name(torch.cuda.get_device_name(device))
    return {"device": device.type, "peak_tflops": None, "dtype": None,
            "reason": "no peak FLOPs for a CPU (cores, clocks and vector units vary): update_mfu is null"}


def throughput(prompt_response_tokens: int, generated_tokens: int, update_tokens: int, step_s: float,
               rollout_s: float, update_s: float, params: int, peak_tflops: float | None) -> dict:
    """A step's rates:

    * ``tokens_per_s``: prompt plus response tokens of every leaf (a prompt counted once per
      leaf, as EasyR1 counts sequences) over the whole step's time;
    * ``rollout_tokens_per_s``: tokens sampled (each thought once, each continuation once) over
      the sampling time;
    * ``update_tokens_per_s``: tokens through the training forward and backward (padding
      included) over the update's time;
    * ``update_mfu``: ``6 x params x update_tokens / update_s / peak``; None without a peak.
    """
    def rate(n: float, s: float) -> float | None:
        return n / s if s > 0 else None

    flops = 6.0 * params * update_tokens
    return {
        "tokens_per_s": rate(prompt_response_tokens, step_s),
        "rollout_tokens_per_s": rate(generated_tokens, rollout_s),
        "update_tokens_per_s": rate(update_tokens, update_s),
        "update_mfu": rate(flops, update_s * peak_tflops * 1e12) if peak_tflops and update_s > 0 else None,
    }
