"""The example configs for real models load, name a known model, and train a step as written (updates_per_batch included),
with the model swapped for the same family's tiny random one and the data for the synthetic
task (the hub cannot be reached here)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlm_treegrpo.config import load_config
from vlm_treegrpo.models.loader import BUILTINS
from vlm_treegrpo.train.loop import train
from vlm_treegrpo.vlm.registry import TINY_NAMES, presets

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "qwen2.5-vl-3b-geometry3k": ("qwen2.5-vl", "hiyouga/geometry3k", "grpo"),
    "qwen3-vl-4b-mathvista": ("qwen3-vl", "hiyouga/geometry3k", "gspo"),
    "smollm2-gsm8k": (None, "openai/gsm8k:main", "cispo"),
}


def _tiny(family: str | None) -> str:
    return "tiny-llama" if family is None else next(name for name, fam in TINY_NAMES.items() if fam == family)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_config_loads_and_names_a_known_model(name):
    family, source, loss = EXAMPLES[name]
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    if family is None:
        assert cfg.model.name in BUILTINS
    else:
        assert presets()[cfg.model.name][0] == family
    assert (cfg.data.source, cfg.algo.loss, cfg.log.name) == (source, loss, name)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_config_trains_a_step_on_its_tiny_family(name, tmp_path):
    family = EXAMPLES[name][0]
    small = [f"model.name={_tiny(family)}", f"data.source={'arithmetic' if family is None else 'visual'}", "data.format=gsm8k",
             "data.test_source=", "data.instruction=default", "data.n_train=8", "data.n_test=2", "rollout.thought_max_tokens=4",
             "rollout.answer_max_tokens=4", "rollout.prompts_per_step=2", "optim.steps=1", "optim.warmup_steps=0", "eval.every=0", "eval.after=false",
             "eval.before=false", "model.gradient_checkpointing=false", f"log.run_dir={tmp_path}", "log.progress=false",
             "log.report_to=[]", "log.checkpoint_every=0", "log.save_best=false", "data.skip_bad=false"]
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", small)
    summary = train(cfg, quiet=True)
    assert summary["steps"] == 1 and summary["updates_skipped"] == 0
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and all(r["loss"] == r["loss"] for r in rows)  # (finite: not NaN)
