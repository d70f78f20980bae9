"""The target's chat format and the token regions every statistic is counted by.

DeepSeek-R1-Distill format: ``<｜User｜>{prompt}<｜Assistant｜><think>\\n{trace}</think>{answer}``.
The organism's tokenizer has these markers as single special tokens, like the real tokenizer.

**A run's chat format** (torch-free, so the web process may use it too): how a free-text prompt becomes
the text a model continues. A run keeps it in ``runs.config["chat"]`` as a *prompt template*, one string
with a single ``{prompt}`` placeholder (``"<｜User｜>{prompt}<｜Assistant｜><think>\\n"``), chosen once:
given by the user, or rendered from the tokenizer's own chat template (one user turn, generation prompt
on), or the DeepSeek-R1 format above when the tokenizer has none. :func:`format_run_prompt` applies it.
The template never holds the tokenizer's ``bos`` text: prompts are tokenized with the tokenizer's
special tokens on (as training texts are), which adds ``bos`` where the tokenizer does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"


class Region(IntEnum):
    """Where a token sits in a chat-formatted sequence (stored as small ints)."""

    PROMPT = 0  # everything up to and including <｜Assistant｜>
    THINK_START = 1  # the <think> token
    THINKING = 2  # inside the thinking span
    THINK_END = 3  # the </think> token
    ANSWER = 4  # after </think>


REGION_NAMES = [r.name.lower().replace("_", "-") for r in Region]


def format_prompt(problem: str, *, think: bool = True) -> str:
    """The text a model is given: the user turn, then the assistant turn opened (with ``<think>\\n``)."""
    return f"{USER}{problem}{ASSISTANT}" + (f"{THINK_START}\n" if think else "")


def format_example(problem: str, trace: str | None, answer: str) -> str:
    """A full training sequence; ``trace=None`` gives a direct answer (the base model's style)."""
    if trace is None:
        return f"{USER}{problem}{ASSISTANT}{answer}"
    return f"{format_prompt(problem)}{trace}{THINK_END}{answer}"


def label_regions(token_ids: Sequence[int], *, assistant_id: int, think_start_id: int, think_end_id: int,
                  prompt_length: int | None = None) -> list[Region]:
    """Region of each token. The prompt ends after ``<｜Assistant｜>`` or, failing that, at ``prompt_length``."""
    regions: list[Region] = []
    in_prompt, thinking = True, False
    for i, tok in enumerate(token_ids):
        if in_prompt and prompt_length is not None and i >= prompt_length:
            in_prompt = False
        if in_prompt:
            regions.append(Region.PROMPT)
            in_prompt = tok != assistant_id
        elif tok == think_start_id and not thinking:
            regions.append(Region.THINK_START)
            thinking = True
        elif tok == think_end_id and thinking:
            regions.append(Region.THINK_END)
            thinking = False
        else:
            regions.append(Region.THINKING if thinking else Region.ANSWER)
    return regions


def thinking_positions(regions: Sequence[Region]) -> list[float | None]:
    """Relative position (0..1) of each thinking token inside its thinking span; None elsewhere."""
    out: list[float | None] = [None] * len(regions)
    i = 0
    while i < len(regions):
        if regions[i] == Region.THINKING:
            j = i
            while j < len(regions) and regions[j] == Region.THINKING:
                j += 1
            span = j - i
            for k in range(i, j):
                out[k] = (k - i) / max(span - 1, 1)
            i = j
        else:
            i += 1
    return out


# ------------------------------------------------------------------------------------ a run's chat format

PLACEHOLDER = "{prompt}"
DEFAULT_PROMPT_TEMPLATE = f"{USER}{PLACEHOLDER}{ASSISTANT}{THINK_START}\n"  # what format_prompt writes
_SENTINEL = "ADAPTERLENS_PROMPT_SENTINEL_7f3a"  # stands for the prompt while a chat template renders


class ChatFormatError(ValueError):
    """A prompt template or chat template that cannot format a prompt."""


@dataclass(frozen=True)
class ChatFormat:
    """A prompt template with one ``{prompt}`` placeholder, and where it came from (shown on the run page)."""

    template: str = DEFAULT_PROMPT_TEMPLATE
    source: str = "default (DeepSeek-R1 format)"

    def __post_init__(self) -> None:
        if not isinstance(self.template, str) or self.template.count(PLACEHOLDER) != 1:
            raise ChatFormatError(f"a prompt template needs exactly one {PLACEHOLDER} placeholder, got {self.template!r}")

    def format(self, prompt: str) -> str:
        """The text a model continues for the free-text ``prompt``."""
        head, tail = self.template.split(PLACEHOLDER)
        return f"{head}{prompt}{tail}"

    @property
    def generation_prompt(self) -> str:
        """What follows the prompt (the assistant turn opened): where a chat-formatted text's answer starts."""
        return self.template.split(PLACEHOLDER)[1]

    def to_config(self) -> dict[str, str]:
        return {"template": self.template, "source": self.source}

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> ChatFormat | None:
        """The format stored in a run's config (``config["chat"]``), or None when the run has none."""
        chat = (config or {}).get("chat")
        if isinstance(chat, str):
            return cls(chat, "given")
        if isinstance(chat, Mapping) and isinstance(chat.get("template"), str):
            return cls(chat["template"], str(chat.get("source") or "given"))
        return None


def render_chat_template(chat_template: str, *, bos_token: str | None = None, eos_token: str | None = None,
                         strip_bos: bool = True, **special_tokens: str | None) -> ChatFormat:
    """The prompt template of a Hugging Face chat template (Jinja): one user turn, generation prompt on.

    Rendered like ``apply_chat_template`` does (a sandboxed Jinja environment), with a sentinel as the
    user's message. A leading ``bos_token`` is cut off when ``strip_bos`` (tokenizing adds it).
    """
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: "")
    try:
        text = env.from_string(chat_template).render(
            messages=[{"role": "user", "content": _SENTINEL}], add_generation_prompt=True,
            bos_token=bos_token or "", eos_token=eos_token or "", **{k: v or "" for k, v in special_tokens.items()})
    except TemplateError as exc:
        raise ChatFormatError(f"the chat template does not render one user turn: {exc}") from exc
    if text.count(_SENTINEL) != 1:
        raise ChatFormatError("the chat template does not show the user's message exactly once")
    if strip_bos and bos_token and text.startswith(bos_token):
        text = text[len(bos_token):]
    return ChatFormat(text.replace(_SENTINEL, PLACEHOLDER), "tokenizer chat template")


def read_chat_template(model_dir: str | Path) -> tuple[str | None, dict[str, str | None]]:
    """(chat template, special tokens) of a saved tokenizer: ``chat_template.jinja`` or ``tokenizer_config.json``.

    A list of named templates (older tokenizers) gives the one named ``default``. (None, {}) when the
    directory has no tokenizer config.
    """
    folder = Path(model_dir)
    config: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    specials: dict[str, str | None] = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        specials[key] = value.get("content") if isinstance(value, dict) else value
    return (template if isinstance(template, str) and template.strip() else None), specials


def chat_format_for(config: Mapping[str, Any] | None, chat_template: str | None = None, *,
                    bos_token: str | None = None, eos_token: str | None = None) -> ChatFormat:
    """A run's chat format: the one stored in its config, else its tokenizer's chat template rendered,
    else the DeepSeek-R1 format of the organism (a template that does not render falls back with a warning)."""
    stored = ChatFormat.from_config(config)
    if stored is not None:
        return stored
    if chat_template:
        try:
            return render_chat_template(chat_template, bos_token=bos_token, eos_token=eos_token)
        except ChatFormatError as exc:
            log.warning("%s; using the DeepSeek-R1 format", exc)
    return ChatFormat()


def format_run_prompt(prompt: str, config: Mapping[str, Any] | None, chat_template: str | None = None, *,
                      bos_token: str | None = None, eos_token: str | None = None) -> str:
    """Format a free-text prompt for a run: its stored chat format (``runs.config["chat"]``), else the
    tokenizer's ``chat_template`` (from tokenizer_config.json / chat_template.jinja), else DeepSeek-R1's."""
    return chat_format_for(config, chat_template, bos_token=bos_token, eos_token=eos_token).format(prompt)
