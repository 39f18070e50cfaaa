"""Opening sources as named splits (vlm_treegrpo.data.splits): source strings, local files and
folders, hub ids, and one-line errors that never wait on an unreachable hub."""
from __future__ import annotations

import json
import time

import datasets
import datasets.config
import pytest
from huggingface_hub import constants
from PIL import Image

from vlm_treegrpo.data import splits
from vlm_treegrpo.data.file_task import load_records_task
from vlm_treegrpo.data.loaders import DataError
from vlm_treegrpo.data.splits import WHOLE, SourceSpec, open_splits, parse_source


@pytest.mark.parametrize("text, expected", [
    ("openai/gsm8k", SourceSpec("openai/gsm8k")),
    ("openai/gsm8k:main", SourceSpec("openai/gsm8k", "main")),
    ("AI4Math/MathVista@testmini", SourceSpec("AI4Math/MathVista", None, "testmini")),
    ("openai/gsm8k:main@test", SourceSpec("openai/gsm8k", "main", "test")),
])
def test_hub_source_strings(text, expected):
    assert parse_source(text) == expected


def test_local_paths_are_taken_whole(tmp_path):
    odd = tmp_path / "a:b@c"
    odd.mkdir()
    assert parse_source(str(odd)) == SourceSpec(str(odd), local=True)
    assert parse_source("missing/x@y.parquet").local  # a file suffix: local even when absent
    with pytest.raises(DataError, match="empty split after '@'"):
        parse_source("someone/data@")


def test_hub_id_goes_to_load_dataset_with_its_config_and_split(monkeypatch):
    calls = []

    def fake(path, name=None):
        calls.append((path, name))
        rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(4)]
        return datasets.DatasetDict({"testmini": datasets.Dataset.from_list(rows)})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr(splits, "hub_reachable", lambda: True)
    got = load_records_task("someone/bench:cfg@testmini", "auto", 0, 9, 0)
    assert calls == [("someone/bench", "cfg")] and got.format == "gsm8k"
    assert len(got.train) == 3 and len(got.test) == 1  # '@testmini' trains on that split: the test part is held out
    with pytest.raises(DataError, match=r"^someone/bench: no split 'train'; its splits are \['testmini'\]"):
        load_records_task("someone/bench", "auto", 0, 9, 0)


def test_unreachable_hub_fails_at_once_from_the_cache(monkeypatch):
    monkeypatch.setattr(splits, "hub_reachable", lambda: False)
    before = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    t0 = time.monotonic()
    with pytest.raises(DataError) as err:
        open_splits(parse_source("nobody/no-such-dataset"), "nobody/no-such-dataset")
    assert time.monotonic() - t0 < 30  # (no retries: the offline path does not touch the network)
    msg = str(err.value)
    assert msg.startswith("nobody/no-such-dataset: cannot load (") and "not in the local cache" in msg and "\n" not in msg
    assert (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE) == before  # (restored after the block)


def test_imagefolder_with_metadata(tmp_path):
    folder = tmp_path / "geo"
    folder.mkdir()
    rows = []
    for i in range(3):
        Image.new("RGB", (6 + i, 5), (0, 90 * i, 0)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "problem": f"Angle {i}?", "solution": f"\\boxed{{{i}}}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = open_splits(parse_source(str(folder)), str(folder))
    assert list(got) == ["train"] and sorted(got["train"].column_names) == ["image", "problem", "solution"]
    task = load_records_task(str(folder), "auto", 0, 5, 0, columns={"answer": "solution"})
    assert task.format == "visual" and len(task.train) == 2 and len(task.test) == 1
    assert {e.images[0].load().size for e in task.train + task.test} == {(6, 5), (7, 5), (8, 5)}


def test_broken_inputs_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"bad.parquet: cannot read parquet"):
        open_splits(parse_source(str(bad)), str(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=rf"^{empty}: cannot load \("):
        open_splits(parse_source(str(empty)), str(empty))
    csv = tmp_path / "d.csv"
    csv.write_text("question,answer\nq,1\n")
    assert open_splits(parse_source(str(csv)), str(csv)) == {WHOLE: [{"question": "q", "answer": "1"}]}


def test_a_multi_line_hub_error_is_one_line(monkeypatch):
    def fake(path, name=None):
        raise ValueError("Config name is missing.\nPlease pick one among the available configs: ['main', 'socratic']\n"
                         "Example of usage:\n\t`load_dataset('openai/gsm8k', 'main')`")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr(splits, "hub_reachable", lambda: True)
    with pytest.raises(DataError) as err:
        open_splits(parse_source("openai/gsm8k"), "openai/gsm8k")
    assert str(err.value) == ("openai/gsm8k: cannot load (ValueError: Config name is missing. Please pick one among the available "
                              "configs: ['main', 'socratic'] Example of usage: `load_dataset('openai/gsm8k', 'main')`)")


def test_the_error_behind_a_generic_one_is_named(monkeypatch):
    def fake(path, name=None):
        try:
            raise KeyError("column 'img' has mixed types")
        except KeyError as inner:
            raise RuntimeError("An error occurred while generating the dataset") from inner

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr(splits, "hub_reachable", lambda: True)
    with pytest.raises(DataError) as err:
        open_splits(parse_source("someone/mixed"), "someone/mixed")
    assert str(err.value) == ("someone/mixed: cannot load (RuntimeError: An error occurred while generating the dataset: "
                              "KeyError: \"column 'img' has mixed types\")")


def test_a_mistyped_local_folder_is_named_as_such(monkeypatch, tmp_path):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(splits, "hub_reachable", lambda: False)
    with pytest.raises(DataError, match=rf"^data/geo: cannot load \(.*\); nor is there a local file or folder data/geo \(in {tmp_path / 'data'}\)$"):
        open_splits(parse_source("data/geo"), "data/geo")
