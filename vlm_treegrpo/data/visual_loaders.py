"""Load Geometry3K-, CLEVR- and MathVista-style image-question records.

One converter, :func:`from_visual_record`, reads the fields these datasets share:

* image: ``decoded_image`` (MathVista's decoded image, preferred when set), else
  ``images`` (a list, Geometry3K) or ``image`` (one value, CLEVR / MathVista);
  each value is anything :func:`~vlm_treegrpo.data.images.load_image` accepts;
  an empty list makes a text-only prompt (batches may mix them with image prompts);
* question: ``problem`` or ``question``; ``<image>`` placeholders are removed
  (the rollout inserts the processor's own image tokens);
* answer: ``answer`` (string or number, kept as given, so a multiple-choice letter
  stays a letter); failing that, the text inside ``<answer>...</answer>`` of a
  ``solution`` field (R1-V style CLEVR records);
* ``choices`` (a non-empty list) is appended to the prompt as
  ``Choices: (A) ... (B) ...`` and kept in ``meta``.

A record that lacks any of these raises :class:`~vlm_treegrpo.data.loaders.DataError`
naming the record index and field; an undecodable image raises
:class:`~vlm_treegrpo.data.images.ImageError` (a ``DataError``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from vlm_treegrpo.data.images import image_ref, load_image
from vlm_treegrpo.data.loaders import LOCAL_SUFFIXES, DataError, convert_records, load_records
from vlm_treegrpo.data.types import Example

__all__ = ["from_visual_record", "load_visual_examples"]

_QUESTION_KEYS = ("problem", "question")
_META_KEYS = ("choices", "question_type", "answer_type", "unit", "precision", "pid", "id")
_IMAGE_TOKEN = re.compile(r"\s*<image>\s*")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _question(rec: dict, index: int) -> str:
    for key in _QUESTION_KEYS:
        value = rec.get(key)
        if value is not None and str(value).strip():
            text = _IMAGE_TOKEN.sub(" ", str(value)).strip()
            if not text:
                raise DataError(f"record {index}: field {key!r} holds only '<image>' placeholders")
            return text
    present = [k for k in _QUESTION_KEYS if k in rec]
    if present:
        raise DataError(f"record {index}: empty field {present[0]!r}")
    raise DataError(f"record {index}: missing field 'problem' or 'question'")


def _answer(rec: dict, index: int) -> str:
    value = rec.get("answer")
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if value is None and isinstance(rec.get("solution"), str):
        tags = _ANSWER_TAG.findall(rec["solution"])
        value = tags[-1] if tags else None
    if value is None:
        raise DataError(f"record {index}: missing field 'answer'")
    if isinstance(value, (list, tuple, dict)):
        raise DataError(f"record {index}: field 'answer' must be a string or number, "
                        f"got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise DataError(f"record {index}: empty field 'answer'")
    return text


def _images(rec: dict, index: int, base_dir: str | os.PathLike | None, lazy: bool) -> tuple:
    load = image_ref if lazy else load_image
    for key in ("decoded_image", "images", "image"):
        value = rec.get(key)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):  # (an empty list: a text-only prompt, as a mixed batch has)
            return tuple(load(v, index, f"{key}[{i}]", base_dir) for i, v in enumerate(value))
        return (load(value, index, key, base_dir),)
    raise DataError(f"record {index}: missing field 'image' or 'images'")


def _choices_text(choices: list) -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return "Choices: " + " ".join(f"({letters[i]}) {c}" for i, c in enumerate(choices))


def from_visual_record(rec: dict, index: int, base_dir: str | os.PathLike | None = None, lazy: bool = False) -> Example:
    """Convert one image-question record (see the module docstring for the fields read).

    Relative image paths are resolved against ``base_dir`` when given. With ``lazy`` the images
    are checked but not decoded (:func:`~vlm_treegrpo.data.images.image_ref`): the example holds
    :class:`~vlm_treegrpo.data.images.ImageRef` s that decode when the prompt is encoded.
    """
    if not isinstance(rec, dict):
        raise DataError(f"record {index}: expected a dict, got {type(rec).__name__}")
    prompt = _question(rec, index)
    answer = _answer(rec, index)
    choices = rec.get("choices")
    if choices is not None and not isinstance(choices, (list, tuple)):
        raise DataError(
            f"record {index}: field 'choices' must be a list, got {type(choices).__name__}"
        )
    if choices and len(choices) > 26:
        raise DataError(f"record {index}: field 'choices' has {len(choices)} entries (at most 26)")
    if choices:
        prompt = f"{prompt}\n{_choices_text(list(choices))}"
    images = _images(rec, index, base_dir, lazy)
    meta: dict[str, Any] = {"source": "visual_record", "index": index}
    for key in _META_KEYS:
        if rec.get(key) is not None:
            meta[key] = list(rec[key]) if key == "choices" else rec[key]
    return Example(prompt=prompt, answer=answer, images=images, meta=meta)


def _local_dir(source: str) -> Path | None:
    """The directory of a local data file (image paths are relative to it), else ``None``."""
    path = Path(os.path.expanduser(str(source)))
    if str(source).lower().endswith(LOCAL_SUFFIXES) or path.is_file():
        return path.resolve().parent
    return None


def load_visual_examples(
    source: str,
    split: str = "train",
    limit: int | None = None,
    skip_bad: bool = False,
) -> tuple[list[Example], int]:
    """Load image-question records from a local ``.jsonl``/``.json``/``.parquet`` file or the hub.

    Returns ``(examples, n_skipped)``, with the same contract as
    :func:`~vlm_treegrpo.data.loaders.load_examples`: with ``skip_bad=False`` the first
    bad record's ``DataError`` (an ``ImageError`` for a corrupt image) propagates;
    with ``skip_bad=True`` bad records are skipped and counted; ``limit`` caps the
    number of examples (later records are neither converted nor counted).  Image
    paths in a local file's records are resolved relative to that file's directory.
    """
    base_dir = _local_dir(source)
    convert = lambda rec, index: from_visual_record(rec, index, base_dir)  # noqa: E731
    return convert_records(load_records(source, split=split), convert, limit, skip_bad)
