"""data.template and data.system_prompt (vlm_treegrpo.data.prompting) from the config to the
chat-templated prompt ids of the text and the vision-language policies."""
from __future__ import annotations

import pytest

from vlm_treegrpo.config import ConfigError, config_from_dict
from vlm_treegrpo.data.prompting import DEFAULT_TEMPLATE, styled, template_problem
from vlm_treegrpo.data.sources import task_from_config
from vlm_treegrpo.data.types import Example
from vlm_treegrpo.policy.factory import make_policy
from vlm_treegrpo.rollout.prompts import user_message


def test_default_template_is_the_prompt_the_trainer_builds_without_one():
    ex = Example(prompt="What is 2+3?", answer="5")
    assert styled([ex], DEFAULT_TEMPLATE, "Box it.", "")[0].prompt == user_message(ex, "Box it.")
    assert styled([ex], DEFAULT_TEMPLATE, "", "")[0].prompt == "What is 2+3?"


def test_template_and_system_prompt_reach_every_example():
    d = config_from_dict({"data": {"n_train": 3, "n_test": 2, "template": "Problem:\n{question}\n\n{instruction} {{ok}}",
                                   "system_prompt": "Think in <think></think>, then answer."}}).data
    plain = task_from_config(config_from_dict({"data": {"n_train": 3, "n_test": 2}}).data)
    task = task_from_config(d)
    assert task.instruction == ""
    for ex, base in zip(task.train + task.test, plain.train + plain.test):
        assert ex.prompt == f"Problem:\n{base.prompt}\n\n{plain.instruction} {{ok}}"
        assert ex.system == "Think in <think></think>, then answer." and ex.answer == base.answer


@pytest.mark.parametrize("template, message", [
    ("no question", r"must hold '\{question\}'"),
    ("{{question}} {instruction}", r"must hold '\{question\}'"),
    ("{question} {answer}", r"unknown placeholder \{answer\}"),
    ("{question} }", r"cannot be parsed"),
])
def test_bad_templates_name_the_field(template, message):
    with pytest.raises(ConfigError, match=rf"^data.template: {message}"):
        config_from_dict({"data": {"template": template}})
    assert template_problem("{question} {instruction}") is None


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2-vl", "tiny-smolvlm"])
def test_system_turn_is_in_the_prompt_ids(model):
    policy = make_policy(model, "cpu", "float32")
    ex = Example(prompt="How many?", answer="1")
    plain = policy.encode(ex, "")
    with_system = policy.encode(Example(prompt="How many?", answer="1", system="Be brief zebra."), "")
    ids = lambda enc: enc if isinstance(enc, list) else enc.input_ids.tolist()  # noqa: E731
    text = policy.tokenizer.decode(ids(with_system))
    assert "Be brief zebra." in text and "Be brief zebra." not in policy.tokenizer.decode(ids(plain))
    assert text.index("Be brief zebra.") < text.index("How many?")
