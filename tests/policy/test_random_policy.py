"""``random:<preset>``: released architectures with random weights, built offline, depth cut by
``model.layers``; each takes a training step (the VLMs on a 448 x 448 image: ``-m slow``)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlm_treegrpo.analysis.memory_plan import model_size
from vlm_treegrpo.config import ConfigError, ModelConfig, config_from_dict
from vlm_treegrpo.models.shapes import load_shape, shape_names, widen_vocab
from vlm_treegrpo.policy.factory import make_policy
from vlm_treegrpo.train.loop import train
from vlm_treegrpo.vlm.registry import get_adapter

VLM_PRESETS = [n for n in shape_names() if load_shape(n).family is not None]
TEXT_PRESETS = [n for n in shape_names() if load_shape(n).family is None]


def test_layers_only_applies_to_random_names():
    assert ModelConfig(name="random:qwen2.5-vl-3b", layers=2).layers == 2
    with pytest.raises(ConfigError, match="model.layers"):
        ModelConfig(name="tiny-llama", layers=2)
    with pytest.raises(ConfigError, match="model.layers"):
        ModelConfig(name="random:qwen2.5-vl-3b", layers=-1)


def test_an_unknown_random_name_lists_the_presets():
    with pytest.raises(ConfigError, match="random:smolvlm-2b"):
        make_policy("random:smolvlm-9b", "cpu")


# Image tokens of one 448 x 448 image under each released processor: Qwen2.5-VL 28 px per token
# (16 x 16), Qwen3-VL 32 px (14 x 14), Gemma3 a fixed 256, SmolVLM the image upscaled to its
# 1536 px longest edge, 4 x 4 tiles of 384 px + a global view, 81 tokens each; LLaVA-OneVision
# the 768 x 768 pinpoint (2 x 2 crops, 54 x 54 features + 54 newlines) + a 729-token base view.
IMAGE_TOKENS_448 = {"qwen2.5-vl-3b": 256, "qwen2.5-vl-7b": 256, "qwen3-vl-4b": 196, "qwen3-vl-8b": 196,
                    "gemma3-4b": 256, "smolvlm-2b": 17 * 81, "llava-onevision-7b": 54 * 54 + 54 + 729}


@pytest.mark.parametrize("name", VLM_PRESETS)
def test_processor_has_the_released_image_limits_and_vocabulary(name):
    shape = load_shape(name)
    adapter = get_adapter(shape.family)
    tokenizer = widen_vocab(adapter.standin_tokenizer(), shape.vocab_size)
    processor = adapter.random_processor(tokenizer, shape.processor)
    encoded = adapter.encode(processor, "What is shown?", [Image.new("RGB", (448, 448), (200, 30, 30))])
    image_field = next(k for k in adapter.token_fields if k.startswith("image_token"))
    image_id = tokenizer.convert_tokens_to_ids(adapter.token_fields[image_field])
    assert int((encoded.input_ids == image_id).sum()) == IMAGE_TOKENS_448[name]
    assert len(tokenizer) == shape.vocab_size
    assert getattr(adapter.random_config(shape, 2, tokenizer), image_field) == image_id


def length_reward(completion: str, example) -> float:
    """A reward random weights earn in varying amounts, so advantages (and gradients) are nonzero."""
    return (len(completion) % 7) / 6.0


REWARD = "algo.rewards=[test_random_policy:length_reward]"


def _cli() -> list[str]:
    exe = shutil.which("vlm-treegrpo", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "vlm_treegrpo.cli"]


def test_random_text_preset_trains_a_step_through_the_cli(tmp_path):
    cmd = _cli() + ["train", REWARD, "model.name=random:smollm2-135m", "model.layers=2", "data.n_train=4", "data.n_test=1",
                    "rollout.K=4", "rollout.M=2", "rollout.thought_max_tokens=3", "rollout.answer_max_tokens=3",
                    "rollout.prompts_per_step=1", "optim.steps=1", "eval.before=false", "eval.after=false",
                    "log.progress=false", f"log.run_dir={tmp_path}", "log.name=r"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["throughput_peak"]["params"] == model_size(load_shape("smollm2-135m"), layers=2).params
    (row,) = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert row["trees_updated"] == 1 and row["update_tokens"] > 0 and row["grad_norm"] > 0


def _one_step(tmp_path, name: str, source: str) -> tuple[dict, dict]:
    cfg = config_from_dict(
        {"model": {"name": f"random:{name}", "layers": 2, "lora_r": 2, "threads": 2},
         "data": {"source": source, "image_size": 448, "n_train": 2, "n_test": 1},
         "rollout": {"K": 4, "M": 1, "thought_max_tokens": 3, "answer_max_tokens": 3, "prompts_per_step": 1}},
        [REWARD, "algo.beta=0.01", "optim.steps=1", "eval.before=false", "eval.after=false", "log.progress=false",
         f"log.run_dir={tmp_path}", "log.name=r"],
    )
    summary = train(cfg, quiet=True)
    (row,) = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    return summary, row


def _assert_one_update(summary: dict, row: dict) -> None:
    """The step sampled, ran the training forward and backward over the tree and stepped the
    optimizer (``algo.beta > 0`` keeps the tree even when a degenerate random model gives every
    leaf the same completion, hence the same reward; the gradient is then the KL's, 0 at the start)."""
    assert summary["steps"] == 1 and row["trees_updated"] >= 1 and row["skipped_updates"] == 0  # (rows: trees, or leaves for Gemma3)
    assert row["update_tokens"] > 0 and row["generated_tokens"] > 0 and math.isfinite(row["grad_norm"])


@pytest.mark.slow
@pytest.mark.parametrize("name", VLM_PRESETS)
def test_every_vlm_preset_trains_a_step_on_a_448_image_at_depth_2(tmp_path, name):
    # LoRA (r=2) keeps the optimizer state small; the backward still runs through every layer.
    summary, row = _one_step(tmp_path, name, "visual")
    _assert_one_update(summary, row)
    lora = model_size(load_shape(name), lora_r=2, layers=2)
    assert summary["throughput_peak"]["params"] == lora.params + lora.lora_params


@pytest.mark.slow
@pytest.mark.parametrize("name", TEXT_PRESETS)
def test_every_text_preset_trains_a_step_at_depth_2(tmp_path, name):
    summary, row = _one_step(tmp_path, name, "arithmetic")
    _assert_one_update(summary, row)
