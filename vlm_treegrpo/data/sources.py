"""Build the train/test example lists a config asks for."""
from __future__ import annotations

from dataclasses import dataclass

from vlm_treegrpo.data.arithmetic import ANSWER_INSTRUCTION, arithmetic_splits
from vlm_treegrpo.data.loaders import load_examples
from vlm_treegrpo.data.types import Example
from vlm_treegrpo.data.visual import VISUAL_INSTRUCTION, visual_splits
from vlm_treegrpo.data.visual_loaders import load_visual_examples
from vlm_treegrpo.data.visual_math import VISUAL_MATH_INSTRUCTION, visual_math_splits

BOXED_INSTRUCTION = "Solve step by step and put the final answer in \\boxed{}."
DEFAULT_INSTRUCTIONS = {
    "arithmetic": ANSWER_INSTRUCTION,
    "visual": VISUAL_INSTRUCTION,
    "visual_math": VISUAL_MATH_INSTRUCTION,
    "gsm8k": ANSWER_INSTRUCTION,
    "math": BOXED_INSTRUCTION,
}
"""Default answer-format instruction by synthetic source, else by record format."""
SYNTHETIC = ("arithmetic", "visual", "visual_math")
"""Sources generated in-process (``format`` and ``test_source`` do not apply)."""


@dataclass
class Task:
    """Examples plus the instruction appended to every prompt."""

    train: list[Example]
    test: list[Example]
    instruction: str
    skipped: int = 0


def _load(source: str, format: str, split: str, limit: int | None, skip_bad: bool) -> tuple[list[Example], int]:
    if format == "visual":
        return load_visual_examples(source, split=split, limit=limit, skip_bad=skip_bad)
    return load_examples(source, format, split=split, limit=limit, skip_bad=skip_bad)


def load_task(source: str, format: str, n_train: int, n_test: int, difficulty: int, seed: int,
              instruction: str = "default", test_source: str = "", skip_bad: bool = False,
              image_size: int = 64, kinds: list[str] | None = None) -> Task:
    """A synthetic task (``arithmetic``; ``visual``: one ``image_size`` px image per question,
    question kinds restricted to ``kinds`` when given), or records from a local file / hub dataset in ``format`` (``visual``: image-question records)."""
    key = source if source in SYNTHETIC else format
    instr = DEFAULT_INSTRUCTIONS[key] if instruction == "default" else instruction
    if source == "arithmetic":
        train, test = arithmetic_splits(n_train, n_test, seed, difficulty)
        return Task(train, test, instr)
    if source == "visual":
        train, test = visual_splits(n_train, n_test, seed, difficulty, image_size, kinds or None)
        return Task(train, test, instr)
    if source == "visual_math":  # (64 x 64 images: one cell per image token of smolvlm-smollm2)
        train, test = visual_math_splits(n_train, n_test, seed, difficulty, kinds or None)
        return Task(train, test, instr)
    train, skipped_train = _load(source, format, "train", n_train or None, skip_bad)
    test, skipped_test = _load(test_source or source, format, "test", n_test, skip_bad)
    return Task(train, test, instr, skipped_train + skipped_test)


def task_from_config(d) -> Task:
    """:func:`load_task` for a :class:`~vlm_treegrpo.config.DataConfig` ``d`` (every one of its fields)."""
    return load_task(d.source, d.format, d.n_train, d.n_test, d.difficulty, d.seed, d.instruction, d.test_source, d.skip_bad,
                     image_size=d.image_size, kinds=d.kinds)
