"""The supervised warm start (vlm_treegrpo/sft.py): loss values, batch layout, that a few steps
lower the NLL on text and vision-language policies, and the trainer's eval_warm report."""
from __future__ import annotations

import json

import pytest
import torch

from vlm_treegrpo.config import ConfigError, SFTConfig, config_from_dict
from vlm_treegrpo.data.sources import load_task
from vlm_treegrpo.policy.factory import make_policy
from vlm_treegrpo.train.sft import sft_batch, sft_loss, target_ids, warm_start
from vlm_treegrpo.train.loop import PromptSampler, train


def test_sft_loss_is_the_weighted_token_mean_nll():
    logp = torch.tensor([[0.0, -1.0, -2.0], [-4.0, -8.0, 0.0]])  # [2, 3]
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # [2, 3]
    torch.testing.assert_close(sft_loss(logp, mask), torch.tensor((1.0 + 2.0 + 4.0) / 3))


def test_sft_loss_ignores_masked_positions():
    logp = torch.tensor([[-1.0, -3.0]])
    mask = torch.tensor([[1.0, 0.0]])
    changed = logp.clone()
    changed[0, 1] = -100.0
    torch.testing.assert_close(sft_loss(logp, mask), sft_loss(changed, mask))


def _setup(name: str, source: str, n: int = 16):
    torch.manual_seed(0)
    policy = make_policy(name, "cpu")
    kinds = ["count"] if source == "visual" else None
    task = load_task(source, "gsm8k", n, 2, 1, 0, kinds=kinds)
    prompts = [policy.encode(ex, task.instruction) for ex in task.train]
    return policy, task, prompts


@pytest.mark.parametrize("name,source", [("tiny-llama", "arithmetic"), ("tiny-qwen2-vl", "visual")])
def test_sft_batch_targets_only_the_completion(name, source):
    policy, task, prompts = _setup(name, source, n=3)
    targets = [target_ids(policy.tokenizer, ex, "Answer: {answer}") for ex in task.train]
    assert all(t[-1] == policy.tokenizer.eos_token_id for t in targets)
    assert policy.tokenizer.decode(targets[0][:-1]) == f"Answer: {task.train[0].answer}"
    batch = sft_batch(policy, prompts, targets)
    assert batch.target_mask.sum(-1).tolist() == [float(len(t)) for t in targets]  # weight 1 per target token
    torch.testing.assert_close(batch.advantages, batch.target_mask)  # advantage 1 on targets, 0 elsewhere
    for row, t in enumerate(targets):
        on = batch.target_mask[row] > 0
        assert batch.input_ids[row][on].tolist() == t


@pytest.mark.parametrize("name,source", [("tiny-llama", "arithmetic"), ("tiny-qwen2-vl", "visual")])
def test_a_few_sft_steps_lower_the_nll(name, source):
    policy, task, prompts = _setup(name, source)
    rows = warm_start(policy, task.train, prompts, PromptSampler(len(task.train), 0), steps=8, lr=3e-3, batch_size=8,
                      template="Answer: {answer}", micro_batch=4, max_grad_norm=1.0, device="cpu")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["nll"] < rows[0]["nll"] - 1.0
    assert not policy.model.training


def test_train_reports_eval_warm_and_the_rl_gain(tmp_path):
    cfg = config_from_dict(
        {"model": {"name": "tiny-llama"}, "data": {"n_train": 16, "n_test": 2},
         "rollout": {"K": 2, "M": 2, "thought_max_tokens": 4, "answer_max_tokens": 4, "prompts_per_step": 2}},
        ["sft.steps=3", "sft.batch_size=4", "optim.steps=1", "algo.beta=0.01", "log.progress=false",
         f"log.run_dir={tmp_path}", "log.name=w"],
    )
    summary = train(cfg, quiet=True)
    assert summary == json.loads((tmp_path / "w" / "summary.json").read_text())
    for key in ("eval_before", "eval_warm", "eval_after"):
        assert 0.0 <= summary[key]["accuracy"] <= 1.0 and summary[key]["n"] == 2
    assert summary["sft_steps"] == 3 and summary["sft_seconds"] > 0 and summary["sft_final_nll"] > 0
    assert summary["rl_gain"] == summary["eval_after"]["accuracy"] - summary["eval_warm"]["accuracy"]
    rows = [json.loads(line) for line in (tmp_path / "w" / "sft.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_train_without_sft_has_no_eval_warm(tmp_path):
    cfg = config_from_dict(
        {"model": {"name": "tiny-llama"}, "data": {"n_train": 4, "n_test": 1},
         "rollout": {"K": 2, "M": 1, "thought_max_tokens": 2, "prompts_per_step": 1}},
        ["optim.steps=1", "eval.before=false", "log.progress=false", f"log.run_dir={tmp_path}", "log.name=n"],
    )
    summary = train(cfg, quiet=True)
    assert "eval_warm" not in summary and "sft_seconds" not in summary and "rl_gain" not in summary
    assert not (tmp_path / "n" / "sft.jsonl").exists()


def test_sft_config_defaults_and_validation():
    s = config_from_dict({}).sft
    assert (s.steps, s.target) == (0, "Answer: {answer}")
    assert config_from_dict({"sft": {"steps": 5, "lr": 1, "target": "So {answer}.\nAnswer: {answer}"}}).sft.lr == 1.0
    for kwargs, field in [
        ({"steps": -1}, "sft.steps"),
        ({"lr": 0.0}, "sft.lr"),
        ({"batch_size": 0}, "sft.batch_size"),
        ({"target": "Answer: 3"}, "sft.target"),  # no {answer}
        ({"target": "Answer: {answr}"}, "sft.target"),  # unknown field
        ({"target": "Answer: {answer"}, "sft.target"),  # bad format string
    ]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            SFTConfig(**kwargs)
    with pytest.raises(ConfigError, match=r"sft\.steps"):
        config_from_dict({}, ["sft.steps=1", "model.lora_r=4", "algo.beta=0.1"])
    with pytest.raises(ConfigError, match=r"sft\.bogus"):
        config_from_dict({"sft": {"bogus": 1}})


def test_data_kinds_validation_and_effect():
    assert config_from_dict({"data": {"source": "visual", "kinds": ["count", "bar_chart"]}}).data.kinds == ["count", "bar_chart"]
    for values, msg in [
        ({"kinds": ["count"]}, "only the 'visual' source"),
        ({"source": "visual", "kinds": ["counting"]}, "unknown kinds"),
        ({"source": "visual", "kinds": ["count", "count"]}, "must not repeat"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            config_from_dict({"data": values})
    task = load_task("visual", "gsm8k", 6, 3, 1, 0, kinds=["bar_chart"])
    assert {ex.meta["kind"] for ex in task.train + task.test} == {"bar_chart"}


def test_smoke_vlm_config_runs_on_a_tiny_budget(tmp_path):
    from pathlib import Path

    from vlm_treegrpo.config import load_config

    path = Path(__file__).resolve().parents[2] / "configs" / "smoke-vlm.yaml"
    cfg = load_config(path, ["data.n_train=8", "data.n_test=2", "sft.steps=2", "sft.batch_size=4", "optim.steps=1",
                             "rollout.prompts_per_step=2", "eval.every=0", "log.progress=false", f"log.run_dir={tmp_path}"])
    threads = torch.get_num_threads()
    try:
        summary = train(cfg, quiet=True)  # the config sets model.threads, a process-wide setting
    finally:
        torch.set_num_threads(threads)
    assert summary["sft_steps"] == 2 and {"eval_before", "eval_warm", "eval_after", "rl_gain"} <= summary.keys()
    assert summary["eval_warm"]["format_rate"] >= 0.0 and summary["steps"] == 1
