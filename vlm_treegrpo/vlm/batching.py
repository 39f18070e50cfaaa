"""Generic batching helpers shared by every VLM adapter (no family knowledge here).

Prompts are LEFT-padded so that every row's last prompt token sits in the last column, which is
what ``model.generate`` and the tree rollout expect.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["concat_image_inputs", "content_groups", "flat_image_keys", "image_key", "left_pad_ids", "left_pad_token_inputs"]


def left_pad_ids(ids: list[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad 1-D id tensors into ``(input_ids [B, T], attention_mask [B, T])``.

    ``T`` is the longest sample; the mask is 1 on real tokens and 0 on the left padding.
    """
    if not ids:
        raise ValueError("left_pad_ids needs at least one sample")
    lengths = torch.tensor([len(x) for x in ids])  # [B]
    T = int(lengths.max())
    real = torch.arange(T) >= T - lengths[:, None]  # [B, T]: each row's last len(x) columns
    out = torch.full((len(ids), T), pad_id, dtype=ids[0].dtype)  # [B, T]
    out[real] = torch.cat(list(ids)).to(out.dtype)  # row-major: each row's tokens in order
    return out, real.long()


def left_pad_token_inputs(samples) -> dict[str, Tensor]:
    """Left-pad every per-token extra (``Encoded.token_inputs``, each ``[T]``) with 0 into ``[B, T]``.

    Keys are those of the first sample; every sample must carry the same keys.
    """
    keys = samples[0].token_inputs.keys() if samples else ()
    return {key: left_pad_ids([s.token_inputs[key] for s in samples], 0)[0] for key in keys}


def concat_image_inputs(samples) -> dict[str, Tensor]:
    """Concatenate each image tensor (``Encoded.image_inputs``) along dim 0, in sample order.

    Text-only samples contribute nothing; an all-text batch gives ``{}``. Fits families whose
    processor flattens all images of a prompt along dim 0 (Qwen's patches and ``image_grid_thw``,
    one row per image elsewhere).
    """
    with_images = [s for s in samples if s.n_images]
    if not with_images:
        return {}
    keys = with_images[0].image_inputs.keys()
    return {key: torch.cat([s.image_inputs[key] for s in with_images], dim=0) for key in keys}


def flat_image_keys(samples) -> tuple:
    """The batch's image keys in the order their tensors are concatenated (one per image)."""
    return tuple(key for s in samples for key in s.image_keys)


def content_groups(chunks: Sequence[Tensor]) -> list[int]:
    """A group id per tensor, numbered by first occurrence, such that equal tensors (same shape
    and values) share one: ``[a, b, a]`` -> ``[0, 1, 0]``. The adapters' fallback for telling
    repeated images apart when no image keys came with the batch."""
    reps: list[Tensor] = []
    groups: list[int] = []
    for chunk in chunks:
        for g, rep in enumerate(reps):
            if rep.shape == chunk.shape and torch.equal(rep, chunk):
                groups.append(g)
                break
        else:
            groups.append(len(reps))
            reps.append(chunk)
    return groups


def image_key(image) -> str:
    """A content hash of one image (PIL image, numpy array or tensor): sha1 of mode, size and bytes."""
    if hasattr(image, "tobytes") and hasattr(image, "mode"):  # PIL
        head = f"{image.mode}:{image.size}".encode()
        data = image.tobytes()
    elif isinstance(image, Tensor):
        t = image.detach().cpu().contiguous()
        head = f"{t.dtype}:{tuple(t.shape)}".encode()
        data = t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes()
    else:  # numpy array
        head = f"{image.dtype}:{image.shape}".encode()
        data = image.tobytes()
    return hashlib.sha1(head + data).hexdigest()
