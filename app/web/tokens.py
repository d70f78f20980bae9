"""Token ids → display strings for the pages, without torch or transformers.

Examples, prompts and graphs store token ids (design.md: never re-tokenize for alignment), so a page
needs the run's vocabulary to show text. This reads the ``tokenizer.json`` that Hugging Face fast
tokenizers save (the organism's byte-level BPE, Qwen2's, Llama's) and maps each id to the text that
id decodes to on its own: byte-level pieces (``Ġwait`` → `` wait``), SentencePiece pieces
(``▁wait`` → `` wait``), added tokens as written. A token that holds only part of a UTF-8 character
shows as U+FFFD; that is honest for a single token.

:func:`find_prompt_checker` also encodes free text with the same ``tokenizer.json`` (the ``tokenizers``
library, no torch) and reads the model's context length from its ``config.json``, so that the web app can
refuse an over-long ablation prompt with a 4xx before anything is queued.

Where the tokenizer lives, in order: ``runs.config["tokenizer"]`` (a directory or a tokenizer.json),
an organism spec's ``<data_dir>/models/organism-<preset>-s<seed>/tokenizer/`` (``organism:<preset>:s<seed>``,
as ``worker/models_cache.py`` resolves it), the target model's directory, its sibling ``tokenizer/``, the
Hugging Face cache snapshot of the target model id. Without one, ids show as ``⟨id⟩`` and the page says so.

The same rule as ``training/hesitation.py`` (which imports torch, so the web app cannot) decides
which displayed tokens are hesitation tokens: the word, up to spaces and punctuation around it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_HESITATION_WORDS: tuple[str, ...] = ("Wait", "wait", "Hmm", "Actually", "But")  # as training/hesitation.py
_STRIP = " \t\n\r,.;:!?…—-\"'()"  # as training/hesitation.py: punctuation around a word does not change it


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


def _decode_byte_level(piece: str) -> str:
    if not all(ch in _BYTE_OF_CHAR for ch in piece):
        return piece
    return bytes(_BYTE_OF_CHAR[ch] for ch in piece).decode("utf-8", errors="replace")


def _uses(component: Any, kind: str) -> bool:
    """Whether a tokenizer.json decoder/pre-tokenizer (possibly a Sequence) contains ``kind``."""
    if not isinstance(component, dict):
        return False
    if component.get("type") == kind:
        return True
    return any(_uses(c, kind) for c in component.get("decoders", []) + component.get("pretokenizers", []))


@dataclass(frozen=True)
class Vocab:
    """A run's id → text map; ``source`` says where it came from (None: no tokenizer found)."""

    texts: dict[int, str]
    source: str | None = None

    def text(self, token_id: int) -> str:
        return self.texts.get(int(token_id), f"⟨{int(token_id)}⟩")

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.text(i) for i in ids]

    def ids_matching(self, query: str, limit: int = 200) -> list[int]:
        """Ids whose text equals ``query`` up to surrounding spaces and punctuation (case-insensitive)."""
        q = query.strip(_STRIP).casefold() or query.casefold()
        out = [i for i, t in self.texts.items() if (t.strip(_STRIP).casefold() or t.casefold()) == q]
        return sorted(out)[:limit]


EMPTY_VOCAB = Vocab({}, None)


def load_vocab_file(path: Path) -> Vocab:
    """Parse a Hugging Face ``tokenizer.json`` into a :class:`Vocab`."""
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    vocab = model.get("vocab") or {}
    texts: dict[int, str] = {}
    if isinstance(vocab, dict):  # BPE, WordLevel, WordPiece: {piece: id}
        items = ((int(i), piece) for piece, i in vocab.items())
    else:  # Unigram: [[piece, score], ...] by id
        items = ((i, entry[0]) for i, entry in enumerate(vocab))
    byte_level = _uses(data.get("decoder"), "ByteLevel") or _uses(data.get("pre_tokenizer"), "ByteLevel")
    metaspace = _uses(data.get("decoder"), "Metaspace") or _uses(data.get("pre_tokenizer"), "Metaspace")
    for i, piece in items:
        if byte_level:
            texts[i] = _decode_byte_level(piece)
        elif metaspace or "▁" in piece:
            texts[i] = piece.replace("▁", " ")
        else:
            texts[i] = piece
    for added in data.get("added_tokens") or []:
        texts[int(added["id"])] = added["content"]
    return Vocab(texts, str(path))


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
        path = cand / "tokenizer.json" if cand.is_dir() else cand
        if path.is_file():
            yield path


def find_vocab(tokenizer: str | None, target_model: str | None, data_dir: Path | None = None) -> Vocab:
    """The vocabulary for a run (see the module docstring for the search order); cached by file mtime."""
    for path in _tokenizer_files(tokenizer, target_model, data_dir):
        try:
            return _load_cached(str(path.resolve()), path.stat().st_mtime)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("Cannot read tokenizer %s: %s", path, exc)
    return EMPTY_VOCAB


@lru_cache(maxsize=64)
def _word_set(words: tuple[str, ...]) -> frozenset[str]:
    return frozenset(w.strip(_STRIP) for w in words)


def is_hesitation(text: str, words: Sequence[str] = DEFAULT_HESITATION_WORDS) -> bool:
    """Whether a displayed token is a hesitation token (the word up to spaces and punctuation)."""
    word = text.strip(_STRIP)
    return bool(word) and word in _word_set(tuple(words))


@dataclass(frozen=True)
class PromptChecker:
    """Encodes a prompt as the worker will (the run's tokenizer, special tokens added) and knows the context."""

    encode: Any  # Callable[[str], list[int]]
    context_length: int | None


@lru_cache(maxsize=32)
def _encoder_cached(path: str, mtime: float) -> Any:
    from tokenizers import Tokenizer  # a small Rust wheel, no torch

    return Tokenizer.from_file(path)


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
    for path in _tokenizer_files(tokenizer, target_model, data_dir):
        try:
            tok = _encoder_cached(str(path.resolve()), path.stat().st_mtime)
            return PromptChecker(lambda text, tok=tok: tok.encode(text).ids, _context_length(target_model, data_dir))
        except Exception as exc:  # ImportError without tokenizers; tokenizers raises a plain Exception on a bad file
            log.warning("Cannot load tokenizer %s to check prompt lengths: %s", path, exc)
    return None
