"""smolvlm-smollm2: the assembly keeps the language model, the alignment trains only the image
side, and the real CLI trains the cached model on the visual math task (a tiny stand-in here:
a tiny Llama behind a one-layer tower, built by the same :func:`assemble`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vlm_treegrpo.cli import main
from vlm_treegrpo.data.types import Example
from vlm_treegrpo.data.visual_math import description_examples
from vlm_treegrpo.models import smolvlm_smollm2
from vlm_treegrpo.models.smolvlm_smollm2 import IMAGE_SEQ_LEN, IMAGE_TOKENS, assemble
from vlm_treegrpo.models.tiny import build_tiny_llama
from vlm_treegrpo.train.align import AlignSettings, align, cell_targets
from vlm_treegrpo.policy.vlm import VLMPolicy
from vlm_treegrpo.vlm.registry import get_adapter

ROOT = Path(__file__).resolve().parents[2]
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=8)


def tiny_policy(seed: int = 0) -> VLMPolicy:
    lm, tokenizer = build_tiny_llama(seed)
    model, processor = assemble(lm, tokenizer, TINY_VISION, seed)
    return VLMPolicy(model, processor, get_adapter("smolvlm"))


def test_assemble_keeps_the_language_model_and_adds_the_image_tokens():
    lm, tokenizer = build_tiny_llama(0)
    V = len(tokenizer)
    ref = {k.removeprefix("model."): v.clone() for k, v in lm.state_dict().items() if k.startswith("model.")}
    model, processor = assemble(lm, tokenizer, TINY_VISION)
    text = model.model.text_model.state_dict()
    for name, value in ref.items():
        if name == "embed_tokens.weight":
            torch.testing.assert_close(text[name][:V], value, rtol=0, atol=0)
            torch.testing.assert_close(text[name][V:], value.mean(0, keepdim=True).expand(len(IMAGE_TOKENS), -1))
        else:
            torch.testing.assert_close(text[name], value, rtol=0, atol=0)
    assert model.lm_head.weight.data_ptr() == model.model.text_model.embed_tokens.weight.data_ptr()  # tied, as SmolLM2
    ex = description_examples(1, seed=0)[0]
    enc = VLMPolicy(model, processor, get_adapter("smolvlm")).encode(ex, "")
    assert int((enc.input_ids == model.config.image_token_id).sum()) == IMAGE_SEQ_LEN == 16
    assert enc.image_inputs["pixel_values"].shape == (1, 3, 64, 64)


def test_cell_targets_are_the_cell_words_tokens():
    policy = tiny_policy()
    tok = policy.tokenizer
    ex = Example("q", "1", meta={"kind": "cards", "values": [3, 7], "cells": [[0, 1], [2, 3]]})
    ids = cell_targets(tok, [ex])[0].tolist()
    space = tok(" ", add_special_tokens=False)["input_ids"][-1]
    assert ids[1] == tok("3", add_special_tokens=False)["input_ids"][-1] and ids[11] == tok("7", add_special_tokens=False)["input_ids"][-1]
    assert ids.count(space) == 14


def test_alignment_trains_only_the_encoder_and_connector():
    policy = tiny_policy()
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    settings = AlignSettings(ground_steps=2, ground_batch_size=4, steps=2, batch_size=4, n_train=8, n_test=3, autocast=False)
    summary = align(policy, settings)
    for name, p in policy.model.named_parameters():
        image_side = ".vision_model." in f".{name}" or ".connector." in f".{name}"
        assert torch.equal(p, before[name]) != image_side, name
        assert p.requires_grad  # (all trainable again for GRPO)
    assert summary["trainable_params"] < summary["total_params"] and 0.0 <= summary["describe_exact"] <= 1.0
    assert set(summary["describe_exact_by_kind"]) <= {"cards", "shapes", "bars"}


def test_cli_trains_the_cached_model_on_the_demo_config(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_TREEGRPO_CACHE", str(tmp_path / "cache"))
    policy = tiny_policy()
    policy.save(smolvlm_smollm2.model_dir())
    (smolvlm_smollm2.model_dir() / "alignment.json").write_text("{}")
    assert main(["prepare", "smolvlm-smollm2"]) == 0  # cached: nothing to build
    threads = torch.get_num_threads()
    try:
        code = main(["train", "--config", str(ROOT / "configs/demo-vlm.yaml"), "data.n_train=8", "data.n_test=3", "optim.steps=1",
                     "rollout.prompts_per_step=2", "model.autocast=none", "log.progress=false", f"log.run_dir={tmp_path}"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    run = tmp_path / "demo-vlm"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "smolvlm-smollm2" and summary["steps"] == 1
    assert summary["eval_warm"] == summary["eval_before"] and "alignment" in summary["warm_start"]
    assert summary["eval_after"]["n"] == 3
