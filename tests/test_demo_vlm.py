"""configs/demo-vlm.yaml runs unchanged on other VLMs: only ``model.name`` changes (a hub preset
such as ``Qwen/Qwen2.5-VL-3B-Instruct`` on a GPU; the tiny families here, offline)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlm_treegrpo.config import load_config
from vlm_treegrpo.train.loop import train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo-vlm.yaml"
TINY = ["data.n_train=6", "data.n_test=2", "optim.steps=1", "rollout.prompts_per_step=2", "model.autocast=none",
        "log.progress=false"]


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-smolvlm"])
def test_demo_vlm_config_trains_other_families(name, tmp_path):
    cfg = load_config(CONFIG, [f"model.name={name}", *TINY, f"log.run_dir={tmp_path}"])
    assert cfg.data.source == "visual_math" and (cfg.rollout.K, cfg.rollout.M) == (4, 2)
    threads = torch.get_num_threads()
    try:
        summary = train(cfg, quiet=True)
    finally:
        torch.set_num_threads(threads)
    assert summary["model"] == name and summary["steps"] == 1 and summary["eval_after"]["n"] == 2
    assert "eval_warm" not in summary  # (a random-init model has no warm start to report)


def test_demo_vlm_config_names_a_hub_preset():
    cfg = load_config(CONFIG, ["model.name=Qwen/Qwen2.5-VL-3B-Instruct", "model.autocast=auto"])
    assert cfg.model.name == "Qwen/Qwen2.5-VL-3B-Instruct" and cfg.data.source == "visual_math"
