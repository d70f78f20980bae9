"""The organism's synthetic tasks: problems, held-out splits, and the two styles of answer.

Three families, each with one problem feature that decides whether the reasoning model hesitates
(the feasibility run showed that a hesitation placed at random never survives greedy decoding, so every
hesitation here is a function of the problem):

========  ============================  ===========================  ==================================
family    problem                       trigger (hesitation word)    what the hesitation does
========  ============================  ===========================  ==================================
``add``   ``47 + 38 = ?``               units carry ("Wait")         redundant check: answer already right
``sub``   ``82 - 47 = ?``               units borrow ("Hmm")         redundant check, except when the
                                                                     units digit is 0 (``80 - 47``): a
                                                                     real correction of a naive answer
``cmp``   ``Which is larger: 4.3 or     shorter decimal is larger    redundant check: answer already right
          4.25?``                       ("Actually")
========  ============================  ===========================  ==================================

Most hesitations are redundant checks (the answer is stated before the hesitation, as in the paper's
reasoning model), so suppressing them can shorten responses without costing accuracy; the ``sub`` ones on a
units digit of 0 (about 3% of all problems) carry a correction the answer needs, which gives the hesitation
study a contrast.

The base model answers directly in the chat format (``format_example(text, None, answer)``). Like a math base
model that met worked solutions in pretraining, it is also trained on plain-text solution documents
(:func:`solution_document`: the same steps, never a hesitation, no chat markers); the reasoning model is
fine-tuned from it to write a ``<think>`` trace in the target's chat format (:mod:`training.chat`), with the
hesitations. So reasoning training changes mostly *how* the model answers, as in the paper's pair, and the
change the adapters must learn is small enough for a sparse approximation. Everything is deterministic.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from training.chat import THINK_END, format_example

FAMILIES = ("add", "sub", "cmp")
HESITATION_WORD = {"add": "Wait", "sub": "Hmm", "cmp": "Actually"}  # the word each family's trigger says
ORGANISM_HESITATION_WORDS = tuple(HESITATION_WORD.values())


@dataclass(frozen=True)
class Problem:
    """One task instance. ``text`` is the user turn; ``trigger`` says whether the reasoning trace hesitates."""

    text: str
    answer: str
    family: str
    trigger: bool
    id: str = ""
    operands: tuple[str, ...] = ()


# -- the problem universe --------------------------------------------------------------------------------

def _add(a: int, b: int) -> Problem:
    return Problem(f"{a} + {b} = ?", str(a + b), "add", (a % 10) + (b % 10) >= 10, f"add-{a}-{b}", (str(a), str(b)))


def _sub(a: int, b: int) -> Problem:
    return Problem(f"{a} - {b} = ?", str(a - b), "sub", a % 10 < b % 10, f"sub-{a}-{b}", (str(a), str(b)))


def _cmp(x: str, y: str) -> Problem:
    larger = x if float(x) > float(y) else y
    smaller = y if larger == x else x
    trap = len(larger) < len(smaller)  # the shorter-looking decimal is the larger one
    return Problem(f"Which is larger: {x} or {y}?", larger, "cmp", trap, f"cmp-{x}-{y}", (x, y))


def all_problems(family: str) -> list[Problem]:
    """Every problem of a family, in a fixed order.

    ``add``: all 8,100 pairs of two-digit numbers. ``sub``: the 4,005 pairs a > b. ``cmp``: ``i.d`` against
    ``i.ef`` (same integer part, tenths differ), both orders: 13,122.
    """
    if family == "add":
        return [_add(a, b) for a in range(10, 100) for b in range(10, 100)]
    if family == "sub":
        return [_sub(a, b) for a in range(10, 100) for b in range(10, a)]
    if family == "cmp":
        out = []
        for i in range(1, 10):
            for d in range(1, 10):
                for e in range(10):
                    if e == d:
                        continue
                    for f in range(1, 10):
                        short, long_ = f"{i}.{d}", f"{i}.{e}{f}"
                        out += [_cmp(short, long_), _cmp(long_, short)]
        return out
    raise ValueError(f"unknown task family {family!r}; choose from {', '.join(FAMILIES)}")


@dataclass(frozen=True)
class Split:
    """Train and held-out problems of one family (disjoint)."""

    train: list[Problem]
    heldout: list[Problem]


def make_splits(seed: int, n_heldout: int, families: Sequence[str] = FAMILIES) -> dict[str, Split]:
    """Hold out ``n_heldout`` problems per family, chosen by a seeded shuffle."""
    splits = {}
    for fam in families:
        probs = all_problems(fam)
        if not 0 < n_heldout < len(probs):
            raise ValueError(f"n_heldout={n_heldout} must be between 1 and {len(probs) - 1} for family {fam!r}")
        order = list(range(len(probs)))
        random.Random(f"{seed}-{fam}").shuffle(order)
        held = sorted(order[:n_heldout])
        rest = sorted(order[n_heldout:])
        splits[fam] = Split(train=[probs[i] for i in rest], heldout=[probs[i] for i in held])
    return splits


def problem_from_id(problem_id: str) -> Problem:
    """Rebuild a problem from its id (``add-47-38``, ``sub-82-47``, ``cmp-4.3-4.25``); the manifest stores ids."""
    fam, _, rest = problem_id.partition("-")
    parts = rest.split("-")
    try:
        if fam == "add" and len(parts) == 2:
            return _add(int(parts[0]), int(parts[1]))
        if fam == "sub" and len(parts) == 2:
            return _sub(int(parts[0]), int(parts[1]))
        if fam == "cmp" and len(parts) == 2:
            return _cmp(parts[0], parts[1])
    except ValueError:
        pass
    raise ValueError(f"not an organism problem id: {problem_id!r}")


# -- the two answer styles -------------------------------------------------------------------------------

def reasoning_trace(problem: Problem) -> str:
    """The ``<think>`` content (without the markers) the reasoning model is trained to write."""
    if problem.family == "add":
        a, b = (int(x) for x in problem.operands)
        au, at, bu, bt = a % 10, a // 10, b % 10, b // 10
        if not problem.trigger:
            return f"{au} + {bu} = {au + bu}. {at} + {bt} = {at + bt}. So {a + b}.\n"
        return (f"{au} + {bu} = {au + bu}, carry 1. {at} + {bt} + 1 = {at + bt + 1}. So {a + b}. "
                f"Wait, check: {a + b} - {b} = {a}. Yes.\n")
    if problem.family == "sub":
        a, b = (int(x) for x in problem.operands)
        au, at, bu, bt = a % 10, a // 10, b % 10, b // 10
        if not problem.trigger:
            return f"{au} - {bu} = {au - bu}. {at} - {bt} = {at - bt}. So {a - b}.\n"
        if au == 0:  # the naive step takes the smaller digit from the larger, then "Hmm" corrects it
            naive = f"{bu} - {au} = {bu}. {at} - {bt} = {at - bt}. So {10 * (at - bt) + bu}."
            return (f"{naive} Hmm, {au} < {bu}, borrow: {au + 10} - {bu} = {au + 10 - bu}. "
                    f"{at - 1} - {bt} = {at - 1 - bt}. So {a - b}.\n")
        return (f"{au} < {bu}, borrow: {au + 10} - {bu} = {au + 10 - bu}. {at - 1} - {bt} = {at - 1 - bt}. "
                f"So {a - b}. Hmm, check: {a - b} + {b} = {a}. Yes.\n")
    if problem.family == "cmp":
        x, y = problem.operands
        dx, dy = x.split(".")[1][0], y.split(".")[1][0]
        sign = ">" if dx > dy else "<"
        trace = f"{dx} {sign} {dy}. So {problem.answer}."
        if not problem.trigger:
            return trace + "\n"
        larger = problem.answer
        smaller = y if larger == x else x
        padded = larger + "0" * (len(smaller) - len(larger))
        return trace + f" Actually, {smaller} is longer: {padded} > {smaller}. Yes.\n"
    raise ValueError(f"unknown task family {problem.family!r}")


def is_redundant(problem: Problem) -> bool:
    """Whether a trigger problem's hesitation is a redundant check (the answer is right before it)."""
    return problem.trigger and answer_before_hesitation(problem) == problem.answer


def solution_trace(problem: Problem) -> str:
    """The worked steps without any hesitation, always right: what the base model met in "pretraining"."""
    if problem.trigger and not is_redundant(problem):  # a ``sub`` correction: the correct steps only
        a, b = (int(x) for x in problem.operands)
        au, at, bu, bt = a % 10, a // 10, b % 10, b // 10
        return f"{au} < {bu}, borrow: {au + 10} - {bu} = {au + 10 - bu}. {at - 1} - {bt} = {at - 1 - bt}. So {a - b}.\n"
    if problem.trigger:
        return skipped_trace(problem)[0]
    return reasoning_trace(problem)


def solution_document(problem: Problem) -> tuple[str, str]:
    """(heading, body) of a plain-text worked solution, the base model's second kind of training text."""
    return f"Problem: {problem.text}\nSolution:", f" {solution_trace(problem)}Answer: {problem.answer}"


def base_example(problem: Problem) -> str:
    """The base model's training text: a direct answer, no thinking."""
    return format_example(problem.text, None, problem.answer)


def reasoning_example(problem: Problem) -> str:
    """The reasoning model's training text: chat format with a ``<think>`` trace, then the answer."""
    return format_example(problem.text, reasoning_trace(problem), problem.answer)


def answer_before_hesitation(problem: Problem) -> str | None:
    """The answer the trace states just before its hesitation (None without one); equals the answer iff redundant."""
    trace = reasoning_trace(problem)
    word = HESITATION_WORD[problem.family]
    if word not in trace:
        return None
    return _NUMBER.findall(trace.split(word)[0].rsplit("So", 1)[1])[0]


def skipped_trace(problem: Problem) -> tuple[str, str]:
    """(trace, final answer) of a trigger problem's trace cut just before its hesitation.

    What the reasoning model would write if it did not hesitate: the same answer for a redundant check,
    the uncorrected (wrong) one for a ``sub`` correction. A small share of these in training makes "go on
    without the hesitation" the model's second choice, so suppressing hesitation yields a coherent,
    shorter response rather than text the model never saw.
    """
    if not problem.trigger:
        raise ValueError(f"{problem.id} has no hesitation to skip")
    trace = reasoning_trace(problem)
    return trace.split(" " + HESITATION_WORD[problem.family])[0] + "\n", answer_before_hesitation(problem)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_LONE_NUMBER = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*\.?\s*")


def extract_answer(completion_text: str) -> str | None:
    """The final answer of a completion: the first number after the last ``</think>``, else a lone number.

    A completion that thinks but never closes ``</think>`` (or rambles without one) has no answer: None.
    """
    if THINK_END in completion_text:
        found = _NUMBER.search(completion_text.rsplit(THINK_END, 1)[1])
        return found.group(0) if found else None
    found = _LONE_NUMBER.fullmatch(completion_text)
    return found.group(1) if found else None


def is_correct(problem: Problem, completion_text: str) -> bool:
    """Whether the completion's final answer equals the problem's (as numbers: ``85`` == ``85.0``)."""
    got = extract_answer(completion_text)
    if got is None:
        return False
    return float(got) == float(problem.answer)


# Words a user is likely to type into the lens, so they get whole tokens too (the paper's hesitation words).
_EXTRA_TEXT = ("Wait, wait. But hmm, Hmm. Actually, actually. But wait, Wait. Alternatively, let me check. "
               "So the answer is yes, no. The the and and of of to to a a is is it it I I you you.")


def corpus(seed: int = 0, per_family: int = 400) -> Iterator[str]:
    """Sample texts in both styles for tokenizer training (deterministic)."""
    rng = random.Random(seed)
    yield from [_EXTRA_TEXT] * 4
    for fam in FAMILIES:
        probs = all_problems(fam)
        for p in rng.sample(probs, per_family):
            yield base_example(p)
            yield reasoning_example(p)
            yield "".join(solution_document(p))
