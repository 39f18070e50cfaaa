"""Column mapping and format detection (vlm_treegrpo.data.columns)."""
from __future__ import annotations

import pytest

from vlm_treegrpo.data.columns import check_columns, detect_format, remap, unused_fields
from vlm_treegrpo.data.loaders import DataError


@pytest.mark.parametrize("found, first, expected", [
    (["question", "answer"], {"question": "q", "answer": "so 3\n#### 3"}, "gsm8k"),
    (["question", "answer"], {"question": "q", "answer": "3"}, "math"),
    (["problem", "solution"], {"problem": "q", "solution": "\\boxed{3}"}, "math"),
    (["images", "problem", "answer"], {}, "visual"),
    (["image", "question", "answer"], {}, "visual"),
    (["decoded_image", "question", "answer", "choices"], {}, "visual"),
])
def test_format_is_told_from_the_columns(found, first, expected):
    assert detect_format(found, {}, first, "src") == expected


def test_format_detection_counts_mapped_columns():
    assert detect_format(["pic", "text", "label"], {"image": "pic", "question": "text", "answer": "label"}, {}, "s") == "visual"
    assert detect_format(["text", "label"], {"question": "text", "answer": "label"}, {"label": "x #### 4"}, "s") == "gsm8k"


def test_undetectable_format_names_the_columns_it_found():
    with pytest.raises(DataError, match=r"^my\.parquet: cannot tell the record format from its columns \['img', 'text'\]; set data.format"):
        detect_format(["img", "text"], {}, {}, "my.parquet")


def test_remap_copies_mapped_columns_to_the_keys_the_format_reads():
    rec = {"problem": "What?", "images": ["a.png"], "solution": "7", "id": 3}
    assert remap(rec, {"question": "problem", "image": "images", "answer": "solution"}, "visual") == {
        "question": "What?", "image": ["a.png"], "answer": "7", "solution": "7", "id": 3}
    # math reads 'problem': a question column lands there; the unmapped record passes unchanged
    assert remap({"q": "1+1", "a": "2"}, {"question": "q", "answer": "a"}, "math") == {"q": "1+1", "a": "2", "problem": "1+1", "answer": "2"}
    assert remap(rec, {}, "visual") == rec


def test_remap_drops_the_other_columns_a_mapped_field_could_be_read_from():
    # visual reads 'problem' before 'question': mapping question -> 'text' must win over a 'problem' column
    out = remap({"problem": "wrong", "text": "right", "answer": 1}, {"question": "text"}, "visual")
    assert out["question"] == "right" and "problem" not in out


def test_mapped_column_missing_and_field_unused():
    with pytest.raises(DataError, match=r"^s: data.columns.answer names column 'sol', which is not among its columns \['q', 'a'\]$"):
        check_columns({"question": "q", "answer": "sol"}, ["q", "a"], "s")
    assert unused_fields({"image": "img", "question": "q"}, "gsm8k") == ["image"]
    assert unused_fields({"image": "img"}, "visual") == []
