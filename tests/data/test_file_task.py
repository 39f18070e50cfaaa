"""Train / test examples of file and folder sources (vlm_treegrpo.data.file_task): named splits,
the seeded held-out part, column mapping, format detection and one-line errors."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlm_treegrpo.config import ConfigError, config_from_dict
from vlm_treegrpo.data.file_task import hold_out, load_records_task
from vlm_treegrpo.data.images import ImageError, ImageRef, decoded
from vlm_treegrpo.data.loaders import DataError
from vlm_treegrpo.data.sources import BOXED_INSTRUCTION, load_task


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _math_rows(n: int) -> list[dict]:
    return [{"problem": f"P{i}?", "solution": f"so \\boxed{{{i}}}"} for i in range(n)]


def test_hold_out_is_seeded_disjoint_and_complete():
    train, held = hold_out(10, 0.3, seed=0)
    assert (train, held) == hold_out(10, 0.3, seed=0)
    assert len(held) == 3 and sorted(train + held) == list(range(10)) and not set(train) & set(held)
    assert held == sorted(held) and train == sorted(train)
    assert hold_out(10, 0.3, seed=1)[1] != held or hold_out(10, 0.3, seed=2)[1] != held
    assert len(hold_out(3, 0.1, 0)[1]) == 1  # at least one record is held out
    with pytest.raises(DataError, match="1 records are too few"):
        hold_out(1, 0.5, 0)


def test_one_file_without_test_split_never_evaluates_on_training_records(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", _math_rows(20))
    got = load_records_task(str(src), "auto", 0, 100, seed=3, test_fraction=0.25)
    assert got.format == "math" and len(got.held_out) == 5 and len(got.train) == 15
    train_idx = {ex.meta["index"] for ex in got.train}
    assert [ex.meta["index"] for ex in got.test] == got.held_out and not train_idx & set(got.held_out)
    assert got.held_out == hold_out(20, 0.25, 3)[1]
    assert got.note.startswith(f"{src}: no 'test' split or data.test_source, so 5 of its 20 records")
    assert ", ".join(map(str, got.held_out)) in got.note
    # n_test / n_train cap what is used, not what is held out
    capped = load_records_task(str(src), "math", 4, 2, seed=3, test_fraction=0.25)
    assert len(capped.train) == 4 and len(capped.test) == 2 and capped.held_out == got.held_out


def test_named_splits_of_a_json_file_and_test_source(tmp_path):
    src = tmp_path / "d.json"
    src.write_text(json.dumps({"train": _math_rows(4), "dev": _math_rows(2)}))
    got = load_records_task(str(src), "auto", 0, 10, 0, test_split="dev")
    assert (len(got.train), len(got.test), got.held_out, got.note) == (4, 2, [], "")
    with pytest.raises(DataError, match=r"d.json: no split 'validation'; its splits are \['dev', 'train'\]"):
        load_records_task(str(src), "auto", 0, 10, 0, train_split="validation")
    other = _jsonl(tmp_path / "t.jsonl", _math_rows(3))
    got = load_records_task(str(src), "auto", 0, 10, 0, test_source=str(other))
    assert (len(got.train), len(got.test), got.held_out) == (4, 3, [])


def test_column_mapping_and_auto_format_on_a_csv(tmp_path):
    src = tmp_path / "d.csv"
    src.write_text("text,label\n1+1?,2\n2+2?,4\n3+3?,6\n")
    task = load_task(str(src), "auto", 0, 5, 1, 0, columns={"question": "text", "answer": "label"}, test_fraction=0.34)
    assert task.instruction == BOXED_INSTRUCTION
    assert sorted((e.prompt, e.answer) for e in task.train + task.test) == [("1+1?", "2"), ("2+2?", "4"), ("3+3?", "6")]
    assert len(task.test) == 1 and task.held_out == [task.test[0].meta["index"]]


def test_wrong_format_names_the_columns_it_found(tmp_path):
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "a.png")
    src = _jsonl(tmp_path / "v.jsonl", [{"images": ["a.png"], "problem": "Blue?", "answer": "yes"}] * 3)
    with pytest.raises(DataError) as err:
        load_records_task(str(src), "gsm8k", 0, 1, 0)
    first = hold_out(3, 0.1, 0)[0][0]  # the first training record (record 0 may be held out)
    assert str(err.value) == (f"{src}: record {first}: has images (field 'images') that a text format would drop; read it with data.format=visual "
                              "and a vision-language model (read as data.format=gsm8k; its columns are "
                              "['images', 'problem', 'answer']; map them with data.columns or set data.format)")
    got = load_records_task(str(src), "auto", 0, 1, 0)  # auto: the image column makes it visual
    assert got.format == "visual" and got.train[0].images[0].load().size == (8, 8)


def test_missing_files_splits_and_columns_are_one_line_data_errors(tmp_path):
    with pytest.raises(DataError, match=r"^data file not found: .*nope\.parquet$"):
        load_records_task(str(tmp_path / "nope.parquet"), "auto", 0, 1, 0)
    src = _jsonl(tmp_path / "d.jsonl", _math_rows(3))
    with pytest.raises(DataError, match=r"data.columns.question names column 'q'"):
        load_records_task(str(src), "auto", 0, 1, 0, columns={"question": "q"})
    with pytest.raises(DataError, match=r"^data.columns.image: the math format reads no 'image' field$"):
        load_records_task(str(src), "math", 0, 1, 0, columns={"image": "problem"})


def test_parquet_with_embedded_images_and_a_test_split_folder(tmp_path):
    """A folder of parquet shards named by split, read through ``datasets``: the test split is used."""
    def png(colour) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (10, 6), colour).save(buf, format="PNG")
        return buf.getvalue()

    folder = tmp_path / "shards"
    folder.mkdir()
    for split, n in (("train", 4), ("test", 2)):
        rows = [{"img": {"bytes": png((i * 40, 0, 0)), "path": None}, "q": f"{split} {i}?", "a": str(i)} for i in range(n)]
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}-00000-of-00001.parquet")
    got = load_records_task(str(folder), "auto", 0, 10, 0, columns={"image": "img", "question": "q", "answer": "a"})
    assert got.format == "visual" and (len(got.train), len(got.test), got.held_out) == (4, 2, [])
    assert [e.prompt for e in got.test] == ["test 0?", "test 1?"] and got.test[1].images[0].load().size == (10, 6)


def test_columns_of_a_synthetic_source_are_refused():
    with pytest.raises(ConfigError, match=r"^data.columns: the synthetic source 'arithmetic' has no columns to map$"):
        config_from_dict({"data": {"columns": {"question": "q"}}})
    with pytest.raises(ConfigError, match=r"^data.columns.prompt: unknown field; the fields are \['question', 'answer', 'solution', 'image', 'choices'\]$"):
        config_from_dict({"data": {"source": "x.jsonl", "columns": {"prompt": "q"}}})


def test_images_are_checked_when_loaded_and_decoded_when_encoded(tmp_path):
    """Records hold ImageRefs (encoded bytes, no pixels): a header pillow cannot read fails at
    load time naming the record, a file cut short only when its pixels are decoded."""
    good = io.BytesIO()
    Image.effect_noise((64, 48), 60).convert("RGB").save(good, format="PNG")
    first_pixel = Image.open(io.BytesIO(good.getvalue())).getpixel((0, 0))
    folder = tmp_path / "shards"
    folder.mkdir()
    rows = [{"image": {"bytes": good.getvalue(), "path": None}, "question": f"q{i}", "answer": "1"} for i in range(4)]
    rows[3]["image"] = {"bytes": good.getvalue()[:200], "path": None}  # header intact, pixels cut short
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000-of-00001.parquet")
    got = load_records_task(str(folder), "auto", 0, 4, 0, test_fraction=0.25)
    refs = [e.images[0] for e in got.train + got.test]
    assert all(isinstance(r, ImageRef) and r.value[:8] == b"\x89PNG\r\n\x1a\n" for r in refs)
    assert decoded([r for r in refs if r.index != 3])[0].getpixel((0, 0)) == first_pixel
    with pytest.raises(ImageError, match=r"^record 3: field 'image': cannot decode image"):
        next(r for r in refs if r.index == 3).load()
    rows[3]["image"] = {"bytes": b"not an image", "path": None}
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000-of-00001.parquet")
    with pytest.raises(DataError, match=r"shards: record 3: field 'image': cannot decode image"):
        load_records_task(str(folder), "auto", 0, 4, 0, test_fraction=0.25)
