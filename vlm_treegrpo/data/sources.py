"""Build the train/test example lists a config asks for."""
from __future__ import annotations

from dataclasses import dataclass

from vlm_treegrpo.data.arithmetic import ANSWER_INSTRUCTION, arithmetic_splits
from vlm_treegrpo.data.loaders import load_examples
from vlm_treegrpo.data.types import Example

BOXED_INSTRUCTION = "Solve step by step and put the final answer in \\boxed{}."
DEFAULT_INSTRUCTIONS = {"arithmetic": ANSWER_INSTRUCTION, "gsm8k": ANSWER_INSTRUCTION, "math": BOXED_INSTRUCTION}


@dataclass
class Task:
    """Examples plus the instruction appended to every prompt."""

    train: list[Example]
    test: list[Example]
    instruction: str
    skipped: int = 0


def load_task(source: str, format: str, n_train: int, n_test: int, difficulty: int, seed: int,
              instruction: str = "default", test_source: str = "", skip_bad: bool = False) -> Task:
    """The synthetic arithmetic task, or records from a local file / hub dataset."""
    key = "arithmetic" if source == "arithmetic" else format
    instr = DEFAULT_INSTRUCTIONS[key] if instruction == "default" else instruction
    if source == "arithmetic":
        train, test = arithmetic_splits(n_train, n_test, seed, difficulty)
        return Task(train, test, instr)
    train, skipped_train = load_examples(source, format, split="train", limit=n_train or None, skip_bad=skip_bad)
    if test_source:
        test, skipped_test = load_examples(test_source, format, split="test", limit=n_test, skip_bad=skip_bad)
    else:
        test, skipped_test = load_examples(source, format, split="test", limit=n_test, skip_bad=skip_bad)
    return Task(train, test, instr, skipped_train + skipped_test)
