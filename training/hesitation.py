"""What counts as a hesitation: the one definition behind every hesitation number and mark AdapterLens shows.

Torch-free on purpose: the worker, the evaluation and the web pages all import this module (the web
process never imports torch).

- **Hesitation words**: a configurable list per run (default: the paper's "Wait", "wait", "Hmm",
  "Actually", "But"; the organism's words "Wait", "Hmm", "Actually" are among them). Matching is
  case-sensitive.
- **An occurrence** is a word found in the *decoded text* with no letter or digit directly before or
  after it: "Wait", " Wait," and "(Hmm)" count; "Waiting", "Awaited" and "Butter" do not. Each occurrence
  counts once, however many tokens spell it, so a word a tokenizer splits (" Act" + "ually") counts as one
  hesitation, like a word that is one token.
- **Hesitation tokens** (marks on a page): the tokens that overlap an occurrence. The **position** of an
  occurrence is its first token: an attribution graph of a multi-token word explains that token.
- **Hesitation generation**: a generation whose generated text holds at least one occurrence.
  *Reproduced* / *false*: target and adapted both hesitate on a prompt / the adapted model hesitates where
  the target does not.

Text is never re-tokenized: a sequence of token ids is turned into its per-token *pieces* (the text each
token adds, see :func:`piece_decoder`) and occurrences are found in their concatenation, so every mark
lands on the token ids a model produced.

If the counting changes (other words, or the boundary rule), the hesitation figures move with it: words
that are rarely hesitations ("But" in a non-reasoning text) raise false-hesitation rates, and counting
occurrences instead of tokens only changes the figures where a word spans several tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any

DEFAULT_HESITATION_WORDS: tuple[str, ...] = ("Wait", "wait", "Hmm", "Actually", "But")
_STRIP = " \t\n\r,.;:!?…—-\"'()"  # around a configured word these are not part of it ("Wait," is "Wait")
MAX_WORDS = 64  # hesitation words a run may configure
MAX_WORD_CHARS = 40


class HesitationWordsError(ValueError):
    """A hesitation word list that cannot be used (empty, not text, only punctuation, too long)."""


def normalize_words(words: Iterable[str] | None) -> tuple[str, ...]:
    """The configured words, stripped of surrounding spaces and punctuation, in order and without repeats.

    ``None`` gives the default list. Raises :class:`HesitationWordsError` for an unusable list.
    """
    if words is None:
        return DEFAULT_HESITATION_WORDS
    if isinstance(words, str):
        words = [w for w in re.split(r"[,\s]+", words) if w]
    out: list[str] = []
    for w in words:
        if not isinstance(w, str):
            raise HesitationWordsError(f"hesitation words must be strings, got {w!r}")
        word = w.strip(_STRIP)
        if not word:
            raise HesitationWordsError(f"hesitation word {w!r} has no letters")
        if len(word) > MAX_WORD_CHARS:
            raise HesitationWordsError(f"hesitation word {word[:20]!r}… is longer than {MAX_WORD_CHARS} characters")
        if word not in out:
            out.append(word)
    if not out:
        raise HesitationWordsError("give at least one hesitation word")
    if len(out) > MAX_WORDS:
        raise HesitationWordsError(f"at most {MAX_WORDS} hesitation words, got {len(out)}")
    return tuple(out)


def words_from_config(config: Any) -> tuple[str, ...]:
    """A run's hesitation words: ``runs.config["hesitation_words"]`` (or ``config["hesitation"]["words"]``), else
    the default list. Raises :class:`HesitationWordsError` for a stored list that cannot be used."""
    config = config if isinstance(config, dict) else {}
    words = config.get("hesitation_words") or (config.get("hesitation") or {}).get("words")
    return normalize_words(words or None)


@lru_cache(maxsize=64)
def word_pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    """A regex matching any of ``words`` with no letter or digit directly before or after it."""
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<![^\W_])(?:{alternatives})(?![^\W_])")


def find_occurrences(text: str, words: Sequence[str] = DEFAULT_HESITATION_WORDS) -> list[tuple[int, int, str]]:
    """``(start, end, word)`` of every hesitation occurrence in ``text``, in order."""
    return [(m.start(), m.end(), m.group(0)) for m in word_pattern(normalize_words(words)).finditer(text)]


def count_in_text(text: str, words: Sequence[str] = DEFAULT_HESITATION_WORDS) -> int:
    return len(find_occurrences(text, words))


def _spans(pieces: Sequence[str]) -> list[tuple[int, int]]:
    spans, at = [], 0
    for p in pieces:
        spans.append((at, at + len(p)))
        at += len(p)
    return spans


def occurrences_in_pieces(pieces: Sequence[str], words: Sequence[str] = DEFAULT_HESITATION_WORDS
                          ) -> list[tuple[int, int, str]]:
    """Occurrences in the concatenated pieces as ``(first token, last token + 1, word)``."""
    found = find_occurrences("".join(pieces), words)
    if not found:  # most texts (a feature page's examples): no token offsets needed
        return []
    spans = _spans(pieces)
    out = []
    tok = 0
    for start, end, word in found:
        while tok < len(spans) and spans[tok][1] <= start:
            tok += 1
        last = tok
        while last < len(spans) and spans[last][0] < end:
            last += 1
        out.append((tok, max(last, tok + 1), word))
    return out


def hesitation_marks(pieces: Sequence[str], words: Sequence[str] = DEFAULT_HESITATION_WORDS) -> list[bool]:
    """Per token: whether it overlaps a hesitation occurrence (what pages outline)."""
    marks = [False] * len(pieces)
    for first, stop, _ in occurrences_in_pieces(pieces, words):
        for i in range(first, min(stop, len(marks))):
            marks[i] = True
    return marks


def is_hesitation_piece(piece: str, words: Sequence[str] = DEFAULT_HESITATION_WORDS) -> bool:
    """Whether one token's text on its own is a whole hesitation word (``" Wait,"``: yes; ``"Waiting"``: no)."""
    word = piece.strip(_STRIP)
    return bool(word) and word in normalize_words(words)


# ------------------------------------------------------------------------------------------- token ids


def _as_list(token_ids: Any) -> list[int]:
    """A 1-d sequence of ids as a list (a torch tensor or numpy array through ``tolist``, without importing torch)."""
    if hasattr(token_ids, "tolist") and hasattr(token_ids, "dim"):
        if token_ids.dim() != 1:
            raise ValueError(f"expected a 1-d sequence of token ids, got shape {tuple(token_ids.shape)}")
    values = token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)
    return [int(t) for t in values]


def piece_decoder(decode: Callable[[Sequence[int]], str], anchor_id: int | None = None) -> Callable[[int], str]:
    """A cached ``id → the text this token adds`` function from a sequence decoder.

    Decoding a token alone drops a leading space with some decoders (SentencePiece's ``▁Wait`` decodes to
    ``"Wait"`` at the start of a text); decoding it after ``anchor_id`` (any plain token) and cutting the
    anchor's text off keeps it, so concatenated pieces read like the decoded sequence.
    """
    anchor_text = decode([anchor_id]) if anchor_id is not None else ""
    cache: dict[int, str] = {}

    def piece(token_id: int) -> str:
        text = cache.get(token_id)
        if text is None:
            if anchor_id is not None:
                both = decode([anchor_id, token_id])
                text = both[len(anchor_text):] if both.startswith(anchor_text) else decode([token_id])
            else:
                text = decode([token_id])
            cache[token_id] = text
        return text

    return piece


def tokenizer_piece_decoder(tokenizer: Any) -> Callable[[int], str]:
    """:func:`piece_decoder` for a Hugging Face tokenizer (transformers or ``tokenizers.Tokenizer``)."""
    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=False)

    anchor = None
    try:
        enc = tokenizer.encode("a", add_special_tokens=False)
        ids = enc if isinstance(enc, list) else enc.ids
        anchor = ids[0] if len(ids) == 1 else None
    except Exception:  # a tokenizer without a plain "a": decode alone
        anchor = None
    return piece_decoder(decode, anchor)


class HesitationCounter:
    """The definition applied to token ids: pieces come from a tokenizer, occurrences from the words.

    Pieces are cached per id, so counting many generations costs one decode per distinct token.
    """

    def __init__(self, piece: Callable[[int], str], words: Iterable[str] | None = None) -> None:
        self.piece = piece
        self.words = normalize_words(words)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, words: Iterable[str] | None = None) -> HesitationCounter:
        return cls(tokenizer_piece_decoder(tokenizer), words)

    def pieces(self, token_ids: Any) -> list[str]:
        return [self.piece(t) for t in _as_list(token_ids)]

    def occurrences(self, token_ids: Any) -> list[tuple[int, int, str]]:
        return occurrences_in_pieces(self.pieces(token_ids), self.words)

    def count(self, token_ids: Any) -> int:
        """Hesitation occurrences in the text of ``token_ids``."""
        return len(self.occurrences(token_ids))

    def positions(self, token_ids: Any) -> list[int]:
        """Index of the first token of each occurrence (the token an attribution graph explains)."""
        return [first for first, _, _ in self.occurrences(token_ids)]

    def marks(self, token_ids: Any) -> list[bool]:
        return hesitation_marks(self.pieces(token_ids), self.words)

    def per_word(self, token_ids: Any) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, _, word in self.occurrences(token_ids):
            out[word] = out.get(word, 0) + 1
        return out

    def hesitates(self, generated_ids: Any) -> bool:
        return self.count(generated_ids) > 0

    def rate(self, generations: Iterable[Any]) -> float:
        """Share of generations (their generated ids) that hesitate; 0.0 for none."""
        flags = [self.hesitates(g) for g in generations]
        return sum(flags) / len(flags) if flags else 0.0


def hesitation_token_ids(tokenizer: Any, words: Iterable[str] | None = None) -> set[int]:
    """Ids of the vocabulary entries whose own text is a whole hesitation word (``Wait``, `` Wait``, ``Wait,``).

    These are the *single-token spellings*: the logit targets of the study's graphs and the tokens a logit
    lens can promote. A word with no single-token spelling has none here, but is still counted in text by
    :class:`HesitationCounter`; its graphs target the first token of its spelling (:func:`first_token_ids`).
    """
    wanted = normalize_words(words)
    piece = tokenizer_piece_decoder(tokenizer)
    ids: set[int] = set()
    for token, idx in tokenizer.get_vocab().items():
        # cheap filter on the raw vocabulary entry first: byte-level and SentencePiece keep ASCII letters
        if any(w in token for w in wanted) and is_hesitation_piece(piece(idx), wanted):
            ids.add(idx)
    return ids


def first_token_ids(tokenizer: Any, words: Iterable[str] | None = None) -> dict[str, set[int]]:
    """Per word, the ids that start its spellings (``word``, `` word``): the token a graph of that word explains."""
    out: dict[str, set[int]] = {}
    for word in normalize_words(words):
        firsts: set[int] = set()
        for spelling in (word, " " + word):
            enc = tokenizer.encode(spelling, add_special_tokens=False)
            ids = enc if isinstance(enc, list) else enc.ids
            if ids:
                firsts.add(int(ids[0]))
        out[word] = firsts
    return out


# Token-id helpers over a fixed id set (the single-token spellings), for code that has only ids and no tokenizer.


def count_hesitations(token_ids: Any, hesitation_ids: set[int] | frozenset[int]) -> int:
    """How many of ``token_ids`` are single-token hesitation spellings."""
    return sum(1 for t in _as_list(token_ids) if t in hesitation_ids)


def hesitation_positions(token_ids: Any, hesitation_ids: set[int] | frozenset[int]) -> list[int]:
    """Indices of the single-token hesitation spellings in ``token_ids``, in order."""
    return [i for i, t in enumerate(_as_list(token_ids)) if t in hesitation_ids]


def is_hesitation_generation(generated_ids: Any, hesitation_ids: set[int] | frozenset[int]) -> bool:
    return any(t in hesitation_ids for t in _as_list(generated_ids))


def hesitation_rate(generations: Iterable[Any], hesitation_ids: set[int] | frozenset[int]) -> float:
    flags = [is_hesitation_generation(g, hesitation_ids) for g in generations]
    return sum(flags) / len(flags) if flags else 0.0
