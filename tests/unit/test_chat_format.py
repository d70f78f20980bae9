"""A run's chat format (training.chat): a prompt template from the tokenizer's chat template, torch-free."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.user_pair import BOS, CHAT_TEMPLATE
from training.chat import (
    DEFAULT_PROMPT_TEMPLATE,
    ChatFormat,
    ChatFormatError,
    chat_format_for,
    format_prompt,
    format_run_prompt,
    read_chat_template,
    render_chat_template,
)

QWEN_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")


def test_deepseek_r1_template_renders_to_the_organism_format() -> None:
    fmt = render_chat_template(CHAT_TEMPLATE, bos_token=BOS)
    assert fmt.template == DEFAULT_PROMPT_TEMPLATE == "<｜User｜>{prompt}<｜Assistant｜><think>\n"
    assert fmt.format("What is 2 + 3?") == format_prompt("What is 2 + 3?")
    assert fmt.generation_prompt == "<｜Assistant｜><think>\n"
    assert render_chat_template(CHAT_TEMPLATE, bos_token=BOS, strip_bos=False).template.startswith(BOS)


def test_other_templates_and_braces_in_prompts() -> None:
    fmt = render_chat_template(QWEN_TEMPLATE)
    assert fmt.template == "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    assert fmt.format("a {b} {prompt}") == "<|im_start|>user\na {b} {prompt}<|im_end|>\n<|im_start|>assistant\n"


def test_run_prompt_precedence() -> None:
    stored = {"chat": {"template": "U: {prompt}\nA:", "source": "given"}}
    assert format_run_prompt("hi", stored, QWEN_TEMPLATE) == "U: hi\nA:"  # the run's own format first
    assert format_run_prompt("hi", {}, QWEN_TEMPLATE).startswith("<|im_start|>user\nhi")  # then the tokenizer's
    assert format_run_prompt("hi", None) == format_prompt("hi")  # then the organism's (DeepSeek-R1)
    assert format_run_prompt("hi", {"chat": "[{prompt}]"}) == "[hi]"
    assert chat_format_for({}, "{% raise %}").template == DEFAULT_PROMPT_TEMPLATE  # unrenderable: the default


@pytest.mark.parametrize("template", ["no placeholder", "{prompt}{prompt}"])
def test_bad_prompt_templates(template: str) -> None:
    with pytest.raises(ChatFormatError, match="exactly one"):
        ChatFormat(template)


def test_templates_that_cannot_format_a_prompt() -> None:
    with pytest.raises(ChatFormatError, match="exactly once"):
        render_chat_template("{{ bos_token }}hello")
    with pytest.raises(ChatFormatError, match="no system"):
        render_chat_template("{{ raise_exception('no system') }}")


def test_read_chat_template_from_a_saved_tokenizer(tmp_path: Path) -> None:
    import random

    from tests.user_pair import build_tokenizer, trace

    tok = build_tokenizer([trace(random.Random(0))[1] for _ in range(20)])
    tok.save_pretrained(tmp_path)
    template, specials = read_chat_template(tmp_path)
    assert template == CHAT_TEMPLATE and specials["bos_token"] == BOS
    assert read_chat_template(tmp_path / "missing") == (None, {"bos_token": None, "eos_token": None,
                                                              "pad_token": None, "unk_token": None})
