"""Scoring a generation against a known answer: one documented extractor, exact match after normalisation.

Torch-free. Used by the evaluation and the hesitation study for every run that is not the organism (the
organism's answers have their own format, ``training.organism.tasks.extract_answer``).

**Where the answer is looked for**: after the last ``</think>`` when the generation closed its thinking,
else in the whole generation. **What is taken**, first rule that finds something:

1. the content of the last ``\\boxed{…}`` (nested braces kept whole);
2. what follows the last "the answer is" (any case; an optional ``:``), up to the end of its line or
   sentence;
3. the last number (``-12``, ``3.5``, ``1,000``).

**Normalisation** (both sides): surrounding whitespace, ``$`` signs and a final ``.`` removed, ``\\text{…}``
unwrapped, inner whitespace removed, lower case; a number is written canonically (``1,000`` → ``1000``,
``7.0`` → ``7``, ``0.50`` → ``0.5``). **Match**: the normalised strings are equal, or the expected answer is a
number and the first number in the extracted text equals it (``7 apples`` matches ``7``).
"""

from __future__ import annotations

import re

THINK_END = "</think>"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?\s*", re.IGNORECASE)
_TEXT_CMD = re.compile(r"\\text\{([^{}]*)\}")


def _boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}``, braces balanced; None when there is none (or it is unclosed)."""
    start = text.rfind("\\boxed{")
    while start >= 0:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1:j]
        start = text.rfind("\\boxed{", 0, start)
    return None


def extract_answer(text: str) -> str | None:
    """The answer a generation states (rules in the module docstring), or None when it states none."""
    region = text.rsplit(THINK_END, 1)[1] if THINK_END in text else text
    boxed = _boxed(region)
    if boxed is not None:
        return boxed.strip()
    said = list(_ANSWER_IS.finditer(region))
    if said:
        rest = region[said[-1].end():]
        phrase = re.split(r"\n|\.(?:\s|$)", rest, maxsplit=1)[0].strip()
        if phrase:
            return phrase
    numbers = _NUMBER.findall(region)
    return numbers[-1] if numbers else None


def _canonical_number(text: str) -> str | None:
    """``text`` as a canonical number string when it is one number (``1,000.50`` → ``1000.5``), else None."""
    plain = text.replace(",", "")
    try:
        value = float(plain)
    except ValueError:
        return None
    if not _NUMBER.fullmatch(text):
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def normalize_answer(text: str | None) -> str:
    """The comparable form of an answer (rules in the module docstring)."""
    if text is None:
        return ""
    s = _TEXT_CMD.sub(r"\1", str(text)).strip().replace("$", "").strip()
    s = s.removesuffix(".").strip()
    number = _canonical_number(s)
    if number is not None:
        return number
    return re.sub(r"\s+", "", s).lower()


def answers_match(predicted: str | None, expected: str | int | float) -> bool:
    """Whether an extracted answer equals the expected one after normalisation."""
    if predicted is None:
        return False
    want = normalize_answer(str(expected))
    got = normalize_answer(predicted)
    if got == want:
        return True
    if _canonical_number(want) is not None:
        first = _NUMBER.search(str(predicted).replace("$", ""))
        return first is not None and _canonical_number(first.group(0)) == want
    return False


def score(generation: str, expected: str | int | float | None) -> bool | None:
    """True / False for a generation against its expected answer; None when no answer is known."""
    if expected is None or (isinstance(expected, str) and not expected.strip()):
        return None
    return answers_match(extract_answer(generation), expected)
