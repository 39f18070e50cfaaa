"""The bench's flags: overrides of one training config (the bench's base, or --config FILE)."""
from __future__ import annotations

import argparse

import pytest

from vlm_treegrpo.bench.flags import add_arguments, spec_from_args, tree_shape
from vlm_treegrpo.config import ConfigError


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_tree_shape_is_the_squarest_split_with_m_at_least_2():
    assert tree_shape(16, None) == (4, 4)
    assert tree_shape(8, None) == (4, 2)
    assert tree_shape(6, "3x2") == (3, 2)
    for G, tree in ((7, None), (16, "4by4")):
        with pytest.raises(ConfigError):
            tree_shape(G, tree)


def test_no_flags_give_the_bench_base():
    spec, modes, trainers = spec_from_args(_parse())
    r, o = spec.train.rollout, spec.train.optim
    assert (modes, trainers, spec.model, spec.G) == (["flat", "tree"], ["ours", "trl"], "smollm2-135m-instruct", 16)
    assert (r.K, r.M, r.thought_max_tokens, r.answer_max_tokens, r.prompts_per_step) == (4, 4, 16, 24, 4)
    assert (o.lr, o.steps, o.micro_batch, spec.train.model.autocast, spec.train.algo.rewards) == (2e-5, 4, 4, "bfloat16", ["correctness"])
    assert r.drop_finished is True and r.decode_graphs == "auto" and not r.compile_decode and not spec.train.model.cudnn_attention


def test_flags_are_config_overrides():
    spec, _, _ = spec_from_args(_parse("--workload", "vlm", "--G", "6", "--tree", "3x2", "--max-new-tokens", "10", "--thought-tokens", "4",
                                       "--prompts-per-step", "4", "--micro-batch", "2", "--lr", "0.001", "--autocast", "none",
                                       "--threads", "2", "--seed", "5", "--reward", "pkg.mod:fn", "--keep-finished", "--decode-graphs",
                                       "--cudnn-attention", "--steps", "2", "--warmup", "0", "rollout.top_p=0.9"))
    t = spec.train
    assert (t.rollout.K, t.rollout.M, t.rollout.thought_max_tokens, t.rollout.answer_max_tokens) == (3, 2, 4, 6)
    assert t.optim.micro_batch == 12 and spec.micro_prompts == 2  # (rows: 2 prompts of G = 6)
    assert (t.optim.lr, t.model.autocast, t.model.threads, t.optim.seed, t.data.seed) == (0.001, "none", 2, 5, 5)
    assert t.algo.rewards == ["pkg.mod:fn"] and t.rollout.drop_finished is False and t.rollout.decode_graphs is True
    assert t.model.cudnn_attention is True and t.rollout.top_p == 0.9 and t.optim.steps == 2 and t.data.source == "visual"
    assert spec_from_args(_parse("--decode-graphs", "off"))[0].train.rollout.decode_graphs is False
    assert spec_from_args(_parse("--compile-decode"))[0].train.rollout.compile_decode is True


def test_a_config_file_gives_what_no_flag_names(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: tiny-llama}\nrollout: {K: 3, M: 2, thought_max_tokens: 5, answer_max_tokens: 7, prompts_per_step: 2,"
                    " top_k: 5}\noptim: {lr: 0.001, micro_batch: 1}\n")
    spec, _, _ = spec_from_args(_parse("--config", str(path)))
    t = spec.train
    assert spec.model == "tiny-llama" and (t.rollout.K, t.rollout.M, t.rollout.thought_max_tokens, t.rollout.answer_max_tokens) == (3, 2, 5, 7)
    assert (t.rollout.top_k, t.optim.lr, t.optim.micro_batch, t.rollout.prompts_per_step) == (5, 0.001, 1, 2)
    spec, _, _ = spec_from_args(_parse("--config", str(path), "--lr", "0.5", "--G", "4", "--max-new-tokens", "10"))
    t = spec.train
    assert (t.optim.lr, t.rollout.K, t.rollout.M, t.rollout.thought_max_tokens, t.rollout.answer_max_tokens) == (0.5, 2, 2, 4, 6)
    path.write_text("algo: {beta: 0.04}\n")
    with pytest.raises(ConfigError, match="^algo.beta"):
        spec_from_args(_parse("--config", str(path)))


def test_quick_is_a_small_run_on_a_tiny_model():
    spec, _, _ = spec_from_args(_parse("--quick", "--workload", "vlm"))
    r = spec.train.rollout
    assert (spec.model, spec.steps, spec.G, r.K, r.M, r.max_new_tokens, r.prompts_per_step) == ("tiny-qwen2-vl", 2, 4, 2, 2, 16, 2)
    assert r.thought_max_tokens + r.answer_max_tokens == 16


@pytest.mark.parametrize("flags, match", [(["--rounds", "0"], "--rounds >= 1"), (["--steps", "0"], "--rounds >= 1"),
                                          (["--warmup", "-1"], "--rounds >= 1"), (["--modes", "wide"], "--modes takes"),
                                          (["--trainers", "ours,vllm"], "--modes takes"),
                                          (["--sdpa-off", "cudnn,fast"], "--sdpa-off takes a comma list of flash, mem_efficient, cudnn, got cudnn,fast"),
                                          (["--G", "7"], "G=7 has no K x M split"), (["--micro-batch", "3"], "must divide")])
def test_bad_flags_name_what_is_wrong(flags, match):
    with pytest.raises(ConfigError, match=match):
        spec_from_args(_parse("--model", "tiny-llama", *flags))
