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

:func:`image_ref` defers the decoding: it checks the value (the file is there, the header names
a format pillow reads) without decoding pixels and returns an :class:`ImageRef` that decodes
when the prompt is encoded, so a dataset's images are never all decoded at once.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlm_treegrpo.data.loaders import DataError

__all__ = ["ImageError", "ImageRef", "decoded", "image_ref", "load_image", "to_rgb"]

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


def _image_path(value: str | os.PathLike, index: int, field: str, base_dir: str | os.PathLike | None) -> Path:
    """The file an image path names (relative to ``base_dir`` when given); ImageError naming the
    record and field when it is empty, a URL, or not a file."""
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
    return path


def _open_path(value: str | os.PathLike, index: int, field: str,
               base_dir: str | os.PathLike | None) -> Image.Image:
    return _open(_image_path(value, index, field, base_dir), index, field)


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


@dataclass(frozen=True, eq=False)
class ImageRef:
    """An image checked but not decoded yet; :meth:`load` decodes it (as :func:`load_image`)."""

    value: Any
    """Encoded bytes, a ``{"bytes": ..., "path": ...}`` dict or a path."""
    index: int
    """Record index (error messages)."""
    field: str
    """Record field (error messages)."""
    base_dir: str | None = None
    """Directory a relative path is resolved against."""

    def load(self) -> Image.Image:
        """The fully loaded RGB image."""
        return load_image(self.value, self.index, self.field, self.base_dir)


def _check_header(source: Any, index: int, field: str) -> None:
    """Read just the header of ``source`` (a path or a buffer): a format pillow knows, a size."""
    try:
        with Image.open(source) as img:
            w, h = img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"record {index}: field '{field}': cannot decode image ({type(e).__name__}: {e})") from e
    if w <= 0 or h <= 0:
        raise ImageError(f"record {index}: field '{field}': zero-size image ({w}x{h})")


def image_ref(value: Any, index: int, field: str, base_dir: str | os.PathLike | None = None) -> Image.Image | ImageRef:
    """``value`` checked without decoding its pixels: an :class:`ImageRef` for bytes, an image
    dict or a path; a PIL image (already decoded) as :func:`load_image` gives it. Raises
    :class:`ImageError` as :func:`load_image` would for a missing file, empty bytes or a header
    pillow cannot read (a file cut short is only found when it is decoded)."""
    if isinstance(value, Image.Image):
        return load_image(value, index, field, base_dir)
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and path is None:
            raise ImageError(f"record {index}: field '{field}': image dict has neither 'bytes' nor 'path'")
        inner = data if data is not None else path
        image_ref(inner, index, field, base_dir)
        return ImageRef(inner, index, field, None if base_dir is None else os.fspath(base_dir))
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if not data:
            raise ImageError(f"record {index}: field '{field}': empty image bytes")
        _check_header(io.BytesIO(data), index, field)
        return ImageRef(data, index, field)
    if isinstance(value, (str, os.PathLike)):
        path = _image_path(value, index, field, base_dir)
        _check_header(path, index, field)
        return ImageRef(str(path), index, field)
    raise ImageError(f"record {index}: field '{field}': unsupported image value of type {type(value).__name__}")


def decoded(images) -> list[Image.Image]:
    """``images`` with every :class:`ImageRef` decoded (PIL images pass through)."""
    return [im.load() if isinstance(im, ImageRef) else im for im in images]
