"""The group-size advisor end to end on the tiny Llama (through the CLI entry point, in-process)."""
from __future__ import annotations

import json

from vlm_treegrpo.cli import main


def length_reward(completion: str, example) -> float:
    """A reward the random tiny model earns in varying amounts."""
    return (len(completion) % 7) / 6.0


def test_advise_prints_the_table_and_writes_json(tmp_path, capsys):
    rc = main(["advise", "rollout.K=4", "rollout.M=2", "rollout.prompts_per_step=3", "rollout.thought_max_tokens=6",
               "rollout.answer_max_tokens=6", "data.n_train=16", "algo.rewards=[test_advise:length_reward]",
               f"log.run_dir={tmp_path}", "log.name=adv"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "recommended G =" in text and "K x M splits" in text and "recommended K x M" in text
    out = json.loads((tmp_path / "adv" / "advise.json").read_text())
    assert {"model", "N", "K", "M", "budget", "components", "group_size", "tree", "feature", "seconds"} <= set(out)
    assert {"s_between", "c1", "c2"} <= set(out["components"])
    gs = out["group_size"]
    assert gs["recommended_G"] >= 2 and gs["current_G"] == 8 and out["budget"] == 24
    assert [row["G"] for row in gs["curve"]] == sorted(row["G"] for row in gs["curve"])
    splits = out["tree"]["splits"]
    assert [(s["K"], s["M"]) for s in splits] == [(2, 4), (4, 2), (8, 1)]
    assert {"K", "M"} == set(out["tree"]["recommended_equal_tokens"])


def test_advise_with_flat_groups_skips_the_split_table(tmp_path, capsys):
    rc = main(["advise", "rollout.K=4", "rollout.M=1", "rollout.prompts_per_step=2", "rollout.thought_max_tokens=6",
               "data.n_train=8", "algo.rewards=[test_advise:length_reward]", f"log.run_dir={tmp_path}", "log.name=adv"])
    assert rc == 0
    out = json.loads((tmp_path / "adv" / "advise.json").read_text())
    assert "skipped" in out["tree"] and out["group_size"]["recommended_G"] >= 2
