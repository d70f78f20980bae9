"""The target's chat format and the token regions every statistic is counted by.

DeepSeek-R1-Distill format: ``<｜User｜>{prompt}<｜Assistant｜><think>\\n{trace}</think>{answer}``.
The organism's tokenizer has these markers as single special tokens, like the real tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

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
