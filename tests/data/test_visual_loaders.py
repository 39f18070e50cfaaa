"""Tests for image-question record conversion and local file loading (no network)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlm_treegrpo.data.images import ImageError
from vlm_treegrpo.data.loaders import DataError
from vlm_treegrpo.data.visual_loaders import from_visual_record, load_visual_examples


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (8, 6), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else colour + (255,)).save(buf, format="PNG")
    return buf.getvalue()


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_jsonl_relative_image_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "clevr"
    (data_dir / "imgs").mkdir(parents=True)
    (data_dir / "imgs" / "0.png").write_bytes(_png((255, 0, 0)))
    (data_dir / "imgs" / "1.png").write_bytes(_png((0, 0, 255), mode="RGBA"))
    _write_jsonl(data_dir / "train.jsonl", [
        {"image": "imgs/0.png", "question": "How many cubes?", "answer": 3},
        {"image": "imgs/1.png", "problem": "<image>How many spheres?",
         "solution": "<think>...</think> <answer> 2 </answer>"},
    ])
    monkeypatch.chdir(tmp_path)  # the paths must resolve against the file, not the cwd
    examples, skipped = load_visual_examples(str(data_dir / "train.jsonl"))
    assert skipped == 0
    assert [(ex.prompt, ex.answer) for ex in examples] == [
        ("How many cubes?", "3"), ("How many spheres?", "2")]
    assert examples[0].images[0].getpixel((0, 0)) == (255, 0, 0)
    assert examples[1].images[0].mode == "RGB"
    assert examples[1].images[0].getpixel((0, 0)) == (0, 0, 255)
    assert examples[0].meta == {"source": "visual_record", "index": 0}
    limited, _ = load_visual_examples(str(data_dir / "train.jsonl"), limit=1)
    assert len(limited) == 1


def test_parquet_with_hf_image_structs(tmp_path: Path) -> None:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "image": pa.array([{"bytes": _png((0, 200, 0)), "path": "a.png"},
                           {"bytes": _png((9, 9, 9), size=(3, 5)), "path": None}], type=image_type),
        "question": ["Which is it?", "What is x?"],
        "choices": [["cube", "sphere"], None],
        "answer": ["B", "12"],
        "question_type": ["multi_choice", "free_form"],
    })
    path = tmp_path / "mathvista.parquet"
    pq.write_table(table, path)
    examples, skipped = load_visual_examples(str(path), split="test")
    assert skipped == 0
    mc, free = examples
    assert mc.prompt == "Which is it?\nChoices: (A) cube (B) sphere"
    assert mc.answer == "B"  # a letter answer stays a letter
    assert mc.meta["choices"] == ["cube", "sphere"]
    assert mc.meta["question_type"] == "multi_choice"
    assert mc.images[0].getpixel((1, 1)) == (0, 200, 0)
    assert (free.prompt, free.answer, free.images[0].size) == ("What is x?", "12", (3, 5))


def test_images_list_field(tmp_path: Path) -> None:
    rec = {"images": [{"bytes": _png((1, 2, 3)), "path": None}, _png((4, 5, 6), mode="RGBA")],
           "problem": "<image>\nFind x. <image>", "answer": "7.5"}
    ex = from_visual_record(rec, 0)
    assert ex.prompt == "Find x."
    assert ex.answer == "7.5"
    assert [im.getpixel((0, 0)) for im in ex.images] == [(1, 2, 3), (4, 5, 6)]
    assert all(im.mode == "RGB" for im in ex.images)
    # MathVista: the decoded image wins over the dataset-relative path string
    pil = Image.new("RGB", (2, 2), (8, 8, 8))
    ex = from_visual_record({"image": "images/1.jpg", "decoded_image": pil,
                             "question": "Q?", "answer": "1"}, 0)
    assert ex.images[0].getpixel((0, 0)) == (8, 8, 8)


@pytest.mark.parametrize(
    "rec,pattern",
    [
        ({"image": b"", "answer": "1"}, r"record 5: missing field 'problem' or 'question'"),
        ({"image": b"", "question": "  ", "answer": "1"}, r"record 5: empty field 'question'"),
        ({"image": b"", "question": "Q"}, r"record 5: missing field 'answer'"),
        ({"image": b"", "question": "Q", "answer": ""}, r"record 5: empty field 'answer'"),
        ({"question": "Q", "answer": "1"}, r"record 5: missing field 'image' or 'images'"),
        ({"images": [b"junk"], "question": "Q", "answer": "1"}, r"record 5: field 'images\[0\]'"),
    ],
)
def test_bad_records_name_index_and_field(rec: dict, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        from_visual_record(rec, 5)


def test_corrupt_record_raises_or_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(_png((5, 5, 5)))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _write_jsonl(tmp_path / "data.jsonl", [
        {"image": "ok.png", "question": "Q0", "answer": "0"},
        {"image": "broken.png", "question": "Q1", "answer": "1"},
        {"image": "missing.png", "question": "Q2", "answer": "2"},
        {"image": "ok.png", "question": "Q3"},
        {"image": "ok.png", "question": "Q4", "answer": "4"},
    ])
    with pytest.raises(ImageError, match=r"^record 1: field 'image': cannot decode"):
        load_visual_examples(str(tmp_path / "data.jsonl"))
    examples, skipped = load_visual_examples(str(tmp_path / "data.jsonl"), skip_bad=True)
    assert [ex.prompt for ex in examples] == ["Q0", "Q4"]
    assert [ex.meta["index"] for ex in examples] == [0, 4]
    assert skipped == 3
    with pytest.raises(ValueError, match="limit"):
        load_visual_examples(str(tmp_path / "data.jsonl"), limit=-1)


def test_text_only_rows_are_valid_prompts_beside_image_rows(tmp_path: Path) -> None:
    """``images: []`` (Geometry3K-style files mix them in) is a text-only prompt, not a bad record."""
    ex = from_visual_record({"images": [], "problem": "What is 2 + 2?", "answer": "4"}, 0)
    assert (ex.prompt, ex.answer, ex.images) == ("What is 2 + 2?", "4", ())
    rows = [{"images": [], "problem": "2 + 2?", "answer": "4"},
            {"images": [{"bytes": _png((1, 2, 3)), "path": None}], "problem": "<image>Colour?", "answer": "red"}]
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    examples, skipped = load_visual_examples(str(path), skip_bad=True)
    assert skipped == 0 and [len(e.images) for e in examples] == [0, 1]
