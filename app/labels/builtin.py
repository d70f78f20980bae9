"""The built-in labeler: deterministic rules over a feature's own evidence, no model and no network.

It reads what :mod:`app.labels.evidence` gives (top and random examples, the logit lens, region counts, the
thinking-position histogram) and the run's vocabulary (:mod:`app.web.tokens`) and hesitation words
(:mod:`training.hesitation`), and writes a short label such as "promotes ' Wait' after a stated answer in
thinking" with the paper's categories.

Every token a rule looks at falls in one class (:func:`token_class`): hesitation (the run's words, by
``training.hesitation``'s rule), reasoning marker (verification, backtracking, metacognition words below),
math, code, science, connective, formatting (whitespace, punctuation, chat markers) or word. The rules, first
match wins:

1. **dead**: no example stored (never fired on the corpus) → uninterpretable / dead.
2. **reasoning / output**: the logit lens puts a hesitation or reasoning token first, or two of its top three
   are such tokens ("promotes ' Wait'"); the paper counts features that promote such tokens as reasoning.
3. **reasoning / input_simple**: at least half of the top examples fire on such a token ("fires on ' Hmm'").
4. **reasoning / input_abstract**: at least half of the top examples fire on the token just before one
   ("fires just before ' Wait'").
5. **domain** (math / code / science): at least half of the top examples fire on, or two of the top three lens
   tokens are, tokens of that field ("fires on digits", "promotes '+'").
6. **language** (connective / formatting / lexical): at least half of the top examples fire on one token
   ("fires on '\\n'"), or on tokens of one language class.
7. otherwise **uninterpretable / mixed**, naming the commonest focus tokens.

A label ends with where the feature fires, when one place dominates: "after a stated answer" (in at least half
the top examples the text just before the focus token ends in a number after "=", "So" or "answer is"), "in thinking" / "in the prompt" / "in the answer"
(at least 60% of its active tokens), "early" / "late" in thinking (60% in the first or last 30% of the span).
``score`` is the share of the evidence the firing rule covers (top examples, 70%, and random examples, 30%,
when the rule is about examples; the share of reasoning tokens among the lens top 3 for an output rule): a
consistency, not the LLM judge's detection accuracy.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from app.labels.evidence import ExampleEvidence, FeatureEvidence
from app.web.tokens import Vocab
from training.hesitation import DEFAULT_HESITATION_WORDS, is_hesitation_piece, normalize_words

REASONING_MARKERS = frozenset({
    "wait", "hmm", "actually", "alternatively", "check", "verify", "recheck", "double", "confirm", "mistake",
    "oops", "maybe", "perhaps", "hold", "reconsider", "again", "hmmm", "let", "think", "correct", "wrong",
})
"""Words of the paper's reasoning behaviours (hedging, backtracking, verification, metacognition), casefolded;
the run's hesitation words count as well."""
MATH_SYMBOLS = frozenset("+-*/=<>^×÷±√∑∫%")
MATH_WORDS = frozenset({"carry", "borrow", "sum", "plus", "minus", "times", "equals", "equation", "divide",
                        "multiply", "subtract", "add", "digit", "digits", "larger", "smaller", "frac", "sqrt",
                        "integer", "number", "numbers", "solve", "total", "product", "remainder"})
CODE_SYMBOLS = frozenset({"{", "}", ";", "==", "!=", "=>", "->", "::", "()", "[]", "#", "//", "```", "):", "self"})
CODE_WORDS = frozenset({"def", "return", "import", "class", "print", "function", "const", "var", "lambda",
                        "elif", "null", "none", "true", "false", "int", "str", "self", "async", "await"})
SCIENCE_WORDS = frozenset({"energy", "mass", "force", "atom", "atoms", "molecule", "cell", "cells", "electron",
                           "velocity", "acceleration", "temperature", "pressure", "reaction", "acid", "protein",
                           "gene", "species", "charge", "gravity", "photon", "wavelength", "joule", "newton"})
CONNECTIVES = frozenset({"so", "therefore", "thus", "hence", "because", "and", "then", "since", "first", "next",
                         "finally", "also", "now", "the", "a", "an", "of", "to", "is", "in", "that", "which",
                         "yes", "no", "if", "or", "as"})
_PUNCT = " \t\n\r,.;:!?…—-\"'()[]{}"
_NUMBER = re.compile(r"^[\d.,]+$")
_ANSWER = re.compile(r"(?:=|\bSo|\banswer(?: is)?|\bis)\s*:?\s*\$?-?\d[\d.,]*\$?\s*[.,]?\s*$")

TOP_SHARE = 0.5  # share of top examples a rule about examples needs
REGION_SHARE = 0.6  # share of active tokens that makes a region "where it fires"
EARLY_LATE_SHARE = 0.6  # share of thinking tokens in the first / last 30% of the span
CONTEXT_TOKENS = 8  # tokens before the focus read for its context

REASONING_CLASSES = ("hesitation", "reasoning")
DOMAIN_CLASSES = {"math": "math", "code": "code", "science": "science"}
LANGUAGE_CLASSES = {"connective": "connective", "formatting": "formatting", "word": "lexical"}


@dataclass(frozen=True)
class Label:
    label: str
    category: str
    subcategory: str | None
    score: float | None
    details: dict[str, Any] = field(default_factory=dict)


@lru_cache(maxsize=1 << 17)
def piece(vocab: Vocab, token_id: int) -> tuple[str, str]:
    """(text the token adds, its kind) from the run's vocabulary (cached per vocabulary and id)."""
    t = vocab.token(token_id)
    return (t.exact or t.text if t.kind in ("text", "bytes") else t.text if t.kind == "special" else ""), t.kind


@lru_cache(maxsize=1 << 16)
def token_class(text: str, kind: str, words: tuple[str, ...] = DEFAULT_HESITATION_WORDS) -> str:
    """The class of one token's text (see the module docstring); cached (a vocabulary has few distinct tokens)."""
    if kind == "special":
        return "formatting"
    stripped = text.strip()
    if not stripped:
        return "formatting"
    if is_hesitation_piece(text, words):
        return "hesitation"
    word = stripped.strip(_PUNCT).casefold()
    if word in REASONING_MARKERS:
        return "reasoning"
    if (_NUMBER.match(stripped) and any(c.isdigit() for c in stripped)) or stripped in MATH_SYMBOLS \
            or word in MATH_WORDS:
        return "math"
    if stripped in CODE_SYMBOLS or word in CODE_WORDS:
        return "code"
    if word in SCIENCE_WORDS:
        return "science"
    if word in CONNECTIVES:
        return "connective"
    if not word:  # punctuation only
        return "formatting"
    return "word"


def show(text: str) -> str:
    """A token as a label quotes it: ``' Wait'``, newlines and tabs escaped, long ones cut."""
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return "'" + (text if len(text) <= 24 else text[:23] + "…") + "'"


def _field_name(cls: str, texts: Sequence[str]) -> str:
    """How a label names a class of tokens when no one token dominates."""
    if cls == "math":
        return "digits" if all(_NUMBER.match(t.strip()) for t in texts if t.strip()) else "arithmetic tokens"
    return {"code": "code tokens", "science": "science terms", "connective": "connectives",
            "formatting": "formatting tokens", "word": "words", "hesitation": "hesitation words",
            "reasoning": "reasoning words"}.get(cls, cls)


@dataclass
class _Seen:
    """What the rules read off a feature's examples."""

    focus: list[tuple[str, str]]  # (text, class) per example
    after: list[tuple[str, str]]  # the token after the focus (text, class), "" at the end
    answer_before: list[bool]


def _read(examples: Sequence[ExampleEvidence], vocab: Vocab, words: tuple[str, ...], *, full: bool = True) -> _Seen:
    """The focus tokens of ``examples`` and, when ``full``, the token after each and its context's answer test."""
    focus, after, answer = [], [], []
    for ex in examples:
        text, kind = piece(vocab, ex.token_ids[ex.focus])
        focus.append((text, token_class(text, kind, words)))
        if not full:
            continue
        if ex.focus + 1 < len(ex.token_ids):
            nt, nk = piece(vocab, ex.token_ids[ex.focus + 1])
            after.append((nt, token_class(nt, nk, words)))
        else:
            after.append(("", "none"))
        context = "".join(piece(vocab, t)[0] for t in ex.token_ids[max(0, ex.focus - CONTEXT_TOKENS): ex.focus])
        answer.append(bool(_ANSWER.search(context)))
    return _Seen(focus, after, answer)


def _share(items: Sequence[Any], pred: Any) -> float:
    return sum(1 for x in items if pred(x)) / len(items) if items else 0.0


def _commonest(texts: Sequence[str]) -> tuple[str, float]:
    """The commonest text (up to surrounding spaces and punctuation) as most often written, and its share."""
    if not texts:
        return "", 0.0
    keys = [t.strip(_PUNCT) or t for t in texts]
    key, n = Counter(keys).most_common(1)[0]
    variant = Counter(t for t, k in zip(texts, keys, strict=True) if k == key).most_common(1)[0][0]
    return variant, n / len(texts)


def where(ev: FeatureEvidence) -> str:
    """Where a feature fires, when one region (and part of the thinking span) dominates; else ""."""
    regions = ev.region_counts
    total = sum(regions.values())
    if total <= 0:
        return ""
    thinking = sum(v for k, v in regions.items() if k.startswith("think"))
    parts = {"in thinking": thinking, "in the prompt": regions.get("prompt", 0.0),
             "in the answer": regions.get("answer", 0.0)}
    place, n = max(parts.items(), key=lambda kv: kv[1])
    if n / total < REGION_SHARE:
        return ""
    if place == "in thinking":
        if regions.get("think-end", 0.0) / total >= REGION_SHARE:
            return "at </think>"
        counts = ev.think_pos
        span = sum(counts)
        if span > 0 and len(counts) >= 10:
            if sum(counts[:3]) / span >= EARLY_LATE_SHARE:
                return "early in thinking"
            if sum(counts[-3:]) / span >= EARLY_LATE_SHARE:
                return "late in thinking"
    return place


def _compose(*parts: str) -> str:
    return " ".join(p for p in parts if p).strip()


def label_feature(ev: FeatureEvidence, vocab: Vocab, words: Sequence[str] = DEFAULT_HESITATION_WORDS) -> Label:
    """The built-in label of one feature (rules in the module docstring)."""
    words = normalize_words(words)
    top, rnd = ev.top, ev.random
    if not top and not rnd:
        return Label("dead: never fired on the collection corpus", "uninterpretable", "dead", 0.0,
                     {"rule": "dead"})
    seen = _read(top or rnd, vocab, words)
    seen_rnd = _read(rnd, vocab, words, full=False) if rnd and top else None
    lens = [piece(vocab, tid) + (value,) for tid, value in ev.logit_top[:10]]
    lens_cls = [token_class(t, k, words) for t, k, _ in lens]
    context = "after a stated answer" if _share(seen.answer_before, bool) >= TOP_SHARE else ""
    place = where(ev)
    details: dict[str, Any] = {"focus": [t for t, _ in seen.focus[:10]], "lens": [t for t, _, _ in lens[:5]],
                               "where": place, "context": context}

    def score(pred: Any, top_share: float) -> float:
        if seen_rnd is None:
            return round(top_share, 3)
        return round(0.7 * top_share + 0.3 * _share(seen_rnd.focus, pred), 3)

    # 2. output: the lens promotes hesitation / reasoning tokens
    top3 = lens_cls[:3]
    n_reason = sum(c in REASONING_CLASSES for c in top3)
    if top3 and (top3[0] in REASONING_CLASSES or n_reason >= 2):
        promoted = []
        for (t, _, _), c in zip(lens[:3], top3, strict=True):
            if c in REASONING_CLASSES and show(t) not in promoted:
                promoted.append(show(t))
        return Label(_compose("promotes", ", ".join(promoted[:2]), context, place), "reasoning", "output",
                     round(n_reason / len(top3), 3), details | {"rule": "lens-reasoning"})

    focus_cls = [c for _, c in seen.focus]
    # 3. input_simple: fires on hesitation / reasoning tokens
    s = _share(focus_cls, lambda c: c in REASONING_CLASSES)
    if s >= TOP_SHARE:
        text, _ = _commonest([t for t, c in seen.focus if c in REASONING_CLASSES])
        return Label(_compose("fires on", show(text), context, place), "reasoning", "input_simple",
                     score(lambda x: x[1] in REASONING_CLASSES, s), details | {"rule": "fires-on-reasoning"})

    # 4. input_abstract: fires just before one
    s = _share(seen.after, lambda x: x[1] in REASONING_CLASSES)
    if s >= TOP_SHARE:
        text, _ = _commonest([t for t, c in seen.after if c in REASONING_CLASSES])
        return Label(_compose("fires just before", show(text), context, place), "reasoning", "input_abstract",
                     round(s, 3), details | {"rule": "before-reasoning"})

    # 5. domain: fires on, or promotes, tokens of a field
    for cls, sub in DOMAIN_CLASSES.items():
        s = _share(focus_cls, lambda c, cls=cls: c == cls)
        if s >= TOP_SHARE:
            texts = [t for t, c in seen.focus if c == cls]
            text, one = _commonest(texts)
            what = show(text) if one >= TOP_SHARE else _field_name(cls, texts)
            return Label(_compose("fires on", what, context, place), "domain", sub,
                         score(lambda x, cls=cls: x[1] == cls, s), details | {"rule": f"fires-on-{cls}"})
    for cls, sub in DOMAIN_CLASSES.items():
        n = sum(c == cls for c in top3)
        if top3 and n >= 2:
            texts = [t for (t, _, _), c in zip(lens[:3], top3, strict=True) if c == cls]
            return Label(_compose("promotes", _field_name(cls, texts), context, place), "domain", sub,
                         round(n / len(top3), 3), details | {"rule": f"lens-{cls}"})

    # 6. language: one token, or one language class, dominates the focus
    text, one = _commonest([t for t, _ in seen.focus])
    if one >= TOP_SHARE:
        cls = Counter(c for t, c in seen.focus if (t.strip(_PUNCT) or t) == (text.strip(_PUNCT) or text)
                      ).most_common(1)[0][0]
        sub = LANGUAGE_CLASSES.get(cls, "lexical")
        key = text.strip(_PUNCT) or text
        return Label(_compose("fires on", show(text), context, place), "language", sub,
                     score(lambda x: (x[0].strip(_PUNCT) or x[0]) == key, one), details | {"rule": "fires-on-token"})
    for cls, sub in LANGUAGE_CLASSES.items():
        s = _share(focus_cls, lambda c, cls=cls: c == cls)
        if s >= TOP_SHARE:
            texts = [t for t, c in seen.focus if c == cls]
            return Label(_compose("fires on", _field_name(cls, texts), context, place), "language", sub,
                         score(lambda x, cls=cls: x[1] == cls, s), details | {"rule": f"fires-on-{cls}"})

    # 7. no pattern the rules know
    common = [show(t) for t, _ in Counter(t for t, _ in seen.focus).most_common(3)]
    return Label(_compose("mixed: fires on", ", ".join(common), place), "uninterpretable", "mixed",
                 round(one, 3), details | {"rule": "mixed"})
