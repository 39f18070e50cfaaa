"""Tests for GSM8K / MATH record conversion and local file loading (no network)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlm_treegrpo.data.loaders import (
    FORMATS,
    DataError,
    from_gsm8k_record,
    from_math_record,
    last_boxed,
    load_examples,
    load_records,
)

GSM = [
    {"question": "Q0?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "Q1?", "answer": "big numbers\n#### 1,234"},
    {"question": "Q2?", "answer": "no marker here"},
    {"question": "Q3?", "answer": "x #### 5 #### -12 "},
]


def test_gsm8k_extraction() -> None:
    ex = from_gsm8k_record(GSM[0], 0)
    assert (ex.prompt, ex.answer) == ("Q0?", "7")
    assert ex.meta == {"source": "gsm8k", "index": 0}
    assert from_gsm8k_record(GSM[1], 1).answer == "1234"
    assert from_gsm8k_record(GSM[3], 3).answer == "-12"


def test_gsm8k_bad_records_name_index_and_field() -> None:
    with pytest.raises(DataError, match=r"record 7: .*####"):
        from_gsm8k_record(GSM[2], 7)
    with pytest.raises(DataError, match=r"record 7: missing field 'answer'"):
        from_gsm8k_record({"question": "Q"}, 7)
    with pytest.raises(DataError, match=r"record 7: missing field 'question'"):
        from_gsm8k_record({"answer": "#### 1"}, 7)
    with pytest.raises(DataError, match="record 7"):
        from_gsm8k_record({"question": "Q", "answer": "####   "}, 7)
    assert issubclass(DataError, ValueError)


@pytest.mark.parametrize(
    "solution,expected",
    [
        (r"so $\boxed{5}$.", "5"),
        (r"$\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),
        (r"first \boxed{1} then \boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{x^{2}+\left(\frac{a}{b}\right)}", r"x^{2}+\left(\frac{a}{b}\right)"),
        (r"The answer is $\boxed 7$.", "7"),
        (r"\boxed{3} and an unterminated \boxed{4", "3"),
    ],
)
def test_math_boxed_extraction(solution: str, expected: str) -> None:
    ex = from_math_record({"problem": "P", "solution": solution, "level": "Level 2"}, 4)
    assert ex.answer == expected
    assert ex.prompt == "P"
    assert ex.meta == {"source": "math", "index": 4, "level": "Level 2"}


def test_math_explicit_answer_and_errors() -> None:
    rec = {"problem": "P", "solution": r"\boxed{1}", "answer": r"\frac{3}{4}"}
    assert from_math_record(rec, 0).answer == r"\frac{3}{4}"
    assert from_math_record({"problem": "P", "answer": "2"}, 0).answer == "2"
    with pytest.raises(DataError, match=r"record 7: .*'solution'.*boxed"):
        from_math_record({"problem": "P", "solution": "no box"}, 7)
    with pytest.raises(DataError, match=r"record 7: missing field 'solution'"):
        from_math_record({"problem": "P"}, 7)
    with pytest.raises(DataError, match=r"record 7: missing field 'problem'"):
        from_math_record({"solution": r"\boxed{1}"}, 7)


def test_last_boxed_none() -> None:
    assert last_boxed("") is None
    assert last_boxed("nothing") is None
    assert last_boxed(r"\boxedfoo") is None
    assert FORMATS == {"gsm8k": from_gsm8k_record, "math": from_math_record}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_jsonl_load_and_skip_bad(tmp_path: Path) -> None:
    path = tmp_path / "gsm.jsonl"
    _write_jsonl(path, GSM)
    assert load_records(str(path)) == GSM
    examples, skipped = load_examples(str(path), "gsm8k", skip_bad=True)
    assert [ex.answer for ex in examples] == ["7", "1234", "-12"]
    assert [ex.meta["index"] for ex in examples] == [0, 1, 3]
    assert skipped == 1
    with pytest.raises(DataError, match="record 2"):
        load_examples(str(path), "gsm8k")
    examples, skipped = load_examples(str(path), "gsm8k", limit=2)
    assert [ex.answer for ex in examples] == ["7", "1234"] and skipped == 0
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        load_examples(str(path), "csv")


def test_jsonl_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "#### 1"}\n\n{"question": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 3"):
        load_records(str(path))
    path.write_text('{"question": "a", "answer": "#### 1"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2"):
        load_records(str(path))


def test_json_array_and_split_dict(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(GSM[:2]), encoding="utf-8")
    assert load_records(str(path)) == GSM[:2]
    path.write_text(json.dumps({"test": GSM[:1], "train": GSM[1:2]}), encoding="utf-8")
    assert load_records(str(path), split="test") == GSM[:1]
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM[:2]), encoding="utf-8")
    assert load_records(str(path)) == GSM[:2]  # JSON lines under a .json name


def test_parquet_round_trip(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [
        {"problem": "P0", "solution": r"so \boxed{\frac{1}{2}}", "level": "Level 1"},
        {"problem": "P1", "solution": "no answer", "level": "Level 5"},
        {"problem": "P2", "solution": r"\boxed{10}", "level": "Level 3"},
    ]
    path = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    assert load_records(str(path)) == records
    examples, skipped = load_examples(str(path), "math", skip_bad=True)
    assert [ex.answer for ex in examples] == [r"\frac{1}{2}", "10"]
    assert skipped == 1


def test_missing_local_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_records(str(tmp_path / "nope.jsonl"))


def test_hub_id_goes_to_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple] = []

    def fake_load_dataset(path: str, name: str | None = None, split: str | None = None):
        calls.append((path, name, split))
        return [{"question": "q", "answer": "#### 3"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_records("openai/gsm8k:main", split="test") == [{"question": "q", "answer": "#### 3"}]
    assert load_records("someone/math") == [{"question": "q", "answer": "#### 3"}]
    assert calls == [("openai/gsm8k", "main", "test"), ("someone/math", None, "train")]


@pytest.mark.parametrize("convert,rec", [
    (from_math_record, {"problem": "<image>Find x.", "solution": "\\boxed{3}", "images": [{"bytes": b"png", "path": None}]}),
    (from_gsm8k_record, {"question": "How many?", "answer": "#### 2", "image": "a.png"}),
])
def test_a_text_format_refuses_records_with_images_instead_of_dropping_them(convert, rec) -> None:
    with pytest.raises(DataError, match=r"^record 3: has images \(field '(images|image)'\) that a text format would drop; "
                                        r"read it with data.format=visual"):
        convert(rec, 3)
    assert convert({**rec, "images": [], "image": None}, 3).answer in ("3", "2")  # (an empty image field is no image)
