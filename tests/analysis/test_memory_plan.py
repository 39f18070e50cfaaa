"""The memory plan: exact parameter counts, the arithmetic of each part, the verdict, and the
``plan`` command through the real CLI."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_treegrpo.cli import main
from vlm_treegrpo.analysis.memory_plan import GIB, ModelSize, Workload, lora_param_count, model_size, plan_rows, verdict
from vlm_treegrpo.models.shapes import build_random_text, load_shape
from vlm_treegrpo.policy.factory import apply_lora

SIZE = ModelSize(params=GIB, lora_params=GIB // 64, layers=4, hidden=8, intermediate=16, kv_dim=4, vocab=32)


def _row(rows, lora, sharded, ckpt):
    (row,) = [r for r in rows if (r["lora"], r["sharded"], r["checkpointing"]) == (lora, sharded, ckpt)]
    return row


def test_model_size_at_depth_2_equals_the_built_model():
    shape = load_shape("smollm2-135m")
    model, _ = build_random_text(shape, layers=2)
    size = model_size(shape, layers=2)
    assert size.params == sum(p.numel() for p in model.parameters())
    assert (size.layers, size.hidden, size.intermediate, size.kv_dim, size.vocab) == (2, 576, 1536, 3 * 64, 49152)


def test_lora_count_equals_peft_trainable_parameters():
    shape = load_shape("smollm2-135m")
    model, _ = build_random_text(shape, layers=2)
    targets = ["q_proj", "v_proj", "down_proj"]
    expected = lora_param_count(model, 4, targets)
    peft_model = apply_lora(model, 4, 8.0, targets)
    assert expected == sum(p.numel() for p in peft_model.parameters() if p.requires_grad) > 0


def test_plan_rows_arithmetic():
    w = Workload(gpus=4, gpu_memory_gib=80, prompt_tokens=10, prompts_per_step=8, K=2, M=3, thought_tokens=5,
                 answer_tokens=2, micro_batch=1, reference=True, act_bytes=2)
    assert w.tree_tokens == 10 + 2 * 5 + 2 * 3 * 2 and w.local_prompts == 2
    rows = plan_rows(SIZE, w)
    assert len(rows) == 8
    full = _row(rows, False, False, False)
    assert (full["weights"], full["gradients"], full["optimizer"], full["reference"]) == (4.0, 4.0, 8.0, 4.0)
    sharded = _row(rows, False, True, False)
    assert (sharded["weights"], sharded["optimizer"], sharded["reference"]) == (1.0, 2.0, 1.0)
    lora = _row(rows, True, False, False)
    assert lora["weights"] == 2.0 + 4 / 64 and lora["gradients"] == 4 / 64 and lora["reference"] == 0.0
    tokens = 32  # one tree per forward
    per_layer = 2 * (8 * 8 + 2 * 4 + 4 * 16)
    assert full["activations"] * GIB == tokens * 4 * per_layer
    assert _row(rows, False, False, True)["activations"] * GIB == tokens * 4 * 2 * 8 + tokens * per_layer
    assert full["logits"] * GIB == tokens * 32 * 8
    assert full["kv_cache"] * GIB == 2 * 2 * 3 * tokens * 4 * 2 * 4 * 2  # 12 leaves of 32 tokens, K and V, bf16
    for r in rows:
        parts = ("weights", "gradients", "optimizer", "reference", "activations", "logits", "kv_cache")
        assert r["total"] == pytest.approx(sum(r[p] for p in parts))
    assert plan_rows(SIZE, Workload(gpus=1)) and all(not r["sharded"] for r in plan_rows(SIZE, Workload(gpus=1)))


def test_verdict_suggests_the_smallest_change_that_fits():
    rows = plan_rows(SIZE, Workload(gpus=4, gpu_memory_gib=10, reference=False))  # full: 16 GiB; sharded: 4 GiB
    v = verdict(rows, lora=False, sharded=False, ckpt=False)
    assert not v["fits"] and (v["fix"]["lora"], v["fix"]["sharded"]) == (False, True)
    v1 = verdict(plan_rows(SIZE, Workload(gpus=1, gpu_memory_gib=10)), lora=False, sharded=False, ckpt=False)
    assert not v1["fits"] and v1["fix"]["lora"]  # (one GPU: only LoRA brings it under 9 GiB)
    v2 = verdict(plan_rows(SIZE, Workload(gpus=1, gpu_memory_gib=1)), lora=False, sharded=False, ckpt=False)
    assert not v2["fits"] and v2["fix"] is None
    assert verdict(rows, lora=True, sharded=False, ckpt=True)["fits"]


def _cli() -> list[str]:
    exe = shutil.which("vlm-treegrpo", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "vlm_treegrpo.cli"]


def test_plan_command_says_what_fits_and_what_makes_it_fit(tmp_path):
    ok = subprocess.run(_cli() + ["plan", "--model", "random:qwen2.5-vl-7b", "--gpus", "8", "--gpu-memory", "80",
                                  "--json", str(tmp_path / "plan.json")], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "8.29B parameters" in ok.stdout and "fits: full fine-tune, sharded" in ok.stdout
    assert (tmp_path / "plan.json").exists()
    tight = subprocess.run(_cli() + ["plan", "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--gpu-memory", "40"],
                           capture_output=True, text=True, timeout=300)
    assert tight.returncode == 1 and "does not fit: full fine-tune, not sharded, no checkpointing" in tight.stdout
    assert "LoRA, not sharded" in tight.stdout.splitlines()[-1]
    bad = subprocess.run(_cli() + ["plan", "--model", "random:nope"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "random:qwen2.5-vl-3b" in bad.stderr and "Traceback" not in bad.stderr


def test_plan_from_a_training_config_asks_about_its_own_setting(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model: {name: 'random:qwen2.5-vl-3b', lora_r: 8, gradient_checkpointing: true}\n"
                      "rollout: {K: 4, M: 2, thought_max_tokens: 128, answer_max_tokens: 64, prompts_per_step: 4}\n")
    assert main(["plan", "--config", str(config), "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("fits: LoRA, not sharded, checkpointing needs")
    assert "1536 tokens per tree, 4 prompts per GPU" in out  # 512 prompt + 4 x 128 thought + 8 x 64 answer
