"""The vocabulary module: token ids → what a page shows, for every page, without torch or transformers.

Examples, prompts, graphs and ablations store token ids (design.md: never re-tokenize for alignment), so a
page needs the run's tokenizer to show text. This loads the run's ``tokenizer.json`` with the ``tokenizers``
library and lets its own decoder turn each id into text (byte-level BPE, SentencePiece's Metaspace and
ByteFallback, WordPiece and the rest), so no decoder is re-implemented here. Each id becomes a
:class:`TokenText` of one of four kinds:

- ``text``: what the token adds to a decoded text, leading space included (decoded after a plain anchor
  token, since some decoders drop a leading space at the start of a text).
- ``special``: an added special token (``<｜User｜>``, ``<think>``), shown in a readable ASCII form
  (NFKC: the full-width bars of DeepSeek's markers become ``|``, which every font has) and styled apart.
- ``bytes``: a token that holds only part of a UTF-8 character; shown as its bytes (``<0xE2 0x80>``), not
  as U+FFFD.
- ``padding``: an id beyond the tokenizer (models pad ``vocab_size`` past the tokenizer's size). Such an id
  is never a token: lists drop it (:meth:`Vocab.is_token`), and where one must be shown it reads as such.

Where the tokenizer lives, in order: ``runs.config["tokenizer"]`` (a directory or a tokenizer.json),
an organism spec's ``<data_dir>/models/organism-<preset>-s<seed>/tokenizer/`` (``organism:<preset>:s<seed>``,
as ``worker/models_cache.py`` resolves it), the target model's directory, its sibling ``tokenizer/``, the
Hugging Face cache snapshot of the target model id. Without one, ids show as ``⟨id⟩`` and the page says so.

:func:`find_prompt_checker` encodes free text with the same tokenizer and reads the model's context length
from its ``config.json``, so the web app can refuse an over-long ablation prompt before anything is queued.
Which displayed tokens are hesitations is ``training.hesitation``'s rule (torch-free), applied to the
pieces this module decodes.
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from training.hesitation import DEFAULT_HESITATION_WORDS, hesitation_marks, is_hesitation_piece

log = logging.getLogger(__name__)

TokenKind = Literal["text", "special", "bytes", "padding"]
_REPLACEMENT = "\ufffd"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map used by byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, (chr(c) for c in chars), strict=True))


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


@dataclass(frozen=True)
class TokenText:
    """One token as a page shows it: ``text`` (display), ``kind``, and ``exact`` (the decoded text, for titles)."""

    id: int
    text: str
    kind: TokenKind = "text"
    exact: str = ""


def _raw_bytes(piece: str | None) -> bytes | None:
    """The bytes a byte-level (``Ġ``-style) or byte-fallback (``<0xE2>``) vocabulary entry stands for."""
    if not piece:
        return None
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            return None
    if all(ch in _BYTE_OF_CHAR for ch in piece):
        return bytes(_BYTE_OF_CHAR[ch] for ch in piece)
    return None


def _bytes_label(raw: bytes) -> str:
    return "<" + " ".join(f"0x{b:02X}" for b in raw) + ">"


class Vocab:
    """A run's tokenizer as display text; ``source`` says where it came from (None: no tokenizer found).

    Token texts are decoded on first use and cached, so a page pays once per distinct id.
    """

    def __init__(self, tokenizer: Any = None, source: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.source = source
        self._cache: dict[int, TokenText] = {}
        self._special: set[int] = set()
        self._ids: set[int] = set()
        self._anchor: int | None = None
        self._anchor_text = ""
        self._by_text: dict[str, list[int]] | None = None  # normalised token text → ids (ids_matching)
        if tokenizer is not None:
            self._ids = set(tokenizer.get_vocab(with_added_tokens=True).values())
            # Special added tokens, and added markers such as <think> (not "special" in DeepSeek's tokenizer)
            self._special = {i for i, t in tokenizer.get_added_tokens_decoder().items()
                             if t.special or (t.content.startswith("<") and t.content.endswith(">"))}
            anchor = tokenizer.token_to_id("a")
            if anchor is not None and tokenizer.decode([anchor], skip_special_tokens=False) == "a":
                self._anchor, self._anchor_text = anchor, "a"

    @property
    def size(self) -> int:
        """How many ids are tokens (0 without a tokenizer)."""
        return len(self._ids)

    def is_token(self, token_id: int) -> bool:
        """Whether ``token_id`` is a token of the tokenizer (False for padded-vocabulary ids)."""
        return self.tokenizer is None or int(token_id) in self._ids

    def _decode_piece(self, token_id: int) -> str:
        tok = self.tokenizer
        if self._anchor is not None:
            both = tok.decode([self._anchor, token_id], skip_special_tokens=False)
            if both.startswith(self._anchor_text):
                return both[len(self._anchor_text):]
        return tok.decode([token_id], skip_special_tokens=False)

    def token(self, token_id: int) -> TokenText:
        token_id = int(token_id)
        found = self._cache.get(token_id)
        if found is not None:
            return found
        if self.tokenizer is None:
            out = TokenText(token_id, f"⟨{token_id}⟩", "text", "")
        elif token_id not in self._ids:
            out = TokenText(token_id, f"⟨unused id {token_id}⟩", "padding", "")
        elif token_id in self._special:
            exact = self.tokenizer.id_to_token(token_id) or ""
            out = TokenText(token_id, unicodedata.normalize("NFKC", exact), "special", exact)
        else:
            exact = self._decode_piece(token_id)
            raw = _raw_bytes(self.tokenizer.id_to_token(token_id)) if _REPLACEMENT in exact else None
            if raw is not None and _REPLACEMENT.encode() not in raw:
                out = TokenText(token_id, _bytes_label(raw), "bytes", exact)
            else:
                out = TokenText(token_id, exact, "text", exact)
        self._cache[token_id] = out
        return out

    def text(self, token_id: int) -> str:
        """The display text of one id."""
        return self.token(token_id).text

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Display text per id."""
        return [self.text(i) for i in ids]

    @staticmethod
    def _pieces_of(toks: Iterable[TokenText]) -> list[str]:
        """What each token adds to the decoded text (special tokens as written; a padding id adds nothing)."""
        return [t.exact if t.kind != "padding" else "" for t in toks]

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """What each token adds to the decoded text: hesitation matching runs on these."""
        return self._pieces_of(self.token(i) for i in ids)

    def example_views(self, ids: Sequence[int], words: Sequence[str] = DEFAULT_HESITATION_WORDS
                      ) -> tuple[list[str], list[str], list[bool]]:
        """Display texts, kinds and hesitation marks of ``ids`` in one pass (a feature page asks this for ~50
        examples of ~70 tokens; separate passes through :meth:`token` were ~15% of its time)."""
        cache, token = self._cache, self.token
        toks = [cache.get(i) or token(i) for i in ids]
        return [t.text for t in toks], [t.kind for t in toks], hesitation_marks(self._pieces_of(toks), words)

    def hesitation_marks(self, ids: Sequence[int], words: Sequence[str] = DEFAULT_HESITATION_WORDS) -> list[bool]:
        """Per token: part of a hesitation word (``training.hesitation``'s rule on the decoded pieces)."""
        return hesitation_marks(self.pieces(ids), words)

    def all_ids(self) -> list[int]:
        return sorted(self._ids)

    _STRIP = " \t\n\r,.;:!?…—-\"'()"

    def ids_matching(self, query: str, limit: int = 200) -> list[int]:
        """Token ids whose text is ``query`` up to surrounding spaces and punctuation (case-insensitive).

        ``#123`` is the id 123 itself. Padded ids never match. The first search builds a map from each
        token's normalised text to its ids (one pass over the vocabulary, ~150k tokens for a Qwen tokenizer);
        later searches are one lookup instead of that pass.
        """
        query = query.strip()
        if query.startswith("#") and query[1:].isdigit():
            tid = int(query[1:])
            return [tid] if self.tokenizer is not None and tid in self._ids else []
        q = query.strip(self._STRIP).casefold() or query.casefold()
        return self._match_index().get(q, [])[:limit]

    def _match_index(self) -> dict[str, list[int]]:
        index = self._by_text
        if index is None:
            index = {}
            for i in self.all_ids():
                t = self.token(i)
                if t.kind == "padding":
                    continue
                text = t.text if t.kind == "special" else t.exact
                index.setdefault(text.strip(self._STRIP).casefold() or text.casefold(), []).append(i)
            self._by_text = index  # built whole, then published: concurrent requests at worst build it twice
        return index


EMPTY_VOCAB = Vocab(None, None)


def _with_fallback_decoder(tok: Any, data: dict[str, Any]) -> Any:
    """A tokenizer.json with no decoder but a ByteLevel / Metaspace pre-tokenizer gets the matching decoder."""
    from tokenizers import decoders

    if data.get("decoder"):
        return tok
    pre = json.dumps(data.get("pre_tokenizer") or {})
    if '"ByteLevel"' in pre:
        tok.decoder = decoders.ByteLevel()
    elif '"Metaspace"' in pre:
        tok.decoder = decoders.Metaspace()
    return tok


def load_vocab_file(path: Path) -> Vocab:
    """A :class:`Vocab` from a Hugging Face ``tokenizer.json``."""
    from tokenizers import Tokenizer  # a small Rust wheel, no torch

    text = Path(path).read_text(encoding="utf-8")
    tok = _with_fallback_decoder(Tokenizer.from_str(text), json.loads(text))
    return Vocab(tok, str(path))


@lru_cache(maxsize=32)
def _load_cached(path: str, mtime: float) -> Vocab:
    return load_vocab_file(Path(path))


ORGANISM_PREFIX = "organism:"  # as worker/models_cache.py: organism:<preset>:s<seed>


def _organism_root(target_model: str, data_dir: Path | None) -> Path | None:
    """``<data_dir>/models/organism-<preset>-s<seed>`` of an ``organism:<preset>:s<seed>`` spec, else None."""
    preset, _, seed = target_model[len(ORGANISM_PREFIX):].rpartition(":")
    if data_dir is None or not preset or not seed.startswith("s"):
        return None
    return Path(data_dir) / "models" / f"organism-{preset}-s{seed[1:]}"


def _candidates(tokenizer: str | None, target_model: str | None, data_dir: Path | None) -> list[Path]:
    out: list[Path] = []
    if tokenizer:
        out.append(Path(tokenizer).expanduser())
    if target_model and target_model.startswith(ORGANISM_PREFIX):
        root = _organism_root(target_model, data_dir)
        return out + ([root / "tokenizer"] if root is not None else [])
    if target_model:
        target = Path(target_model).expanduser()
        out += [target, target.parent / "tokenizer"]
        hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
        snapshots = hub.expanduser() / ("models--" + target_model.replace("/", "--")) / "snapshots"
        if "/" in target_model and snapshots.is_dir():
            out += sorted(snapshots.iterdir(), reverse=True)
    return out


def _tokenizer_files(tokenizer: str | None, target_model: str | None, data_dir: Path | None) -> Iterator[Path]:
    """The ``tokenizer.json`` files that exist among the candidates, in search order."""
    for cand in _candidates(tokenizer, target_model, data_dir):
        try:
            path = cand / "tokenizer.json" if cand.is_dir() else cand
            if path.is_file():
                yield path
        except OSError:  # a path too long or unreadable is simply not a candidate
            continue


def find_vocab(tokenizer: str | None, target_model: str | None, data_dir: Path | None = None) -> Vocab:
    """The vocabulary for a run (see the module docstring for the search order); cached by file mtime."""
    for path in _tokenizer_files(tokenizer, target_model, data_dir):
        try:
            return _load_cached(str(path.resolve()), path.stat().st_mtime)
        except Exception as exc:  # tokenizers raises a plain Exception on a malformed file
            log.warning("Cannot read tokenizer %s: %s", path, exc)
    return EMPTY_VOCAB


def is_hesitation(text: str, words: Sequence[str] = DEFAULT_HESITATION_WORDS) -> bool:
    """Whether one displayed token is on its own a whole hesitation word (``training.hesitation``'s rule)."""
    return is_hesitation_piece(text, words)


@dataclass(frozen=True)
class PromptChecker:
    """Encodes a prompt as the worker will (the run's tokenizer, special tokens added) and knows the context."""

    encode: Any  # Callable[[str], list[int]]
    context_length: int | None


def _context_length(target_model: str | None, data_dir: Path | None) -> int | None:
    """``max_position_embeddings`` from the target model's ``config.json`` (organism: its ``target/``)."""
    if not target_model:
        return None
    if target_model.startswith(ORGANISM_PREFIX):
        root = _organism_root(target_model, data_dir)
        if root is None:
            return None
        model_dir = root / "target"
    else:
        model_dir = Path(target_model).expanduser()
    try:
        value = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def find_prompt_checker(tokenizer: str | None, target_model: str | None,
                        data_dir: Path | None = None) -> PromptChecker | None:
    """An encoder for the run's tokenizer and its context length, or None (then the worker checks)."""
    vocab = find_vocab(tokenizer, target_model, data_dir)
    if vocab.tokenizer is None:
        return None
    tok = vocab.tokenizer
    return PromptChecker(lambda text: tok.encode(text).ids, _context_length(target_model, data_dir))
