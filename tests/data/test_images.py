"""Tests for loading any stored image form as an RGB PIL image."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_treegrpo.data.images import ImageError, load_image
from vlm_treegrpo.data.loaders import DataError


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _noise_png(size: int = 32) -> bytes:
    rng = np.random.default_rng(0)
    return _png_bytes(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))


@pytest.mark.parametrize(
    "mode,fill,expected",
    [
        ("RGB", (10, 20, 30), (10, 20, 30)),
        ("1", 1, (255, 255, 255)),
        ("L", 77, (77, 77, 77)),
        ("P", 0, (0, 0, 0)),
        ("LA", (77, 255), (77, 77, 77)),
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("YCbCr", (255, 128, 128), (255, 255, 255)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 257 * 40, (40, 40, 40)),
        ("I", 40, (40, 40, 40)),
        ("I", 65535, (255, 255, 255)),
        ("F", 0.5, (128, 128, 128)),
    ],
)
def test_each_mode_converts_to_rgb(mode: str, fill, expected: tuple[int, int, int]) -> None:
    img = Image.new(mode, (5, 4), fill)
    out = load_image(img, 0, "image")
    assert out.mode == "RGB" and out.size == (5, 4)
    assert out.getpixel((2, 1)) == expected


def test_alpha_composited_on_white() -> None:
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (200, 10, 40, 255))  # opaque: unchanged
    img.putpixel((1, 0), (200, 10, 40, 0))  # transparent: white
    img.putpixel((2, 0), (0, 0, 0, 128))  # half black over white
    out = load_image(img, 0, "image")
    assert out.getpixel((0, 0)) == (200, 10, 40)
    assert out.getpixel((1, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((2, 0)))
    la = Image.new("LA", (1, 1), (0, 0))
    assert load_image(la, 0, "image").getpixel((0, 0)) == (255, 255, 255)
    # a palette image whose index 1 is marked transparent
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    decoded = Image.open(io.BytesIO(_png_bytes_with_transparency(pal, 1)))
    out = load_image(decoded, 0, "image")
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)


def _png_bytes_with_transparency(img: Image.Image, index: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=index)
    return buf.getvalue()


def test_bytes_dict_and_path_inputs(tmp_path: Path) -> None:
    data = _png_bytes(Image.new("RGB", (6, 3), (1, 2, 3)))
    (tmp_path / "a.png").write_bytes(data)
    for value in (data, bytearray(data), {"bytes": data, "path": "ignored.png"},
                  {"bytes": None, "path": str(tmp_path / "a.png")}, str(tmp_path / "a.png"),
                  tmp_path / "a.png"):
        out = load_image(value, 0, "image")
        assert (out.mode, out.size, out.getpixel((0, 0))) == ("RGB", (6, 3), (1, 2, 3))
    assert load_image("a.png", 0, "image", base_dir=tmp_path).size == (6, 3)
    # a file-backed image is fully loaded: deleting the file afterwards is fine
    out = load_image(tmp_path / "a.png", 0, "image")
    (tmp_path / "a.png").unlink()
    assert out.getpixel((5, 2)) == (1, 2, 3)


def test_errors_name_record_and_field(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = _noise_png()
    bad_values = [
        b"definitely not an image",
        truncated[: len(truncated) // 2],
        b"",
        str(empty),
        str(tmp_path / "missing.png"),
        {"path": str(tmp_path / "missing.png")},
        {"bytes": None, "path": None},
        Image.new("RGB", (0, 4)),
        Image.new("L", (4, 0)),
        12345,
        None,
        ["a.png"],
        "https://example.com/x.png",
    ]
    for value in bad_values:
        with pytest.raises(ImageError, match=r"^record 3: field 'image': ") as info:
            load_image(value, 3, "image")
        assert isinstance(info.value, DataError)
    with pytest.raises(ImageError, match="not found"):
        load_image(str(tmp_path / "missing.png"), 3, "image")
    with pytest.raises(ImageError, match="zero-size"):
        load_image(Image.new("RGB", (0, 4)), 3, "image")
