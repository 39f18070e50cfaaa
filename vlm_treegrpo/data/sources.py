"""Build the train/test example lists a config asks for."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vlm_treegrpo.data.arithmetic import ANSWER_INSTRUCTION, arithmetic_splits
from vlm_treegrpo.data.file_task import load_records_task
from vlm_treegrpo.data.prompting import DEFAULT_TEMPLATE, styled
from vlm_treegrpo.data.types import Example
from vlm_treegrpo.data.visual import VISUAL_INSTRUCTION, visual_splits
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
    held_out: list[int] = field(default_factory=list)
    """Indices of the training split's records held out for evaluation ([] when the test
    examples have a split or source of their own, and for synthetic tasks)."""
    note: str = ""
    """One line for the log saying which records were held out, else empty."""


def load_task(source: str, format: str, n_train: int, n_test: int, difficulty: int, seed: int,
              instruction: str = "default", test_source: str = "", skip_bad: bool = False,
              image_size: int = 64, kinds: list[str] | None = None, train_split: str = "train",
              test_split: str = "test", columns: dict[str, str] | None = None, test_fraction: float = 0.1) -> Task:
    """A synthetic task (``arithmetic``; ``visual``: one ``image_size`` px image per question,
    question kinds restricted to ``kinds`` when given), or records of a file, folder or hub
    dataset in ``format`` (``auto`` detects it; ``visual``: image-question records), read by
    :func:`~vlm_treegrpo.data.file_task.load_records_task`."""
    if source == "arithmetic":
        train, test = arithmetic_splits(n_train, n_test, seed, difficulty)
        return Task(train, test, _instruction(instruction, source))
    if source == "visual":
        train, test = visual_splits(n_train, n_test, seed, difficulty, image_size, kinds or None)
        return Task(train, test, _instruction(instruction, source))
    if source == "visual_math":  # (64 x 64 images: one cell per image token of smolvlm-smollm2)
        train, test = visual_math_splits(n_train, n_test, seed, difficulty, kinds or None)
        return Task(train, test, _instruction(instruction, source))
    got = load_records_task(source, format, n_train, n_test, seed, test_source, skip_bad, train_split, test_split,
                            columns, test_fraction)
    return Task(got.train, got.test, _instruction(instruction, got.format), got.skipped, got.held_out, got.note)


def _instruction(instruction: str, key: str) -> str:
    """``instruction``, or the default of the synthetic source / record format ``key``."""
    return DEFAULT_INSTRUCTIONS[key] if instruction == "default" else instruction


def task_from_config(d) -> Task:
    """:func:`load_task` for a :class:`~vlm_treegrpo.config.DataConfig` ``d`` (every one of its fields),
    its prompts rendered through ``d.template`` with ``d.system_prompt`` when either is set."""
    task = load_task(d.source, d.format, d.n_train, d.n_test, d.difficulty, d.seed, d.instruction, d.test_source, d.skip_bad,
                     image_size=d.image_size, kinds=d.kinds, train_split=d.train_split, test_split=d.test_split,
                     columns=d.columns, test_fraction=d.test_fraction)
    if d.template == DEFAULT_TEMPLATE and not d.system_prompt:
        return task
    return dataclasses.replace(task, train=styled(task.train, d.template, task.instruction, d.system_prompt),
                               test=styled(task.test, d.template, task.instruction, d.system_prompt), instruction="")
