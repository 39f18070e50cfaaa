"""Turn the many ways a dataset stores an image into one RGB ``PIL.Image``.

:func:`load_image` accepts a ``PIL.Image.Image``, the Hugging Face ``datasets``
``Image`` feature encoding (``{"bytes": ..., "path": ...}``; bytes win when both are
set), raw encoded bytes, or a file path.  Every mode comes out as ``RGB``:

* modes with alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, ``P``/``L``/``RGB``
  with a ``transparency`` entry) are composited on white;
* 16-bit and 32-bit integer greyscale (``I;16*``, ``I``) is scaled by 1/257 when
  it exceeds 255 (65535 -> 255), float greyscale (``F``) by 255 when it lies in
  [0, 1]; both are then clipped to 0..255;
* everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``HSV``, ...) uses
  pillow's own conversion.

Any failure raises :class:`ImageError`, a :class:`~vlm_treegrpo.data.loaders.DataError`,
with the message ``record {index}: field '{field}': <why>``.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlm_treegrpo.data.loaders import DataError

__all__ = ["ImageError", "load_image", "to_rgb"]

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_INT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


class ImageError(DataError):
    """An image field that cannot be turned into an RGB image."""


def to_rgb(img: Image.Image) -> Image.Image:
    """A new RGB image from ``img`` (any mode); see the module docstring for the rules.

    Raises ``ValueError`` for a mode pillow cannot convert.
    """
    mode = img.mode
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = (img.convert("LA") if mode == "La" else img).convert("RGBA")
        out = Image.new("RGBA", img.size, _WHITE)
        out.alpha_composite(rgba)
        return out.convert("RGB")
    if mode in _INT_MODES or mode == "F":
        arr = np.asarray(img, dtype=np.float64)  # [H, W]
        if mode == "F":
            if arr.size and np.nanmax(arr) <= 1.0:
                arr = arr * 255.0
        elif mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0
        arr = np.nan_to_num(np.clip(np.rint(arr), 0, 255)).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "RGB":
        return img.copy()
    return img.convert("RGB")


def _open(source: Any, index: int, field: str) -> Image.Image:
    """Open and fully decode ``source`` (a path or a bytes buffer), then convert to RGB."""
    try:
        with Image.open(source) as img:
            img.load()
            return _checked_rgb(img, index, field)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(
            f"record {index}: field '{field}': cannot decode image ({type(e).__name__}: {e})"
        ) from e


def _checked_rgb(img: Image.Image, index: int, field: str) -> Image.Image:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"record {index}: field '{field}': zero-size image ({w}x{h})")
    try:
        return to_rgb(img)
    except ValueError as e:
        raise ImageError(
            f"record {index}: field '{field}': cannot convert mode {img.mode!r} to RGB ({e})"
        ) from e


def _open_path(value: str | os.PathLike, index: int, field: str,
               base_dir: str | os.PathLike | None) -> Image.Image:
    text = os.fspath(value)
    if not text.strip():
        raise ImageError(f"record {index}: field '{field}': empty image path")
    if text.startswith(("http://", "https://")):
        raise ImageError(f"record {index}: field '{field}': URLs are not fetched ({text})")
    path = Path(os.path.expanduser(text))
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.is_file():
        raise ImageError(f"record {index}: field '{field}': image file not found: {path}")
    return _open(path, index, field)


def load_image(value: Any, index: int, field: str,
               base_dir: str | os.PathLike | None = None) -> Image.Image:
    """Return ``value`` as a fully loaded RGB ``PIL.Image.Image``.

    ``value`` is a PIL image, a ``{"bytes": ..., "path": ...}`` dict, encoded bytes
    (``bytes``/``bytearray``/``memoryview``) or a path (``str``/``os.PathLike``).
    A relative path is resolved against ``base_dir`` when given (else the working
    directory).  ``index`` and ``field`` only name the record in error messages.
    """
    if isinstance(value, Image.Image):
        return _checked_rgb(value, index, field)
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return load_image(data, index, field, base_dir)
        if path is not None:
            return _open_path(path, index, field, base_dir)
        raise ImageError(
            f"record {index}: field '{field}': image dict has neither 'bytes' nor 'path'"
        )
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if not data:
            raise ImageError(f"record {index}: field '{field}': empty image bytes")
        return _open(io.BytesIO(data), index, field)
    if isinstance(value, (str, os.PathLike)):
        return _open_path(value, index, field, base_dir)
    raise ImageError(
        f"record {index}: field '{field}': unsupported image value of type {type(value).__name__}"
    )
