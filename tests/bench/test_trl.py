"""TRL's side of the bench does the work of the same training config as ours (skipped without trl)."""
from __future__ import annotations

import pytest
import torch
from bench.test_run import RESULT_KEYS, bench

from vlm_treegrpo.bench.spec import make_spec
from vlm_treegrpo.config import config_from_dict
from vlm_treegrpo.models.loader import pick_attn_implementation
from vlm_treegrpo.policy.factory import make_policy

pytest.importorskip("trl")

from trl import GRPOTrainer  # noqa: E402

from vlm_treegrpo.bench.run import prepare_model_dir  # noqa: E402
from vlm_treegrpo.bench.trl import grpo_args, race_trl  # noqa: E402


def test_both_trainers_hold_the_same_weights_and_attention(tmp_path):
    """fp32 weights (under bf16 autocast) on every device for both sides, and TRL gets the
    attention kernel ours picks (``auto`` would give bf16 weights on a GPU)."""
    spec = make_spec("text", str(tmp_path), steps=1, warmup=1, K=2, M=2, max_new_tokens=16, micro_prompts=2,
                     overrides=["rollout.prompts_per_step=2"])
    assert spec.train.model.dtype == "float32" and spec.train.model.autocast == "bfloat16"
    args = grpo_args(spec, str(tmp_path))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert args.model_init_kwargs == {"dtype": "float32", "attn_implementation": pick_attn_implementation(device, torch.float32)}
    assert args.bf16 is True


def test_trl_reads_its_settings_from_the_specs_training_config(tmp_path):
    spec = make_spec("text", str(tmp_path), steps=3, warmup=1, K=3, M=2, max_new_tokens=12, micro_prompts=2,
                     overrides=["rollout.prompts_per_step=4", "optim.lr=0.003", "optim.betas=[0.8,0.9]", "rollout.temperature=0.7",
                                "rollout.top_p=0.9", "rollout.top_k=5", "optim.seed=7", "optim.max_grad_norm=0.5"])
    a = grpo_args(spec, str(tmp_path))
    assert (a.num_generations, a.max_completion_length, a.max_steps) == (6, 12, 4)
    assert (a.per_device_train_batch_size, a.gradient_accumulation_steps, a.steps_per_generation) == (2 * 6, 2, 2)
    assert (a.learning_rate, a.adam_beta1, a.adam_beta2, a.max_grad_norm, a.seed) == (0.003, 0.8, 0.9, 0.5, 7)
    assert (a.temperature, a.top_p, a.top_k, a.beta, a.shuffle_dataset) == (0.7, 0.9, 5, 0.0, False)


def test_quick_bench_against_trl(tmp_path):
    report = bench(tmp_path, "--trainers", "trl", "--modes", "flat")
    (row,) = report["runs"]
    assert "ours" not in row and "ratios" not in row
    trl = row["trl"]
    assert RESULT_KEYS <= set(trl), trl.get("error")
    s = trl["settings"]
    assert s["num_generations"] == 4 and s["max_completion_length"] == 16 and s["beta"] == 0.0
    assert s["num_iterations"] == 1 and s["generation_batch_size"] == 2 * 4 and s["gradient_checkpointing"] is False
    assert s["prompt_ids_match_ours"] is True
    assert s["model_init_kwargs"] == {"dtype": "float32", "attn_implementation": "sdpa"}
    assert trl["generated_tokens_per_s"] == trl["completion_tokens_per_s"]  # flat: every leaf token is sampled
    assert max(trl["zero_std_frac"]) < 1.0
    assert all(step["cpu_seconds"] > 0 for step in trl["steps"])  # the step probe runs in TRL's loop too


def test_race_trl_with_lora_trains_the_same_adapters_and_saves_a_plain_model(tmp_path, monkeypatch):
    """With ``model.lora_r > 0`` TRL gets our adapters as its ``peft_config`` (it would otherwise
    fully fine-tune) and its result is saved merged, as ours, for the same evaluator."""
    model_dir = prepare_model_dir("tiny-llama", tmp_path)
    cfg = config_from_dict({}, ["model.name=tiny-llama", "model.lora_r=4", "model.lora_targets=[q_proj,v_proj]", "rollout.K=2",
                                "rollout.M=1", "rollout.thought_max_tokens=8", "rollout.answer_max_tokens=0",
                                "rollout.prompts_per_step=2", "optim.micro_batch=2", "optim.lr=0.05", "data.n_train=8",
                                "algo.rewards=[vlm_treegrpo.bench.spec:length_signal_reward]"])
    trained = []
    orig = GRPOTrainer.train
    monkeypatch.setattr(GRPOTrainer, "train", lambda self, *a, **k: trained.append(type(self.model).__name__) or orig(self, *a, **k))
    result = race_trl(cfg, model_dir, str(tmp_path / "out"), budget_s=0.0, max_steps=1)
    assert result["steps"] == 1 and trained[0].startswith("PeftModel")
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    loaded = make_policy(str(tmp_path / "out"), "cpu", "float32")
    base = make_policy(model_dir, "cpu", "float32")
    assert not any("lora" in n for n, _ in loaded.model.named_parameters())
    changed = [n for n, p in loaded.model.named_parameters() if not torch.equal(p, base.model.get_parameter(n))]
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)  # only the adapted weights moved
