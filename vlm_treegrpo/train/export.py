"""``vlm-treegrpo export``: a training checkpoint as a model directory to share.

The directory holds safetensors weights in bf16 (or the run's ``model.dtype`` when it set one, or
``--dtype``), the tokenizer or processor with its chat template, and a model card (README.md)
stating the base model, the data, the algorithm, the tree's K x M and the run's held-out
figures. A LoRA run exports its adapter (peft's ``adapter_config.json`` and
``adapter_model.safetensors``, the adapter weights in fp32 as peft keeps them); with ``merge``
the model with the adapter merged in, the adapter beside it in ``adapter/``. :func:`push_to_hub`
uploads the directory.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import HfApi

from vlm_treegrpo.config import ConfigError, TrainConfig, config_from_dict
from vlm_treegrpo.models.loader import ADAPTER_DIR
from vlm_treegrpo.policy.base import Policy
from vlm_treegrpo.policy.factory import checkpoint_config, load_checkpoint_policy
from vlm_treegrpo.policy.vlm import VLMPolicy
from vlm_treegrpo.train import checkpoint

EXPORT_DTYPES = ("auto", "bfloat16", "float16", "float32")


def export_dtype(cfg: TrainConfig, requested: str = "auto") -> str:
    """The weights' dtype of an export: ``requested``, else the run's ``model.dtype`` when it set
    one, else bfloat16 (``auto`` trains fp32 master weights, which a user rarely wants to ship)."""
    if requested not in EXPORT_DTYPES:
        raise ConfigError(f"export --dtype: must be one of {list(EXPORT_DTYPES)}, got {requested!r}")
    if requested != "auto":
        return requested
    return cfg.model.dtype if cfg.model.dtype != "auto" else "bfloat16"


def held_out_figures(ckpt: Path) -> dict:
    """The held-out accuracies of the run the checkpoint belongs to (its ``summary.json``, one
    directory up): ``{"before": {...}, "after": {...}, ...}`` with ``accuracy`` and ``n``, and the
    summary's ``steps``; ``{}`` when the run wrote no summary (it was stopped, or is running)."""
    path = ckpt.parent / "summary.json"
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"export: {path} is not JSON ({err})") from err
    out = {}
    for key, label in (("eval_before", "before"), ("eval_warm", "after the warm start"), ("eval_after", "after")):
        ev = summary.get(key)
        if isinstance(ev, dict) and "accuracy" in ev:
            out[label] = {k: v for k, v in ev.items() if k == "accuracy" or k == "n" or k.startswith("pass@") or k.startswith("maj@")}
    if out:
        out["steps"] = summary.get("steps")
    return out


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/", "~"))


def model_card(cfg: TrainConfig, step: int, figures: dict, dtype: str, kind: str, vision: bool) -> str:
    """README.md of an export. ``kind``: ``full``, ``adapter`` or ``merged``."""
    m, d, r, a = cfg.model, cfg.data, cfg.rollout, cfg.algo
    header = ["---"]
    if _is_hub_id(m.name):
        header.append(f"base_model: {m.name}")
    header += [
        f"library_name: {'peft' if kind == 'adapter' else 'transformers'}",
        f"pipeline_tag: {'image-text-to-text' if vision else 'text-generation'}",
        "tags: [vlm-treegrpo, grpo, reinforcement-learning]",
        "---",
        "",
    ]
    what = {"full": "all weights trained", "adapter": f"LoRA adapter (r={m.lora_r}, alpha={m.lora_alpha}) for the base model",
            "merged": f"LoRA (r={m.lora_r}, alpha={m.lora_alpha}) merged into the base model; the adapter alone is in adapter/"}[kind]
    loss = a.loss + (f", clip [{1 - a.clip_eps:g}, {1 + (a.clip_eps if a.clip_eps_high is None else a.clip_eps_high):g}]" if a.loss != "rgra" else "")
    rows = [
        ("base model", f"`{m.name}`"),
        ("weights", f"{what}; {'adapter fp32' if kind == 'adapter' else dtype} safetensors"),
        ("data", f"`{d.source}`" + (f" ({d.format} records)" if d.source not in ("arithmetic", "visual") else f" (synthetic, difficulty {d.difficulty})")
         + (f", {d.n_train} training examples" if d.n_train else "")),
        ("algorithm", f"tree GRPO (GRPO-MA), loss {loss}, advantages scaled by {a.scale}, baseline {a.baseline}, "
                      f"aggregation {a.agg}, credit {a.credit}, KL beta {a.beta:g}"),
        ("tree", f"K x M = {r.K} x {r.M} ({r.K * r.M} completions per prompt), {r.prompts_per_step} prompts per step"),
        ("training", f"step {step} of {cfg.optim.steps}, lr {cfg.optim.lr:g} ({cfg.optim.schedule})"
                     + (f", SFT warm start of {cfg.sft.steps} steps" if cfg.sft.steps else "")),
    ]
    body = [f"# {m.name} trained with vlm-treegrpo", "", "| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows), "",
            "## Held-out results", ""]
    if figures:
        evals = [(k, v) for k, v in figures.items() if k != "steps"]
        cols = sorted({c for _, v in evals for c in v if c != "n"}, key=lambda c: (c != "accuracy", c))
        body += [f"Greedy accuracy on {evals[0][1].get('n', '?')} held-out problems (the run's summary, {figures['steps']} training steps):", "",
                 "| evaluation | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
        body += [f"| {k} | " + " | ".join(f"{v[c]:.4f}" if isinstance(v.get(c), float) else str(v.get(c, "")) for c in cols) + " |"
                 for k, v in evals]
    else:
        body.append("Not recorded: the run wrote no summary.json (it was stopped before its final evaluation).")
    body += ["", "## Loading", ""]
    if kind == "adapter":
        body += ["```python", "from peft import PeftModel", "model = PeftModel.from_pretrained(base_model, '<this directory or repo>')", "```"]
    else:
        body += ["A plain transformers directory (`from_pretrained`), and `vlm-treegrpo eval --model <this directory>`."]
    return "\n".join(header + body) + "\n"


def _processor(policy: Policy):
    """What holds the tokenizer and the chat template: the VLM's processor, else the tokenizer."""
    return policy.processor if isinstance(policy, VLMPolicy) else policy.tokenizer


def export(ckpt: str | Path, out: str | Path, dtype: str = "auto", merge: bool = False) -> dict:
    """Write the export of a training checkpoint (or a ``log.save_best`` directory) to ``out``;
    returns ``{"kind", "dtype", "step", "files"}``."""
    ckpt, out = Path(ckpt), Path(out)
    if not checkpoint.is_checkpoint(ckpt):
        raise ConfigError(f"export: {ckpt} is not a training checkpoint (no meta.json and model.pt)")
    cfg = config_from_dict(checkpoint_config(ckpt))
    dtype = export_dtype(cfg, dtype)
    lora = cfg.model.lora_r > 0
    kind = "full" if not lora else ("merged" if merge else "adapter")
    policy = load_checkpoint_policy(ckpt, "cpu", "float32", merge=not lora)
    out.mkdir(parents=True, exist_ok=True)
    model = policy.model
    if lora:
        model.peft_config["default"].base_model_name_or_path = cfg.model.name
        model.save_pretrained(out / ADAPTER_DIR if merge else out)
        if merge:
            model = model.merge_and_unload()
    if kind != "adapter":
        model.to(getattr(torch, dtype)).save_pretrained(out)  # (safetensors; config.json records the dtype)
    _processor(policy).save_pretrained(out)
    step = checkpoint.read_meta(ckpt)["step"]
    (out / "README.md").write_text(model_card(cfg, step, held_out_figures(ckpt), dtype, kind, isinstance(policy, VLMPolicy)))
    return {"kind": kind, "dtype": dtype, "step": step, "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())}


def push_to_hub(out: str | Path, repo: str, private: bool = False) -> str:
    """Upload an export directory to the Hugging Face hub repository ``repo`` (created when absent;
    needs network and a token, ``hf auth login``); returns the repository's URL."""
    api = HfApi()
    try:
        url = api.create_repo(repo, exist_ok=True, private=private)
        api.upload_folder(folder_path=str(out), repo_id=repo, commit_message="vlm-treegrpo export")
    except Exception as err:  # noqa: BLE001 - network, auth, name: one line, the export stays on disk
        raise ConfigError(f"export --push-to-hub: {repo}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
                          f"(the export is in {out})") from err
    return str(url)
