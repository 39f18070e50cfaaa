"""The field reference: every field documented, listed by `config --show` and `train --help`, and
docs/configuration.md in step with the dataclasses."""
from __future__ import annotations

import dataclasses
import importlib.util
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from vlm_treegrpo.cli import main as cli_main
from vlm_treegrpo.config import TrainConfig, config_from_dict
from vlm_treegrpo.config_fields import attribute_docs, format_markdown, format_text, plain, sections, yaml_value

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class _Example:
    """An example section."""

    a: int = 1
    """First line
    second line."""
    b: list[str] = dataclasses.field(default_factory=lambda: ["x"])
    c: float | None = None
    """Nullable."""


def _leaf_paths() -> list[str]:
    hints = typing.get_type_hints(TrainConfig)
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(TrainConfig) for f in dataclasses.fields(hints[s.name])]


def test_attribute_docs_reads_the_string_under_each_field():
    assert attribute_docs(_Example) == {"a": "First line second line.", "c": "Nullable."}  # (b has none)


def test_every_field_is_listed_once_with_a_docstring():
    listed = [f for s in sections() for f in s.fields]
    assert [f.path for f in listed] == _leaf_paths()
    assert [f.path for f in listed if not f.doc] == []
    defaults = TrainConfig()
    for f in listed:
        section, name = f.path.split(".")
        assert f.default == getattr(getattr(defaults, section), name)
    assert next(f for f in listed if f.path == "algo.clip_eps_high").type == "float | None"


def test_plain_and_yaml_value():
    assert plain("see :func:`~vlm_treegrpo.train.runtime.setup` and ``x``") == "see `setup` and `x`"
    assert [yaml_value(v) for v in (None, True, "", "a b", ["</think>", "\n\n"], 0.2, [{"name": "format", "weight": 0.1}])] == [
        "null", "true", "''", "a b", "[</think>, '\\n\\n']", "0.2", "[{name: format, weight: 0.1}]"]


def test_format_text_marks_the_values_a_config_changes():
    text = format_text(config_from_dict({}, ["algo.clip_eps_high=0.28", "rollout.K=8"]))
    assert "  algo.clip_eps_high (float | None) = null  -> 0.28" in text
    assert "  rollout.K (int) = 4  -> 8" in text
    assert "  rollout.M (int) = 2\n" in text  # (unchanged: no arrow)
    assert all(f"  {p} (" in text for p in _leaf_paths())


def test_config_show_through_the_cli(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("algo:\n  loss: cispo\n")
    assert cli_main(["config", "--show", str(cfg), "rollout.M=4"]) == 0
    out = capsys.readouterr().out
    assert "algo.loss (str) = grpo  -> cispo" in out and "rollout.M (int) = 2  -> 4" in out
    assert cli_main(["config", "--show"]) == 0
    assert "->" not in capsys.readouterr().out
    assert cli_main(["config", "--show", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert cli_main(["config"]) == 2


def test_train_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["train", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    missing = [p for p in _leaf_paths() if f"  {p} (" not in out]
    assert missing == []
    assert "Upper clip range (DAPO's clip-higher" in out


def _gen_script():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_configuration_doc_is_up_to_date():
    """Fails when a config field or docstring changed without `python scripts/gen_config_docs.py`."""
    assert (ROOT / "docs" / "configuration.md").read_text() == format_markdown()
    assert _gen_script().main(["--check"]) == 0


def test_gen_config_docs_writes_and_detects_a_stale_file(tmp_path):
    out = tmp_path / "configuration.md"
    assert _gen_script().main(["--check", "--out", str(out)]) == 1  # (absent)
    assert _gen_script().main(["--out", str(out)]) == 0
    assert _gen_script().main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text().replace("Upper clip range", "Upper clip"))
    assert _gen_script().main(["--check", "--out", str(out)]) == 1
    assert "| `clip_eps_high` | `float \\| None` | `null` | Upper clip range (DAPO's clip-higher" in format_markdown()
