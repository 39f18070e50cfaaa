"""A small byte-level BPE tokenizer built offline, for tests and smoke runs.

:func:`build_local_tokenizer` trains a byte-level BPE with the ``tokenizers`` library on a tiny
built-in corpus (English words, digits, arithmetic word problems, ``Answer:`` lines, punctuation,
newlines) and wraps it as a :class:`transformers.PreTrainedTokenizerFast` with SmolLM2's special
tokens and a ChatML chat template. It needs no network and no files:

* byte-level, so any text (digits, newlines, unicode) round-trips exactly through encode/decode;
* digits are split one per token, so numbers tokenize the same way wherever they appear;
* deterministic: the same ids on every build and in every process;
* the trained tokenizer is memoized in memory only; nothing is written to disk unless ``save_dir``
  is given.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "UNK_TOKEN",
    "VOCAB_SIZE",
    "build_local_tokenizer",
]

UNK_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = UNK_TOKEN
# Ids 0, 1, 2 in this order, as in SmolLM2.
SPECIAL_TOKENS: tuple[str, ...] = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
VOCAB_SIZE = 768
MODEL_MAX_LENGTH = 1024

# ChatML, as SmolLM2 formats each turn, without SmolLM2's injected default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the a an and or but if then so of to in on at by for with from as is are was were be been "
    "has have had do does did not no yes it its this that these those there here what which who "
    "how many much more less than each every all some any one two three four five six seven eight "
    "nine ten eleven twelve twenty hundred thousand first second third last next total left right "
    "number numbers answer question problem solve step think reason because therefore final result "
    "add adds added sum plus minus times divided subtract subtracts multiply multiplied double "
    "doubles triple triples half twice packs pack box boxes bag bags apples oranges pencils books "
    "marbles stickers cookies coins cards toys friends friend buys bought gives gave away gets got "
    "sells sold finds found loses lost eats ate keeps kept starts start with owns own now after "
    "before then later still end count counts he she they we you i his her their our your my "
    "Tom Anna Maria John Lily Sam Ben Emma Noah Mia person people system user assistant you helpful "
    "write line lines on the last line as image picture shows see look color red blue green"
)

_PROBLEMS = (
    "Tom has 3 apples. He buys 4 more apples. How many apples does Tom have now?",
    "Anna has 12 pencils. She gives away 5 pencils, then buys 2 packs of 6 pencils.",
    "Maria owns 7 books. She doubles her books and then sells 3 of them.",
    "Sam starts with 20 marbles, loses 8, and then finds twice as many as he lost.",
    "Lily has 15 stickers. Her friend gives her 9 more. She triples what she has.",
    "Ben had 100 coins; he spent 45 and earned 30. How many coins are left?",
    "Solve step by step, then write the final answer on the last line as 'Answer: <number>'.",
    "3 + 4 = 7. 12 - 5 = 7. 7 * 2 = 14. 14 / 2 = 7. (6 + 9) * 3 = 45.",
    "First, 3 + 4 = 7.\nThen 7 * 2 = 14.\nSo the total is 14.\nAnswer: 14",
    "Step 1: 20 - 8 = 12.\nStep 2: 12 + 16 = 28.\nAnswer: 28",
    "Answer: 0\nAnswer: 1\nAnswer: 42\nAnswer: 365\nAnswer: 1024\n",
    "Question: What is 25% of 80? Answer: 20.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 50 99 100 256 1000 2024 -3 3.14 1,000",
    "Hello, world! Yes; no: maybe? \"quoted\" 'single' (paren) [bracket] {brace} a/b a_b a-b #1 $5 @x",
    "The image shows a red box and two blue bags.\n\n",
    "<think>\nI need to add the numbers.\n</think>\n",
)


def _corpus() -> Iterable[str]:
    """The built-in training corpus (a few KB of text, in a fixed order)."""
    words = _WORDS.split()
    for _ in range(3):
        yield from _PROBLEMS
    for i in range(0, len(words), 8):
        yield " ".join(words[i : i + 8]) + ".\n"
    for word in words:
        yield f" {word} {word.capitalize()}"


@functools.lru_cache(maxsize=1)
def _trained_json() -> str:
    """Train the base BPE once per process; return it serialized (callers rebuild fresh copies)."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def build_local_tokenizer(
    extra_special_tokens: Sequence[str] = (),
    save_dir: str | Path | None = None,
) -> PreTrainedTokenizerFast:
    """Build the offline ChatML byte-level BPE tokenizer.

    ``<|endoftext|>`` (id 0) is unk and pad, ``<|im_start|>`` (id 1) is bos, ``<|im_end|>`` (id 2)
    is eos. ``extra_special_tokens`` are appended after the trained vocabulary, in the given order,
    so the base ids never depend on them. No bos is added when encoding (as with SmolLM2); the chat
    template supplies the markers. When ``save_dir`` is given the tokenizer is also written there
    with ``save_pretrained``.
    """
    base = Tokenizer.from_str(_trained_json())
    extras = [t for t in dict.fromkeys(extra_special_tokens) if t not in SPECIAL_TOKENS]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=base,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        extra_special_tokens=extras,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        add_bos_token=False,
        add_eos_token=False,
    )
    if extras:
        # Make sure every extra is a real, unsplittable token even if the constructor only recorded it.
        tokenizer.add_special_tokens({"extra_special_tokens": extras}, replace_extra_special_tokens=True)
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer
