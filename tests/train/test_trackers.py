"""Trackers (log.report_to): TensorBoard read back from a real event file of a CLI run; the other
trackers' calls on stand-in modules; a missing package is one line naming the extra. Run names:
timestamped unless log.name is given, never over another run."""
from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

import pytest

from vlm_treegrpo.cli import main as cli_main
from vlm_treegrpo.config import TRACKER_NAMES, ConfigError, config_from_dict
from vlm_treegrpo.train import trackers as trk
from vlm_treegrpo.train.run_name import timestamped_name, with_run_name

ROOT = Path(__file__).resolve().parents[2]


def test_tracker_names_match_the_config():
    assert tuple(trk.TRACKERS) == TRACKER_NAMES


def test_numeric_metrics_and_flat_config():
    row = {"reward": 0.5, "steps": 3, "flag": True, "note": "x", "lens": [1, 2], "entropy": None,
           "reward_failures": {"fmt": 2}}
    assert trk.numeric_metrics(row) == {"reward": 0.5, "steps": 3.0, "reward_failures/fmt": 2.0}
    assert trk.flat_config({"algo": {"loss": "grpo", "rewards": ["correctness"]}, "log": {"report_to": []}}) == {
        "algo.loss": "grpo", "algo.rewards": '["correctness"]', "log.report_to": "[]"}
    assert trk.sample_rows(4, "p", "7", [1.0, 0.0], ["a", "b"]) == [[4, "p", "7", 1.0, "a"], [4, "p", "7", 0.0, "b"]]


def test_tensorboard_gets_metrics_config_and_samples_from_a_cli_run(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["train", "--config", str(ROOT / "configs/tiny-llama.yaml"), f"log.run_dir={tmp_path}", "log.name=", "log.progress=false",
            "log.report_to=[tensorboard]", "data.n_test=2", "eval.before=false"]
    assert cli_main(args) == 0
    run = Path(json.loads(capsys.readouterr().out)["run"])
    assert run.parent == tmp_path and run.name.startswith("run-")  # (no log.name: a timestamped directory)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"reward", "loss", "grad_norm", "reward/correctness", "eval_accuracy"} <= set(tags["scalars"])
    got = [(e.step, e.value) for e in events.Scalars("reward")]
    assert got == [(r["step"], pytest.approx(r["reward"], rel=1e-6)) for r in rows] and [s for s, _ in got] == [1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert [(e.step, e.value) for e in events.Scalars("eval_accuracy")] == [(2, pytest.approx(summary["eval_after"]["accuracy"]))]
    texts = set(tags["tensors"])  # (add_text writes text tensors, plugin "text")
    assert {"config/text_summary", "samples/text_summary"} <= texts
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "rollout.K: 2" in config_text and "log.report_to: [\"tensorboard\"]" in config_text
    samples = events.Tensors("samples/text_summary")
    assert [s.step for s in samples] == [1, 2]
    first = (run / "samples.jsonl").read_text().splitlines()[0]
    assert json.loads(first)["completions"][0].split("\n")[0].replace("|", "\\|") in samples[0].tensor_proto.string_val[0].decode()

    assert cli_main(args) == 0  # (a second unnamed run gets its own directory)
    again = Path(json.loads(capsys.readouterr().out)["run"])
    assert again != run and (run / "summary.json").is_file()


class _Recorder:
    """Stands in for a tracker's package: records each call as (name, args, kwargs)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return self

        return call


@pytest.mark.parametrize("name", ["wandb", "trackio", "mlflow"])
def test_each_tracker_sends_config_metrics_samples(tmp_path, monkeypatch, name):
    fake = _Recorder()
    monkeypatch.setitem(sys.modules, name, fake)
    config = {"algo": {"loss": "grpo"}}
    t = trk.Trackers.open([name], tmp_path, "r1", "proj", config)
    t.log_metrics({"step": 3, "reward": 0.5, "eval_pass@2": 1.0, "note": "x"}, 3)
    t.log_samples([[3, "p", "7", 1.0, "c"]], 3)
    t.close()
    names = [c[0] for c in fake.calls]
    if name == "wandb":
        assert fake.calls[0] == ("init", (), {"project": "proj", "name": "r1", "dir": str(tmp_path), "config": config})
        assert ("log", ({"reward": 0.5, "eval_pass@2": 1.0},), {"step": 3}) in fake.calls
        assert ("Table", (), {"columns": trk.SAMPLE_COLUMNS, "data": [[3, "p", "7", 1.0, "c"]]}) in fake.calls
        assert names[-1] == "finish"
    elif name == "trackio":
        assert fake.calls[0] == ("init", (), {"project": "proj", "name": "r1", "config": config})
        assert ("log", ({"reward": 0.5, "eval_pass@2": 1.0},), {"step": 3}) in fake.calls
        assert names[-1] == "finish"
    else:
        assert fake.calls[:3] == [("set_experiment", ("proj",), {}), ("start_run", (), {"run_name": "r1"}),
                                  ("log_params", ({"algo.loss": "grpo"},), {})]
        assert ("log_metrics", ({"reward": 0.5, "eval_pass_at_2": 1.0},), {"step": 3}) in fake.calls
        table = next(c for c in fake.calls if c[0] == "log_table")
        assert table[2] == {"data": {"step": ["3"], "prompt": ["p"], "answer": ["7"], "rewards": ["1.0"], "completion": ["c"]},
                            "artifact_file": "samples/step_3.json"}
        assert names[-1] == "end_run"


def test_a_missing_tracker_package_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # (import wandb raises ImportError)
    with pytest.raises(ConfigError, match=r"log.report_to: wandb is not installed: pip install 'vlm-treegrpo\[wandb\]'"):
        trk.Trackers.open(["wandb"], tmp_path, "r", "p", {})
    args = ["train", "--config", str(ROOT / "configs/tiny-llama.yaml"), f"log.run_dir={tmp_path}", "log.progress=false",
            "log.report_to=[wandb]", "optim.steps=0", "eval.before=false", "eval.after=false"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vlm-treegrpo[wandb]" in err


def test_report_to_and_unnamed_resume_are_checked():
    with pytest.raises(ConfigError, match="log.report_to: unknown trackers"):
        config_from_dict({}, ["log.report_to=[comet]"])
    with pytest.raises(ConfigError, match="log.report_to: must not repeat"):
        config_from_dict({}, ["log.report_to=[wandb, wandb]"])
    with pytest.raises(ConfigError, match="log.resume: needs log.name"):
        config_from_dict({}, ["log.resume=auto"])


def test_timestamped_names_never_collide(tmp_path):
    now = datetime(2026, 3, 4, 5, 6, 7)
    assert timestamped_name(tmp_path, now) == "run-20260304-050607"
    (tmp_path / "run-20260304-050607").mkdir()
    (tmp_path / "run-20260304-050607-2").mkdir()
    assert timestamped_name(tmp_path, now) == "run-20260304-050607-3"
    named = config_from_dict({}, [f"log.run_dir={tmp_path}", "log.name=mine"])
    assert with_run_name(named) is named
    unnamed = with_run_name(config_from_dict({}, [f"log.run_dir={tmp_path}"]))
    assert unnamed.log.name.startswith("run-") and unnamed.log.path.parent == tmp_path
