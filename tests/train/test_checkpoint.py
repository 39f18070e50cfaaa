"""Checkpoints and resuming: a run stopped (by its step budget or by SIGTERM) and resumed makes
the same steps, bit for bit, as one that never stopped; a resume that cannot be exact is refused
with the field named."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm_treegrpo.train import checkpoint, checkpoint_dir
from vlm_treegrpo.cli import main as cli_main
from vlm_treegrpo.config import ConfigError, load_config
from vlm_treegrpo.analysis.plots import timeless
from vlm_treegrpo.policy.factory import load_checkpoint_policy, make_policy
from vlm_treegrpo.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
SIGTERM_AT = {"call": None, "calls": 0}
""":func:`varied_reward` sends this process SIGTERM on its ``call``-th call (None: never)."""

VARIANTS = {
    "full weights, KL to a warm-started reference": ("tiny-llama", ["algo.beta=0.05", "sft.steps=1", "sft.batch_size=2"]),
    "LoRA": ("tiny-llama", ["model.lora_r=4"]),
    "VLM": ("tiny-qwen2-vl", ["data.n_train=16"]),
    "prompts without signal refilled": ("tiny-llama", ["rollout.refill_rounds=2", "algo.rewards=[test_refill:even_is_flat]"]),
}


def varied_reward(completion: str, example) -> float:
    SIGTERM_AT["calls"] += 1
    if SIGTERM_AT["calls"] == SIGTERM_AT["call"]:
        os.kill(os.getpid(), signal.SIGTERM)
    return (len(completion) % 7) / 6.0


def _args(tmp_path: Path, name: str, variant: str, *extra: str) -> list[str]:
    return [f"log.run_dir={tmp_path}", f"log.name={name}", "log.progress=false", "optim.steps=4", "data.n_test=2",
            "rollout.thought_max_tokens=5", "rollout.answer_max_tokens=5", "algo.rewards=[test_checkpoint:varied_reward]",
            "algo.reward_workers=0", "algo.diag_every=3", *VARIANTS[variant][1], *extra]


def _run(tmp_path: Path, name: str, variant: str, *extra: str) -> dict:
    SIGTERM_AT["calls"] = 0
    return train(load_config(ROOT / f"configs/{VARIANTS[variant][0]}.yaml", _args(tmp_path, name, variant, *extra)), quiet=True)


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [timeless(r) for r in rows]


def _timeless(ev: dict | None) -> dict | None:
    return None if ev is None else {k: v for k, v in ev.items() if k != "seconds"}


def _same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _same_tensors(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Each variant run 4 steps without stopping, checkpointing every 2."""
    out = {}
    for variant in VARIANTS:
        tmp = tmp_path_factory.mktemp("straight")
        summary = _run(tmp, "run", variant, "log.checkpoint_every=2")
        out[variant] = (tmp / "run", summary)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_run_stopped_after_its_steps_and_resumed_makes_the_same_steps(tmp_path, straight, variant):
    whole, whole_summary = straight[variant]
    assert whole_summary["checkpoints"]["written"] == 2 and whole_summary["steps"] == 4
    first = _run(tmp_path, "run", variant, "optim.steps=2", "log.checkpoint_every=2")
    assert first["steps"] == 2 and "stopped_by" not in first
    run = tmp_path / "run"
    run_id = checkpoint.read_meta(run / "checkpoint")["run_id"]
    second = _run(tmp_path, "run", variant, "log.resume=must", "log.checkpoint_every=2")
    assert checkpoint.read_meta(run / "checkpoint")["run_id"] == run_id != checkpoint.read_meta(whole / "checkpoint")["run_id"]
    assert second["resumed_from_step"] == 2 and second["steps"] == 4
    assert _rows(run) == _rows(whole)  # steps 1-2 kept from the first session, 3-4 made again exactly
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4]
    if "rollout.refill_rounds=2" in VARIANTS[variant][1]:
        assert sum(r["refilled_prompts"] for r in _rows(run)[2:]) > 0  # (the resumed steps drew prompts too)
    for key in ("eval_before", "eval_warm"):  # measured once, before the first step, and carried over
        assert _timeless(second.get(key)) == _timeless(whole_summary.get(key))
    assert _timeless(second["eval_after"]) == _timeless(whole_summary["eval_after"])
    with_reference = "algo.beta=0.05" in VARIANTS[variant][1]
    for name in ("model.pt", "optimizer.pt") + (("reference.pt",) if with_reference else ()):
        _same_tensors(torch.load(run / "checkpoint" / name), torch.load(whole / "checkpoint" / name))
    assert (run / "checkpoint" / "reference.pt").exists() == with_reference
    assert [json.loads(x)["step"] for x in (run / "samples.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_sigterm_finishes_the_step_checkpoints_exits_143_and_the_resumed_run_is_exact(tmp_path, straight, capsys):
    variant = "LoRA"
    whole, whole_summary = straight[variant]
    SIGTERM_AT["calls"], SIGTERM_AT["call"] = 0, 9  # a call of step 2's scoring (8 leaves a step)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = cli_main(["train", "--config", str(ROOT / "configs/tiny-llama.yaml"), *_args(tmp_path, "run", variant)])
    finally:
        SIGTERM_AT["call"] = None
    assert code == 128 + signal.SIGTERM
    assert "SIGTERM: stopped after step 2, checkpoint in " in capsys.readouterr().err  # (what the user sees)
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is the loop's only
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 2 and "eval_after" not in summary
    assert checkpoint.read_meta(run / "checkpoint")["step"] == 2 and summary["checkpoints"]["written"] == 1
    resumed = _run(tmp_path, "run", variant, "log.resume=auto")
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4 and "stopped_by" not in resumed
    assert _rows(run) == _rows(whole)
    assert _timeless(resumed["eval_after"]) == _timeless(whole_summary["eval_after"])


def test_resume_refuses_a_changed_algorithm_and_a_missing_checkpoint(tmp_path, straight):
    shutil.copytree(straight["LoRA"][0], tmp_path / "run")  # (the shared run stays as it was)
    with pytest.raises(ConfigError, match=r"^rollout\.K: .*trained with 2, this run sets 4"):
        _run(tmp_path, "run", "LoRA", "log.resume=must", "rollout.K=4")
    with pytest.raises(ConfigError, match=r"^log\.resume: no checkpoint"):
        _run(tmp_path, "fresh", "LoRA", "log.resume=must")
    # more steps and other logging may change: a finished run goes on from its last checkpoint
    more = _run(tmp_path, "run", "LoRA", "log.resume=auto", "optim.steps=5", "log.samples_every=0")
    assert more["resumed_from_step"] == 4 and more["steps"] == 5
    assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("variant", ["LoRA", "VLM"])
def test_a_checkpoint_evaluates_and_exports_as_the_trained_model(tmp_path, straight, variant, capsys):
    whole, whole_summary = straight[variant]
    config = str(ROOT / f"configs/{VARIANTS[variant][0]}.yaml")
    budget = ["data.n_test=2", "rollout.thought_max_tokens=5", "rollout.answer_max_tokens=5"]
    capsys.readouterr()
    assert cli_main(["eval", "--config", config, "--model", str(whole / "checkpoint"), *budget]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [s["completion"] for s in got["samples"]] == [s["completion"] for s in whole_summary["eval_after"]["samples"]]
    assert cli_main(["export", str(whole / "checkpoint"), str(tmp_path / "model"), "--merge", "--dtype", "float32"]) == 0
    exported = make_policy(str(tmp_path / "model"), "cpu", "float32").model.state_dict()
    loaded = load_checkpoint_policy(whole / "checkpoint", "cpu", "float32").model.state_dict()
    assert exported.keys() == loaded.keys() and all(torch.equal(exported[k], loaded[k]) for k in loaded)
    assert cli_main(["export", str(whole), str(tmp_path / "x")]) == 2  # (the run, not its checkpoint: one line, status 2)


def test_a_run_that_spent_its_time_budget_makes_no_more_steps_when_resumed(tmp_path):
    first = _run(tmp_path, "run", "LoRA", "optim.time_budget_s=1e-6", "log.checkpoint_every=1")
    assert first["steps"] == 1 and first["checkpoints"]["written"] == 1
    again = _run(tmp_path, "run", "LoRA", "optim.time_budget_s=1e-6", "log.resume=must")
    assert again["steps"] == 1 and again["resumed_from_step"] == 1 and again["train_seconds"] > 0  # (the first session's seconds)
    more = _run(tmp_path, "run", "LoRA", "optim.time_budget_s=0", "log.resume=must")  # (a budget may change)
    assert more["steps"] == 4 and [r["step"] for r in _rows(tmp_path / "run")] == [1, 2, 3, 4]


def test_save_best_keeps_the_weights_of_the_best_evaluation_across_a_resume(tmp_path, monkeypatch):
    import vlm_treegrpo.train.loop as trainer

    scripted = iter([0.1, 0.5, 0.3, 0.2, 0.4])  # before, steps 1-3 (eval.every=1), after step 4
    real_eval = trainer.evaluate_held_out

    def scripted_eval(*args, **kwargs):
        return {**real_eval(*args, **kwargs), "accuracy": next(scripted)}

    monkeypatch.setattr(trainer, "evaluate_held_out", scripted_eval)
    first = _run(tmp_path, "run", "LoRA", "log.save_best=true", "eval.every=1", "optim.steps=2", "log.checkpoint_every=2")
    assert first["best"]["step"] == 1 and first["best"]["accuracy"] == 0.5
    # (the first session's final evaluation drew 0.3 from the script; the resumed one evaluates steps 3 and 4)
    second = _run(tmp_path, "run", "LoRA", "log.save_best=true", "eval.every=1", "log.resume=must")
    assert second["best"] == {"step": 1, "accuracy": 0.5, "path": str(tmp_path / "run" / "best")}  # 0.2 and 0.4 do not beat it
    meta = checkpoint.read_meta(tmp_path / "run" / "best")
    assert meta["step"] == 1 and meta["accuracy"] == 0.5
    monkeypatch.setattr(trainer, "evaluate_held_out", real_eval)
    _run(tmp_path, "one", "LoRA", "optim.steps=1", "log.checkpoint_every=1")  # the weights after step 1
    _same_tensors(torch.load(tmp_path / "run" / "best" / "model.pt"), torch.load(tmp_path / "one" / "checkpoint" / "model.pt"))
    assert load_checkpoint_policy(tmp_path / "run" / "best", "cpu", "float32") is not None  # (eval --model / export read it)


def test_a_checkpoint_links_its_own_runs_frozen_reference_and_writes_over_another_runs(tmp_path):
    ref = torch.nn.Linear(3, 2)
    weights = {n: p.detach().clone() for n, p in ref.named_parameters()}
    stale = {n: torch.zeros_like(p) for n, p in weights.items()}
    previous = tmp_path / "checkpoint"
    previous.mkdir()
    torch.save(stale, previous / "reference.pt")  # (what that run's reference was)
    (previous / "meta.json").write_text(json.dumps({"step": 2, "run_id": "run-a"}))
    for run_id, linked in [("run-a", True), ("run-b", False), ("", False)]:
        tmp = tmp_path / f"tmp-{run_id or 'none'}"
        tmp.mkdir()
        assert checkpoint.save_reference(ref, previous, tmp, run_id) is linked
        same_file = os.stat(tmp / "reference.pt").st_ino == os.stat(previous / "reference.pt").st_ino
        assert same_file is linked
        _same_tensors(torch.load(tmp / "reference.pt"), stale if linked else weights)
    (previous / "meta.json").unlink()  # (an incomplete checkpoint is no one's)
    tmp = tmp_path / "tmp-incomplete"
    tmp.mkdir()
    assert checkpoint.save_reference(ref, previous, tmp, "run-a") is False


def test_find_takes_the_newest_complete_checkpoint(tmp_path):
    """Directories of the older two-directory swap (a meta.json without a file list) count when
    the files every checkpoint holds are there (:mod:`vlm_treegrpo.train.checkpoint_dir` for the rest)."""
    assert checkpoint.find(tmp_path) is None
    for name, step in (("checkpoint.old", 2), ("checkpoint", 4)):
        (tmp_path / name).mkdir()
        for file in checkpoint.FILES:
            (tmp_path / name / file).write_bytes(b"x")
        (tmp_path / name / "meta.json").write_text(json.dumps({"step": step}))
    (tmp_path / "checkpoint.tmp").mkdir()  # (being written: no meta.json yet)
    assert checkpoint.find(tmp_path) == tmp_path / "checkpoint"
    (tmp_path / "checkpoint").rename(tmp_path / "gone")  # a crash between the two renames of a swap
    for file in checkpoint.FILES:
        (tmp_path / "checkpoint.tmp" / file).write_bytes(b"x")
    (tmp_path / "checkpoint.tmp" / "meta.json").write_text(json.dumps({"step": 6}))
    assert checkpoint.find(tmp_path) == tmp_path / "checkpoint.tmp"


def test_keep_rows_drops_the_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (1, 2, 3)))
    checkpoint.keep_rows(path, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    checkpoint.keep_rows(tmp_path / "absent.jsonl", 2)  # nothing to keep: no error


def test_log_fields_are_checked():
    with pytest.raises(ConfigError, match=r"^log\.resume: "):
        load_config(None, ["log.resume=yes"])
    with pytest.raises(ConfigError, match=r"^log\.checkpoint_every: "):
        load_config(None, ["log.checkpoint_every=-1"])


def test_a_run_sigkilled_between_the_renames_of_a_checkpoint_resumes_from_it_exactly(tmp_path, straight):
    """The whole checkpoint of step 2 is still a temporary directory when the kill comes (the
    fault seam of :mod:`vlm_treegrpo.train.checkpoint_dir`, a real SIGKILL): the resumed run
    goes on from it and makes the steps of the run that was never stopped."""
    variant = "LoRA"
    whole, whole_summary = straight[variant]
    env = {**os.environ, checkpoint_dir.KILL_ENV: "rename_new:1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "train"), str(ROOT / "tests")])}
    cmd = [sys.executable, "-m", "vlm_treegrpo.cli", "train", "--config", str(ROOT / "configs/tiny-llama.yaml"),
           *_args(tmp_path, "run", variant, "log.checkpoint_every=2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = tmp_path / "run"
    assert not (run / "checkpoint").exists() and checkpoint.find(run) == run / "checkpoint.tmp-2"
    resumed = _run(tmp_path, "run", variant, "log.resume=must", "log.checkpoint_every=2")
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    assert _rows(run) == _rows(whole)
    _same_tensors(torch.load(run / "checkpoint" / "model.pt"), torch.load(whole / "checkpoint" / "model.pt"))
    _same_tensors(torch.load(run / "checkpoint" / "optimizer.pt"), torch.load(whole / "checkpoint" / "optimizer.pt"))
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


def test_a_checkpoint_older_than_a_field_resumes_as_if_it_had_its_default(tmp_path):
    saved = load_config(None, ["model.lora_r=2"]).to_dict()
    del saved["algo"]["tis_cap"], saved["model"]["lora_vision"]  # (written before these fields existed)
    checkpoint.check_compatible(saved, load_config(None, ["model.lora_r=2", "model.lora_vision=true"]), tmp_path)
    with pytest.raises(ConfigError, match=r"^model\.lora_vision: the checkpoint .* was trained with True"):
        checkpoint.check_compatible(saved, load_config(None, ["model.lora_r=2"]), tmp_path)  # (its LoRA covered the vision tower)
