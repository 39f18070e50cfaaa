"""Tests for the offline byte-level BPE tokenizer (vlm_treegrpo.models.tokenizer)."""
from __future__ import annotations

import pytest

from vlm_treegrpo.models.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    UNK_TOKEN,
    build_local_tokenizer,
)

TEXTS = [
    "Tom has 12 apples. He buys 3 packs of 4.\nAnswer: 24",
    "0123456789 -42 3.14159 1,000,000 2+2=4 (7*6)/2",
    "naïve café, Straße, 日本語, emoji 🤖🎉, Ελληνικά, עברית",
    "  leading spaces\n\n\ttabs\r\nand trailing  ",
    "",
    "Answer:",
]


@pytest.fixture(scope="module")
def tok():
    return build_local_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_vocab_size_and_no_bos_added(tok) -> None:
    assert 512 <= len(tok) <= 1024
    ids = tok.encode("Answer: 5")
    assert BOS_TOKEN not in tok.convert_ids_to_tokens(ids)


def test_digits_are_single_tokens(tok) -> None:
    toks = tok.convert_ids_to_tokens(tok.encode("12345", add_special_tokens=False))
    assert toks == ["1", "2", "3", "4", "5"]


def test_deterministic() -> None:
    a, b = build_local_tokenizer(), build_local_tokenizer()
    text = " ".join(TEXTS)
    assert a.encode(text) == b.encode(text)
    assert a.get_vocab() == b.get_vocab()


def test_special_tokens(tok) -> None:
    assert (tok.unk_token, tok.pad_token, tok.bos_token, tok.eos_token) == (
        UNK_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN,
    )
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    for t in (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN):
        assert tok.encode(t, add_special_tokens=False) == [tok.convert_tokens_to_ids(t)]
    # A special token inside text stays one id.
    ids = tok.encode(f"hi{EOS_TOKEN}there", add_special_tokens=False)
    assert ids.count(tok.eos_token_id) == 1


def test_extra_special_tokens_appended() -> None:
    base = build_local_tokenizer()
    tok = build_local_tokenizer(extra_special_tokens=("<image>", "<think>"))
    assert len(tok) == len(base) + 2
    image_id, think_id = tok.convert_tokens_to_ids(["<image>", "<think>"])
    assert (image_id, think_id) == (len(base), len(base) + 1)
    assert tok.encode("<image>", add_special_tokens=False) == [image_id]
    assert tok.encode("a <think> b", add_special_tokens=False).count(think_id) == 1
    # Base ids do not depend on the extras.
    assert tok.encode(TEXTS[0]) == base.encode(TEXTS[0])


def test_chat_template(tok) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "Answer: 5"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\nAnswer: 5<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids[0] == tok.bos_token_id and ids.count(tok.eos_token_id) == 1
    assert tok.decode(ids) == prompt


def test_no_disk_unless_asked(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    build_local_tokenizer()
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "tok"
    tok = build_local_tokenizer(save_dir=out)
    assert (out / "tokenizer.json").exists()
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(out)
    assert again.encode(TEXTS[2]) == tok.encode(TEXTS[2])
    assert again.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False
    ) == "<|im_start|>user\nx<|im_end|>\n"
