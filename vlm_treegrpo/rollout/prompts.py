"""Turn examples into chat-formatted prompt token ids with the model's own chat template."""
from __future__ import annotations

from vlm_treegrpo.data.types import Example


def user_message(example: Example, instruction: str) -> str:
    """The user turn: the problem, then the answer-format instruction (if any)."""
    return f"{example.prompt} {instruction}".strip() if instruction else example.prompt


def prompt_ids(tokenizer, example: Example, instruction: str) -> list[int]:
    """Chat-template the example as one user turn (after its system turn, if any) plus the
    generation prompt; return ids."""
    messages = [{"role": "system", "content": example.system}] if example.system else []
    messages.append({"role": "user", "content": user_message(example, instruction)})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
