"""Every error a user can cause ends as one line naming the field, file, record or model, with
exit status 2, through the real CLI entry point; those that can be checked before a model loads
are (the run directory is not even made); ``--debug`` shows the traceback instead."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from vlm_treegrpo.cli import main as cli_main
from vlm_treegrpo.config import ConfigError
from vlm_treegrpo.train import checkpoint_dir

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["log.progress=false", "optim.steps=2", "data.n_test=2", "rollout.thought_max_tokens=3", "rollout.answer_max_tokens=3"]


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """Data files of each kind a case needs."""
    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    out = {"bad_yaml": tmp_path / "bad.yaml", "empty": tmp_path / "empty.jsonl", "gsm8k": tmp_path / "gsm8k.jsonl",
           "visual": tmp_path / "geometry.jsonl"}
    out["bad_yaml"].write_text("rollout:\n  K: [1, 2\n")
    out["empty"].write_text("")
    out["gsm8k"].write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(4)))
    out["visual"].write_text("".join(json.dumps({"images": ["red.png"], "problem": "<image>How many sides?", "solution": "\\boxed{4}",
                                                 "answer": "4"}) + "\n" for _ in range(4)))
    return out


CASES = {
    # name: (arguments after `train`, the line's pattern)
    "YAML syntax error in the file": (["--config", "{bad_yaml}"], r"config: .*bad\.yaml is not valid YAML: .* at line 3, column 1"),
    "YAML syntax error in an override": (["rollout.K=[1,"], r"rollout\.K: the value '\[1,' is not valid YAML"),
    "unknown key": (["rollout.KK=2"], r"rollout\.KK: unknown key"),
    "learning rate inf": (["optim.lr=inf"], r"optim\.lr: must be a finite number, got inf"),
    "learning rate .inf": (["optim.lr=.inf"], r"optim\.lr: must be a finite number, got inf"),
    "temperature inf": (["rollout.temperature=inf"], r"rollout\.temperature: must be a finite number"),
    "temperature 0": (["rollout.temperature=0"], r"rollout\.temperature: must be a finite number > 0"),
    "unknown model name": (["model.name=no-such-model"],
                           r"model\.name: 'no-such-model' is not a built-in \(.*tiny-llama, .*\) nor a local directory; "
                           r"as a hub id it is not in the local hub cache, and the hub is off"),
    "model directory that does not exist": (["model.name=./runs/nope/model"],
                                            r"model\.name: './runs/nope/model' is not a built-in .* and no such directory exists"),
    "unknown dataset": (["data.source=nobody/no-such-dataset"],
                        r"data\.source: 'nobody/no-such-dataset' is not a local file; as a hub dataset id it is not in the local hub cache"),
    "missing data file": (["data.source=/nonexistent/train.jsonl"], r"data\.source: file not found: /nonexistent/train\.jsonl"),
    "empty training file": (["data.source={empty}"], r"/.*empty\.jsonl: the split 'train' has no records$"),
    "empty test set": (["data.source={gsm8k}", "data.test_source={empty}"], r"data: the test set of '.*empty\.jsonl' is empty"),
    "unknown reward name": (["algo.rewards=[correctnes]"], r"algo\.rewards: unknown reward 'correctnes'"),
    "unimportable reward": (["algo.rewards=[no_such_module:fn]"], r"algo\.rewards: reward 'no_such_module:fn': cannot import module"),
    "reward that is not there": (["algo.rewards=[json:no_such_fn]"], r"algo\.rewards: reward 'json:no_such_fn': module 'json' has no"),
    "visual data on a text model": (["data.source={visual}", "data.format=visual"],
                                    r"data: train example 0 has 1 image\(s\), but model\.name='tiny-llama' is a text model"),
    "visual records read as math": (["data.source={visual}", "data.format=math"],
                                    r"/.*geometry\.jsonl: record 0: has images \(field 'images'\) that a text format would drop"),
    "negative checkpoint_keep": (["log.checkpoint_keep=0"], r"log\.checkpoint_keep: must be >= 1"),
}


def _train(tmp_path: Path, files: dict, args: list[str], *extra: str) -> list[str]:
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    return ["train", *extra, *args, f"log.run_dir={tmp_path / 'runs'}", "log.name=run", *SMALL]


@pytest.mark.parametrize("case", list(CASES))
def test_a_user_error_is_one_line_with_status_2_before_any_model_loads(case, tmp_path, files, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args, pattern = CASES[case]
    code = cli_main(_train(tmp_path, files, args))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert re.match(rf"^error: {pattern}", err[0]), err[0]
    assert not (tmp_path / "runs").exists()  # (nothing was made: the check came first)


def test_a_full_disk_at_checkpoint_time_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, files, capsys, monkeypatch):
    monkeypatch.setattr(checkpoint_dir, "disk_free", lambda path: 0)  # (the first checkpoint has no size to check against)
    code = cli_main(_train(tmp_path, files, ["log.checkpoint_every=1", "eval.before=false"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.match(r"^error: \[Errno 28\] disk full: a checkpoint needs about \d+ MiB", err[0]), err
    run = tmp_path / "runs" / "run"
    assert json.loads((run / "checkpoint" / "meta.json").read_text())["step"] == 1
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


def test_an_unknown_model_fails_at_once_offline_or_not_and_eval_checks_too(tmp_path, files, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert cli_main(_train(tmp_path, files, ["model.name=no-such-org/no-such-model"])) == 2
    line = capsys.readouterr().err.strip()
    assert re.match(r"^error: model\.name: 'no-such-org/no-such-model' .* as a hub id it is "
                    r"(not found on the hub|not in the local hub cache, and the hub could not be reached)", line), line
    assert cli_main(["eval", "data.source=/nonexistent/test.jsonl"]) == 2
    assert capsys.readouterr().err.strip() == "error: data.source: file not found: /nonexistent/test.jsonl"


def test_debug_shows_the_traceback_anywhere_on_the_line(tmp_path, files):
    for argv in (["--debug", "train", "optim.lr=inf"], ["train", "optim.lr=inf", "--debug"]):
        with pytest.raises(ConfigError, match=r"^optim\.lr: "):
            cli_main(argv)


def test_an_empty_test_set_with_allow_empty_trains_with_a_warning_and_no_evaluation(tmp_path, files, capsys):
    code = cli_main(_train(tmp_path, files, ["data.source={gsm8k}", "data.test_source={empty}", "eval.allow_empty=true"]))
    out = capsys.readouterr()
    assert code == 0 and "warning: the test set of " in out.err and "is empty; no evaluation (eval.allow_empty)" in out.err
    summary = json.loads(out.out)
    assert summary["steps"] == 2 and not any(k.startswith("eval_") for k in summary)
