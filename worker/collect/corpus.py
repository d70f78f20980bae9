"""Corpora for feature collection: token-id sequences with a chat region per token, kept addressable.

All sources end as one :class:`Corpus`: token ids flat in an int32 tensor with int64 offsets and an
int8 region per token (5 bytes a token: 160M tokens take 800 MB), so the collector can cut the token
window of any kept example at the end without a second tokenisation. Token ids are what the model saw;
text is never re-tokenised for alignment.

Sources:
- :meth:`Corpus.from_sequences`: token-id lists, with regions given or labelled from chat markers;
- :meth:`Corpus.from_jsonl`: one JSON object a line with ``"text"``, or ``"prompt"`` and ``"answer"``;
- :meth:`Corpus.from_hf_dataset`: a Hugging Face dataset saved with ``save_to_disk`` (needs ``datasets``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.chat import ASSISTANT, THINK_END, THINK_START, Region, format_prompt, label_regions
from training.jsonl import read_jsonl

logger = logging.getLogger(__name__)

_TOKENIZE_CHUNK = 512  # rows per tokenizer call (fast tokenizers batch in Rust)


@dataclass(frozen=True)
class Markers:
    """Token ids of the chat markers that split a sequence into regions (-1: not in the vocabulary)."""

    assistant_id: int
    think_start_id: int
    think_end_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> Markers:
        """Look the markers up as single tokens; a missing one is -1 (its region is then never entered)."""
        ids = []
        unk = getattr(tokenizer, "unk_token_id", None)
        for tok in (ASSISTANT, THINK_START, THINK_END):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is None or (unk is not None and tid == unk):
                logger.warning("tokenizer has no single token %r; regions that need it will not be labelled", tok)
                tid = -1
            ids.append(int(tid))
        return cls(*ids)

    def label(self, token_ids: Sequence[int], prompt_length: int | None = None) -> list[Region]:
        """``training.chat.label_regions`` with these markers (a Python loop: for short sequences)."""
        return label_regions(token_ids, assistant_id=self.assistant_id, think_start_id=self.think_start_id,
                             think_end_id=self.think_end_id, prompt_length=prompt_length)

    def label_tensor(self, ids: torch.Tensor, prompt_length: int | None = None) -> torch.Tensor:
        """The same labels as :meth:`label`, vectorised (int8 [n]); what corpora of millions of tokens use.

        ``label_regions`` is a set/reset state machine after the prompt: ``<think>`` sets "thinking",
        ``</think>`` resets it, and a marker that does not change the state is an ordinary token. So the
        state before token i is "the latest marker before i was a ``<think>``", found with two cummax.
        """
        n = ids.numel()
        pos = torch.arange(n)
        assistant = (ids == self.assistant_id).nonzero()
        prompt_end = int(assistant[0]) + 1 if assistant.numel() else n
        if prompt_length is not None:
            prompt_end = min(prompt_end, prompt_length)
        after = pos >= prompt_end
        is_start = (ids == self.think_start_id) & after
        is_end = (ids == self.think_end_id) & after
        last_start = torch.where(is_start, pos, -1).cummax(0).values
        last_end = torch.where(is_end, pos, -1).cummax(0).values
        thinking = torch.zeros(n, dtype=torch.bool)  # state before each token
        thinking[1:] = last_start[:-1] > last_end[:-1]
        out = torch.where(thinking, int(Region.THINKING), int(Region.ANSWER))
        out[is_start & ~thinking] = int(Region.THINK_START)
        out[is_end & thinking] = int(Region.THINK_END)
        out[~after] = int(Region.PROMPT)
        return out.to(torch.int8)


NO_MARKERS = Markers(-1, -1, -1)  # every token is labelled PROMPT (a plain-text corpus)


class Corpus:
    """Token-id sequences stored flat; ``len(corpus)`` sequences, ``corpus[i]`` their token ids."""

    def __init__(self, tokens: torch.Tensor, offsets: torch.Tensor, regions: torch.Tensor):
        if offsets.dim() != 1 or offsets.numel() < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != tokens.numel():
            raise ValueError("offsets must start at 0 and end at the number of tokens")
        if regions.shape != tokens.shape:
            raise ValueError(f"one region per token expected: {regions.shape} regions for {tokens.shape} tokens")
        if regions.numel() and (int(regions.min()) < 0 or int(regions.max()) >= len(Region)):
            raise ValueError(f"region labels must be in 0..{len(Region) - 1}")
        if tokens.numel() and int(tokens.min()) < 0:
            raise ValueError(f"token ids must be non-negative, got {int(tokens.min())}")
        self.tokens = tokens.to(torch.int32)
        self.offsets = offsets.to(torch.int64)
        self.regions = regions.to(torch.int8)

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def __repr__(self) -> str:
        return f"Corpus({len(self)} sequences, {self.n_tokens} tokens)"

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def regions_of(self, i: int) -> torch.Tensor:
        return self.regions[self.offsets[i]:self.offsets[i + 1]]

    def windows(self, seq: torch.Tensor, pos: torch.Tensor, before: int, after: int) -> torch.Tensor:
        """Token ids around (seq, pos) pairs: [n, before + 1 + after] int32, -1 outside the sequence."""
        seq, pos = seq.cpu().long(), pos.cpu().long()
        rel = pos.unsqueeze(1) + torch.arange(-before, after + 1)
        inside = (rel >= 0) & (rel < self.lengths[seq].unsqueeze(1))
        flat = (self.offsets[seq].unsqueeze(1) + rel).clamp(0, max(self.n_tokens - 1, 0))
        return self.tokens[flat].masked_fill(~inside, -1)

    def save(self, path: str | Path) -> None:
        """Keep a tokenised corpus (e.g. in the data dir) so shard jobs need not tokenise again."""
        torch.save({"tokens": self.tokens, "offsets": self.offsets, "regions": self.regions}, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> Corpus:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        return cls(state["tokens"], state["offsets"], state["regions"])

    # -- sources ---------------------------------------------------------------------------------
    @classmethod
    def from_sequences(cls, sequences: Iterable[Sequence[int] | torch.Tensor], *,
                       regions: Iterable[Sequence[int]] | None = None, markers: Markers | None = None,
                       prompt_lengths: Sequence[int | None] | None = None) -> Corpus:
        """Token-id lists; regions given per token, or labelled with ``markers`` (default: all PROMPT)."""
        seqs = [torch.as_tensor(s, dtype=torch.int64).reshape(-1) for s in sequences]
        if regions is not None:
            regs = [torch.as_tensor([int(r) for r in rs], dtype=torch.int64) for rs in regions]
            if len(regs) != len(seqs):
                raise ValueError(f"{len(regs)} region lists for {len(seqs)} sequences")
            for i, (s, r) in enumerate(zip(seqs, regs, strict=True)):
                if s.numel() != r.numel():
                    raise ValueError(f"sequence {i}: {r.numel()} regions for {s.numel()} tokens")
        else:
            m = markers or NO_MARKERS
            pls = list(prompt_lengths) if prompt_lengths is not None else [None] * len(seqs)
            if len(pls) != len(seqs):
                raise ValueError(f"{len(pls)} prompt lengths for {len(seqs)} sequences")
            regs = [m.label_tensor(s, pl) for s, pl in zip(seqs, pls, strict=True)]
        lengths = torch.tensor([0] + [s.numel() for s in seqs], dtype=torch.int64)
        empty = torch.zeros(0, dtype=torch.int64)
        return cls(torch.cat(seqs) if seqs else empty, lengths.cumsum(0), torch.cat(regs) if regs else empty)

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], tokenizer: Any, *, markers: Markers | None = None,
                  format_chat: bool = False, add_special_tokens: bool = True, max_length: int | None = None,
                  limit: int | None = None) -> Corpus:
        """Rows with ``"text"``, or ``"prompt"`` and ``"answer"``, tokenised with ``tokenizer``.

        ``text``: the whole sequence, regions from the chat markers in it. ``prompt`` + ``answer``: each
        tokenised on its own and concatenated (so the prompt boundary is exact); the prompt region ends
        with the prompt's last token. ``format_chat`` wraps a prompt with the chat template (user turn,
        assistant turn and ``<think>\\n``); otherwise fields are used verbatim. Sequences longer than
        ``max_length`` tokens are cut.
        """
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        markers = markers or Markers.from_tokenizer(tokenizer)
        seqs: list[list[int]] = []
        prompt_lengths: list[int | None] = []
        for chunk in _chunks(_limited(rows, limit), _TOKENIZE_CHUNK):
            texts, prompts, answers = [], [], []
            for n, row in enumerate(chunk):
                if "prompt" in row and "answer" in row:
                    p = str(row["prompt"])
                    prompts.append(format_prompt(p) if format_chat else p)
                    answers.append(str(row["answer"]))
                    texts.append(None)
                elif "text" in row:
                    texts.append(str(row["text"]))
                    prompts.append(None)
                    answers.append(None)
                else:
                    raise ValueError(f"row {len(seqs) + n} has neither 'text' nor 'prompt'+'answer': keys {sorted(row)}")
            enc_text = _encode(tokenizer, [t for t in texts if t is not None], add_special_tokens)
            enc_prompt = _encode(tokenizer, [p for p in prompts if p is not None], add_special_tokens)
            enc_answer = _encode(tokenizer, [a for a in answers if a is not None], False)
            it_t, it_p, it_a = iter(enc_text), iter(enc_prompt), iter(enc_answer)
            for t in texts:
                if t is not None:
                    ids, pl = next(it_t), None
                else:
                    p_ids = next(it_p)
                    ids, pl = p_ids + next(it_a), len(p_ids)
                if max_length is not None:
                    ids = ids[:max_length]
                if not ids:
                    logger.warning("skipping row %d: no tokens", len(seqs))
                    continue
                seqs.append(ids)
                prompt_lengths.append(pl)
        logger.info("tokenised %d sequences (%d tokens)", len(seqs), sum(map(len, seqs)))
        return cls.from_sequences(seqs, markers=markers, prompt_lengths=prompt_lengths)

    @classmethod
    def from_jsonl(cls, path: str | Path, tokenizer: Any, **kw: Any) -> Corpus:
        """A JSON-lines file of rows (see :meth:`from_rows` for the fields and options)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"corpus file {str(path)!r} does not exist")
        return cls.from_rows((row for _, row in read_jsonl(path)), tokenizer, **kw)

    @classmethod
    def from_hf_dataset(cls, path: str | Path, tokenizer: Any, *, split: str | None = None, **kw: Any) -> Corpus:
        """A dataset saved with ``Dataset.save_to_disk`` (a ``DatasetDict`` needs ``split``)."""
        try:
            from datasets import DatasetDict, load_from_disk
        except ImportError as exc:
            raise ImportError("reading a Hugging Face dataset needs the `datasets` package: "
                              "pip install datasets (or export it to JSON lines and use from_jsonl)") from exc
        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            if split is None or split not in ds:
                raise ValueError(f"{str(path)!r} holds splits {sorted(ds)}; pass split= one of them, not {split!r}")
            ds = ds[split]
        return cls.from_rows(iter(ds), tokenizer, **kw)


def load_corpus(source: Corpus | str | Path | Sequence[Sequence[int]], tokenizer: Any = None, **kw: Any) -> Corpus:
    """A corpus from whatever the caller has: a Corpus, token-id lists, a saved corpus (.pt), a .jsonl
    file or a saved Hugging Face dataset directory (the last two need the tokenizer)."""
    if isinstance(source, Corpus):
        return source
    if isinstance(source, str | Path):
        path = Path(source)
        if path.suffix == ".pt" and path.is_file():
            return Corpus.load(path)
        if tokenizer is None:
            raise ValueError(f"reading {str(path)!r} needs the target tokenizer")
        if path.is_dir():
            return Corpus.from_hf_dataset(path, tokenizer, **kw)
        return Corpus.from_jsonl(path, tokenizer, **kw)
    markers = kw.pop("markers", None) or (Markers.from_tokenizer(tokenizer) if tokenizer is not None else None)
    return Corpus.from_sequences(source, markers=markers, **kw)


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def _limited(rows: Iterable[Any], limit: int | None) -> Iterator[Any]:
    for n, row in enumerate(rows):
        if limit is not None and n >= limit:
            return
        yield row


def _chunks(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
