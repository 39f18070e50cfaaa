"""`vlm-treegrpo export`: bf16 safetensors with the tokenizer / processor and its chat template, a
model card with the run's facts and held-out figures, a LoRA run's adapter (merged on request),
--push-to-hub; and LoRA's default targets leave a VLM's vision tower alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

from vlm_treegrpo.cli import main as cli_main
from vlm_treegrpo.config import ConfigError, config_from_dict, load_config
from vlm_treegrpo.policy.factory import build_policy, checkpoint_config, load_checkpoint_policy, make_policy, vision_tower_prefix
from vlm_treegrpo.train import export as exp
from vlm_treegrpo.train.loop import train

ROOT = Path(__file__).resolve().parents[2]


def _train(run_dir: Path, name: str, *extra: str) -> Path:
    cfg = load_config(ROOT / "configs/tiny-llama.yaml", [f"log.run_dir={run_dir}", f"log.name={name}", "log.progress=false",
                                                         "optim.steps=1", "log.checkpoint_every=1", "data.n_test=2", *extra])
    train(cfg, quiet=True)
    return run_dir / name / "checkpoint"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    return {"full": _train(tmp, "full"), "lora": _train(tmp, "lora", "model.lora_r=4")}


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_full_run_exports_bf16_safetensors_tokenizer_and_model_card(runs, tmp_path, capsys):
    out = tmp_path / "model"
    assert cli_main(["export", str(runs["full"]), str(out)]) == 0
    assert "model, bfloat16 weights, model card (step 1 of" in capsys.readouterr().out
    weights = _safetensors(out / "model.safetensors")
    trained = load_checkpoint_policy(runs["full"], "cpu", "float32").model.state_dict()
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    assert all(torch.equal(weights[k], trained[k].to(torch.bfloat16)) for k in weights)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    reloaded = make_policy(str(out), "cpu", "auto")
    assert reloaded.tokenizer.chat_template == load_checkpoint_policy(runs["full"], "cpu").tokenizer.chat_template

    card = (out / "README.md").read_text()
    summary = json.loads((runs["full"].parent / "summary.json").read_text())
    for fact in ("library_name: transformers", "| base model | `tiny-llama` |", "`arithmetic` (synthetic, difficulty 1), 64 training examples",
                 "loss grpo, clip [0.8, 1.2]", "K x M = 2 x 2 (4 completions per prompt)", "step 1 of 1",
                 f"| before | {summary['eval_before']['accuracy']:.4f} |", f"| after | {summary['eval_after']['accuracy']:.4f} |",
                 "Greedy accuracy on 2 held-out problems (the run's summary, 1 training steps)"):
        assert fact in card, fact
    assert "base_model:" not in card  # (a built-in name, not a hub id)


def test_export_dtype_follows_the_run_or_the_flag():
    cfg = config_from_dict({})
    assert exp.export_dtype(cfg) == "bfloat16"
    assert exp.export_dtype(config_from_dict({}, ["model.dtype=float16"])) == "float16"
    assert exp.export_dtype(cfg, "float32") == "float32"
    with pytest.raises(ConfigError, match="export --dtype"):
        exp.export_dtype(cfg, "int8")


def test_lora_run_exports_its_adapter_and_on_request_the_merged_model(runs, tmp_path):
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert cli_main(["export", str(runs["lora"]), str(adapter)]) == 0
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "model.safetensors").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
    assert "library_name: peft" in (adapter / "README.md").read_text()
    base = make_policy("tiny-llama", "cpu", "float32").model
    via_peft = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    want = load_checkpoint_policy(runs["lora"], "cpu", "float32").model.state_dict()
    assert via_peft.keys() == want.keys() and all(torch.equal(via_peft[k], want[k]) for k in want)

    assert cli_main(["export", str(runs["lora"]), str(merged), "--merge", "--dtype", "float32"]) == 0
    assert (merged / "adapter" / "adapter_model.safetensors").is_file()
    got = make_policy(str(merged), "cpu", "float32").model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_push_to_hub_uploads_the_directory_and_a_failure_is_one_line(runs, tmp_path, monkeypatch, capsys):
    calls = []

    class FakeApi:
        def create_repo(self, repo, exist_ok, private):
            calls.append(("create_repo", repo, exist_ok, private))
            return f"https://huggingface.co/{repo}"

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload_folder", Path(folder_path).name, repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(exp, "HfApi", FakeApi)
    out = tmp_path / "m"
    assert cli_main(["export", str(runs["full"]), str(out), "--push-to-hub", "me/tiny", "--private"]) == 0
    assert "pushed to https://huggingface.co/me/tiny" in capsys.readouterr().out
    assert calls[0] == ("create_repo", "me/tiny", True, True)
    assert calls[1][:3] == ("upload_folder", "m", "me/tiny") and {"README.md", "model.safetensors", "config.json"} <= set(calls[1][3])

    class Offline(FakeApi):
        def create_repo(self, repo, exist_ok, private):
            raise OSError("no network\nsecond line")

    monkeypatch.setattr(exp, "HfApi", Offline)
    assert cli_main(["export", str(runs["full"]), str(tmp_path / "n"), "--push-to-hub", "me/tiny"]) == 2
    err = capsys.readouterr().err  # (transformers' own progress bar writes there too)
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: export --push-to-hub: me/tiny: OSError: no network (the export is in") and "second line" not in err
    assert (tmp_path / "n" / "model.safetensors").is_file()


def test_export_refuses_what_is_not_a_checkpoint(runs, tmp_path, capsys):
    assert cli_main(["export", str(runs["full"].parent), str(tmp_path / "x")]) == 2
    assert "is not a training checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["tiny-smolvlm", "tiny-qwen2.5-vl"])
def test_lora_leaves_the_vision_tower_alone_unless_asked(family):
    def lora_modules(*extra):
        m = config_from_dict({}, [f"model.name={family}", "model.lora_r=2", *extra]).model
        policy = build_policy(m, "cpu", "float32", "eager")
        return policy, {n.rsplit(".lora_A", 1)[0] for n, _ in policy.model.named_modules() if n.endswith(".lora_A")}

    policy, default = lora_modules()
    tower = vision_tower_prefix(policy)
    assert tower is not None and default and not any(f".{tower}." in f".{n}" for n in default)
    _, with_vision = lora_modules("model.lora_vision=true")
    assert with_vision > default and any(f".{tower}." in f".{n}" for n in with_vision - default)
    with pytest.raises(ConfigError, match="model.lora_targets: no module"):
        build_policy(config_from_dict({}, [f"model.name={family}", "model.lora_r=2", "model.lora_targets=[nothing]"]).model,
                     "cpu", "float32", "eager")


def test_a_checkpoint_from_before_lora_vision_keeps_its_vision_adapters(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"step": 1, "config": {"model": {"name": "tiny-smolvlm", "lora_r": 2}}}))
    assert checkpoint_config(tmp_path)["model"] == {"name": "tiny-smolvlm", "lora_r": 2, "lora_vision": True}
    (tmp_path / "meta.json").write_text(json.dumps({"step": 1, "config": {"model": {"lora_vision": False}}}))
    assert checkpoint_config(tmp_path)["model"] == {"lora_vision": False}
