"""load_task (vlm_treegrpo.data.sources) for the vision-language sources, and the DataConfig
fields that feed it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlm_treegrpo.config import ConfigError, config_from_dict
from vlm_treegrpo.data.sources import load_task
from vlm_treegrpo.data.visual import VISUAL_INSTRUCTION, visual_splits


def test_visual_source_is_the_synthetic_visual_task():
    task = load_task("visual", "gsm8k", 6, 3, 2, seed=1, image_size=40)
    train, test = visual_splits(6, 3, 1, 2, 40)
    assert task.instruction == VISUAL_INSTRUCTION
    assert [(e.prompt, e.answer) for e in task.train] == [(e.prompt, e.answer) for e in train]
    assert [(e.prompt, e.answer) for e in task.test] == [(e.prompt, e.answer) for e in test]
    assert all(len(e.images) == 1 and e.images[0].size == (40, 40) for e in task.train + task.test)
    assert load_task("visual", "gsm8k", 2, 1, 1, 0, instruction="Just the number.").instruction == "Just the number."


def test_visual_format_loads_local_image_records(tmp_path: Path):
    Image.new("RGB", (12, 10), (255, 0, 0)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": "How many red squares?", "answer": 1}] * 3
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(str(tmp_path / "data.jsonl"), "visual", 2, 1, 1, 0)
    assert len(task.train) == 2 and len(task.test) == 1 and task.instruction == VISUAL_INSTRUCTION
    assert task.train[0].answer == "1" and task.train[0].images[0].load().size == (12, 10)


def test_data_config_visual_fields():
    d = config_from_dict({"data": {"source": "visual", "format": "visual", "image_size": 48, "difficulty": 3}}).data
    assert (d.source, d.format, d.image_size, d.difficulty) == ("visual", "visual", 48, 3)
    with pytest.raises(ConfigError, match=r"^data.image_size: must be >= 32"):
        config_from_dict({}, ["data.image_size=16"])
    with pytest.raises(ConfigError, match=r"^data.difficulty: the visual task has levels \[1, 2, 3\]"):
        config_from_dict({"data": {"source": "visual", "difficulty": 4}})
    with pytest.raises(ConfigError, match=r"^data.format"):
        config_from_dict({}, ["data.format=coco"])
