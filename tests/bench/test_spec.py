"""The bench spec: our training config plus the bench's own fields, checked and reshaped."""
from __future__ import annotations

import dataclasses

import pytest

from vlm_treegrpo.bench.spec import (
    BENCH_BASE,
    BenchSpec,
    bench_task,
    bench_train_config,
    make_spec,
    reshaped,
    spec_from_dict,
    with_model_dir,
)
from vlm_treegrpo.config import ConfigError


def _spec(workload="text", K=2, M=2, max_new_tokens=16, micro_prompts=2, overrides=(), **bench) -> BenchSpec:
    return make_spec(workload, "tiny-llama", steps=1, warmup=1, K=K, M=M, max_new_tokens=max_new_tokens, micro_prompts=micro_prompts,
                     overrides=["rollout.prompts_per_step=2", *overrides], **bench)


def test_the_base_config_is_the_bench_defaults_and_the_run_settings_come_last():
    cfg = bench_train_config("vlm", "m", steps=3, warmup=1)
    assert (cfg.rollout.K, cfg.rollout.M, cfg.rollout.thought_max_tokens, cfg.rollout.answer_max_tokens) == (4, 4, 16, 24)
    assert cfg.optim.lr == BENCH_BASE["optim.lr"] and cfg.model.dtype == "float32" and cfg.model.autocast == "bfloat16"
    assert cfg.optim.steps == 4 and cfg.data.source == "visual" and cfg.model.name == "m"
    assert cfg.algo.diag_every == 0 and not cfg.eval.before and not cfg.log.progress
    cfg = bench_train_config("text", "m", steps=3, warmup=1, overrides=["optim.lr=0.5", "optim.steps=99", "eval.before=true"])
    assert cfg.optim.lr == 0.5 and cfg.optim.steps == 4 and cfg.eval.before is False  # (the run's own settings win)


def test_a_config_file_is_the_base_and_overrides_apply_on_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rollout: {K: 3, M: 2, thought_max_tokens: 5, answer_max_tokens: 7, temperature: 0.7}\noptim: {lr: 0.001}\n")
    cfg = bench_train_config("text", None, steps=1, warmup=0, config=str(path), overrides=["optim.lr=0.002"])
    assert (cfg.rollout.K, cfg.rollout.M, cfg.rollout.temperature, cfg.optim.lr) == (3, 2, 0.7, 0.002)
    assert cfg.model.name == "tiny-llama" and cfg.model.dtype == "auto"  # (the file's, or the config defaults: no bench base)
    with pytest.raises(ConfigError, match="file not found"):
        bench_train_config("text", None, 1, 0, config=str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("override, field", [("algo.beta=0.1", "algo.beta"), ("algo.loss=rgra", "algo.loss"),
                                             ("model.lora_r=4", "model.lora_r"), ("rollout.refill_rounds=1", "rollout.refill_rounds"),
                                             ("algo.rewards=[correctness,format]", "algo.rewards")])
def test_settings_trl_cannot_mirror_are_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        _spec(overrides=[override])


def test_spec_checks_micro_batch_images_and_sdpa_kernels():
    with pytest.raises(ConfigError, match="optim.micro_batch.*must divide"):
        _spec(micro_prompts=3, overrides=["rollout.prompts_per_step=4"])
    with pytest.raises(ConfigError, match="images_per_prompt"):
        _spec(images_per_prompt=2)
    with pytest.raises(ConfigError, match="--sdpa-off takes"):
        _spec(sdpa_off=("fast",))
    assert _spec(sdpa_off=["cudnn"]).sdpa_off == ("cudnn",)
    with pytest.raises(ConfigError, match="a multiple of G=4"):
        BenchSpec("vlm", "m", "m", dataclasses.replace(_spec("vlm").train, optim=dataclasses.replace(_spec("vlm").train.optim,
                                                                                                    micro_batch=6)), steps=1)


def test_g_and_the_micro_batch_follow_the_config():
    text, vlm = _spec("text", K=2, M=2), _spec("vlm", K=2, M=2)
    assert text.G == vlm.G == 4 and text.micro_prompts == vlm.micro_prompts == 2
    assert text.train.optim.micro_batch == 2 and vlm.train.optim.micro_batch == 8  # (the vlm config counts rows, G a prompt)


def test_reshaped_keeps_the_budget_and_the_prompts_per_forward():
    tree = _spec("vlm", K=2, M=2, max_new_tokens=20)
    r = tree.train.rollout
    assert (r.thought_max_tokens, r.answer_max_tokens) == (8, 12)  # 2/5 of 20 for the thought
    flat = reshaped(tree, 4, 1)
    assert (flat.train.rollout.K, flat.train.rollout.M, flat.train.rollout.thought_max_tokens, flat.train.rollout.answer_max_tokens) == (4, 1, 20, 0)
    back = reshaped(flat, 2, 2)  # (from a flat spec: 2/5 again)
    assert back.train.rollout == r
    wide = reshaped(tree, 4, 2, images_per_prompt=2)
    assert wide.G == 8 and wide.micro_prompts == 2 and wide.train.optim.micro_batch == 16 and wide.images_per_prompt == 2
    assert wide.train.rollout.thought_max_tokens == 8  # a tree keeps its thought budget
    assert reshaped(tree, 2, 2, max_new_tokens=10, thought_tokens=3).train.rollout.answer_max_tokens == 7


def test_spec_round_trips_through_its_dict_and_takes_a_model_dir(tmp_path):
    spec = _spec(sdpa_off=("cudnn",), sample_stacks_ms=5.0)
    assert spec_from_dict(spec.to_dict()) == spec
    local = with_model_dir(spec, str(tmp_path))
    assert local.model_dir == local.train.model.name == str(tmp_path) and local.model == "tiny-llama"


def test_bench_task_is_the_steps_prompts_in_order_with_distractor_images():
    spec = _spec("vlm", images_per_prompt=3)
    examples, instruction = bench_task(spec)
    assert len(examples) == spec.n_prompts == 4 and instruction
    assert all(len(ex.images) == 3 for ex in examples)
    plain, _ = bench_task(reshaped(spec, 2, 2, images_per_prompt=1))
    assert [ex.prompt for ex in plain] == [ex.prompt for ex in examples] and plain[0].images == examples[0].images[:1]
