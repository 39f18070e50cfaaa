"""Activation checkpointing of the packed training forward: the same gradients, to the bit, as
without it (text and VLM, full weights and LoRA), because each layer is recomputed under the
tree-attention switch it first ran under; plain checkpointing would recompute another function."""
from __future__ import annotations

import json

import pytest
import torch
import torch.utils.checkpoint

from vlm_treegrpo.config import config_from_dict
from vlm_treegrpo.data.arithmetic import make_arithmetic
from vlm_treegrpo.data.sources import task_from_config
from vlm_treegrpo.analysis.plots import timeless
from vlm_treegrpo.policy.factory import make_policy
from vlm_treegrpo.rewards.functions import RewardSet
from vlm_treegrpo.rollout import attention
from vlm_treegrpo.rollout.attention import enable_activation_checkpointing
from vlm_treegrpo.policy.factory import apply_lora
from vlm_treegrpo.train.step import rollout_step


def varied_reward(completion: str, example) -> float:
    return (len(completion) % 7) / 6.0


def _policy_and_batch(name: str, lora: bool):
    torch.manual_seed(0)
    cfg = config_from_dict({"model": {"name": name}, "rollout": {"K": 2, "M": 2, "thought_max_tokens": 5, "answer_max_tokens": 5,
                                                                 "prompts_per_step": 3}},
                           ["algo.rewards=[test_activation_checkpointing:varied_reward]"])
    policy = make_policy(name, torch.device("cpu"), "float32")
    policy.model.double()
    if lora:
        policy.model = apply_lora(policy.model, 4, 8.0, ["q_proj", "v_proj"])
    if name == "tiny-llama":
        examples = make_arithmetic(3, seed=0)
    else:
        examples = task_from_config(config_from_dict({"data": {"source": "visual", "n_train": 3, "n_test": 1}}).data).train
    prompts = [policy.encode(ex, "") for ex in examples]
    data = rollout_step(policy, examples, prompts, RewardSet.from_config(cfg.algo.rewards), cfg)
    return policy, data.packed


def _grads(policy, batch) -> dict[str, torch.Tensor]:
    policy.model.train()
    policy.model.zero_grad(set_to_none=True)
    logp = policy.logp(batch, 1.0)
    (logp * batch.advantages * batch.target_mask).sum().backward()
    return {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,lora,dense", [("tiny-llama", False, False), ("tiny-llama", True, False), ("tiny-qwen2-vl", False, False),
                                             ("tiny-llama", False, True), ("tiny-qwen2-vl", False, True)])
def test_checkpointed_layers_give_the_same_gradients(name, lora, dense, monkeypatch):
    if dense:  # the GPU's path: the dense tree mask instead of the segment plan
        monkeypatch.setattr(attention, "PLAN_DEVICES", frozenset())
    policy, batch = _policy_and_batch(name, lora)
    assert batch.advantages.abs().sum() > 0
    plain = _grads(policy, batch)
    calls = []
    original = torch.utils.checkpoint.checkpoint
    try:
        torch.utils.checkpoint.checkpoint = lambda *a, **k: calls.append(1) or original(*a, **k)
        assert enable_activation_checkpointing(policy.model) >= 2
        checkpointed = _grads(policy, batch)
    finally:
        torch.utils.checkpoint.checkpoint = original
    assert calls  # the layers did go through the checkpoint
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for k in plain:
        assert torch.equal(plain[k], checkpointed[k]), k


def test_plain_checkpointing_cannot_recompute_the_tree_forward():
    """Why :func:`checkpoint_layer` exists: transformers' own checkpointing recomputes the layer
    after the tree-attention switch is gone, and torch stops on the mismatch."""
    policy, batch = _policy_and_batch("tiny-llama", False)
    policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        _grads(policy, batch)


def test_training_with_model_gradient_checkpointing_makes_the_same_steps(tmp_path):
    from vlm_treegrpo.train.loop import train

    rows = {}
    for flag in (False, True):
        cfg = config_from_dict({}, [f"log.run_dir={tmp_path}", f"log.name=gc-{flag}", "log.progress=false", "optim.steps=2",
                                    "eval.before=false", "eval.after=false", "rollout.thought_max_tokens=5", "rollout.answer_max_tokens=5",
                                    "algo.rewards=[test_activation_checkpointing:varied_reward]", f"model.gradient_checkpointing={str(flag).lower()}"])
        train(cfg, quiet=True)
        lines = (tmp_path / f"gc-{flag}" / "metrics.jsonl").read_text().splitlines()
        rows[flag] = [timeless(json.loads(x)) for x in lines]
    assert rows[True] == rows[False] and rows[True][0]["grad_norm"] > 0
