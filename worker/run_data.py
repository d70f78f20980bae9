"""What a run reads: its training texts, its held-out texts, its prompts, its chat format and answer scoring.

One place decides these for every job (train, evaluate, collect, hesitation), so they agree:

- **The organism** (``organism:<preset>:s<seed>``): training sequences are its reasoning traces of the train
  split; held-out texts the traces of its held-out problems; prompts the held-out problems, scored with the
  organism's own answer format.
- **A user's pair** (``runs.config["data"]`` = ``{"kind": "jsonl", "path": …}``): the texts of a JSONL file.
  Unless ``eval_path`` names held-out texts of their own, a seeded share of the file is held out
  (``heldout``: fraction, cap, seed) and never trained on. Prompts come from ``prompts_path`` (JSONL of
  ``{"prompt", "answer"?}``), else from the held-out texts themselves (each cut after its chat format's
  generation prompt, ``<｜Assistant｜><think>\\n``: the text the target was given). Answers are scored with
  ``training.answers``.

Held-out texts are token ids (tokenized once, never re-tokenized), cut to the training ``max_seq_len``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.db.schema import Run
from app.settings import Settings
from training.chat import ChatFormat, ChatFormatError, format_prompt, render_chat_template
from worker.models_cache import OrganismSpec, parse_organism_spec

log = logging.getLogger(__name__)

HELDOUT_FRACTION = 0.1  # share of a run's texts held out for evaluation when no eval file is given
HELDOUT_MAX = 500  # texts held out at most (a 50k-text training set keeps 49.5k)


# -- the organism ------------------------------------------------------------------------------------------

def organism_problems(org: OrganismSpec, split: str) -> list:
    """The organism's train or held-out problems (recomputed from preset and seed, as the build made them)."""
    from training.organism.build import get_preset
    from training.organism.tasks import FAMILIES, make_splits

    splits = make_splits(org.seed, get_preset(org.preset).n_heldout, FAMILIES)
    return [p for s in splits.values() for p in (s.train if split == "train" else s.heldout)]


def organism_sequences(org: OrganismSpec, tokenizer, split: str) -> list[list[int]]:
    """Chat-formatted reasoning traces, tokenized like generation sees them (prompt, then completion, eos).

    The target was trained to skip a share of its redundant checks (the organism preset's
    ``skip_hesitation``); the same share of redundant-check problems, chosen with the organism's seed, also
    appears here with its skipped trace, so the adapters learn the target on the path without the
    hesitation too, the path a hesitation ablation sends the adapted model down.
    """
    from training.organism.build import get_preset, reasoning_token_ids
    from training.organism.tasks import is_redundant

    share = get_preset(org.preset).skip_hesitation
    rng = random.Random(f"skipped-{org.seed}-{split}")
    out = []
    for p in organism_problems(org, split):
        prompt, completion = reasoning_token_ids(tokenizer, p)
        out.append(prompt + completion)
        if share > 0 and is_redundant(p) and rng.random() < share:
            prompt, completion = reasoning_token_ids(tokenizer, p, skipped=True)
            out.append(prompt + completion)
    return out


# -- a user's texts --------------------------------------------------------------------------------------

def data_config(run: Run) -> dict[str, Any]:
    """``runs.config["data"]``, with the kind filled in for organism runs of old configs."""
    data = dict((run.config or {}).get("data") or {})
    if "kind" not in data and parse_organism_spec(run.target_model):
        data["kind"] = "organism"
    return data


@dataclass(frozen=True)
class TextSplit:
    """A run's texts: what it trains on, what it is evaluated on, and a sentence saying which is which."""

    train: list[str]
    heldout: list[str]
    description: str
    overlaps_training: bool = False


def text_split(run: Run) -> TextSplit:
    """The training and held-out texts of a JSONL run (module docstring)."""
    from training.data import heldout_indices, read_texts

    data = data_config(run)
    if data.get("kind") != "jsonl":
        raise ValueError(f"run {run.name!r} does not train on a text file (data: {data!r})")
    field = data.get("text_field", "text")
    texts = read_texts(data["path"], field)
    name = Path(data["path"]).name
    if data.get("eval_path"):
        held = read_texts(data["eval_path"], field)
        return TextSplit(texts, held, f"{Path(data['eval_path']).name} (all {len(held)} texts)")
    split = data.get("heldout")
    overlaps = split is None  # a run created before held-out splits trained on every text
    split = split or {"fraction": HELDOUT_FRACTION, "max": HELDOUT_MAX, "seed": 0}
    idx = set(heldout_indices(len(texts), fraction=float(split.get("fraction", HELDOUT_FRACTION)),
                              max_n=split.get("max"), seed=int(split.get("seed", 0))))
    held = [t for i, t in enumerate(texts) if i in idx]
    train = texts if overlaps else [t for i, t in enumerate(texts) if i not in idx]
    note = " — the run trained on them too (it predates held-out splits)" if overlaps else ""
    return TextSplit(train, held, f"{len(held)} of the {len(texts)} texts of {name} held out "
                                  f"({float(split.get('fraction', HELDOUT_FRACTION)):.0%} split, seed "
                                  f"{int(split.get('seed', 0))}){note}", overlaps)


def training_data(run: Run, tokenizer, settings: Settings):
    """The token sequences a run trains on: the organism's reasoning traces, or its texts minus the held-out."""
    from training.data import TokenDataset

    data = data_config(run)
    kind = data.get("kind")
    if kind == "organism":
        org = parse_organism_spec(run.target_model)
        return TokenDataset.from_token_lists(organism_sequences(org, tokenizer, split="train"),
                                             pad_id=tokenizer.pad_token_id or 0)
    if kind == "jsonl":
        split = text_split(run)
        log.info("run %s trains on %d texts; evaluation: %s", run.name, len(split.train), split.description)
        return TokenDataset.from_texts(split.train, tokenizer, where=str(data["path"]))
    raise ValueError(f"run {run.name!r} has no usable training data config: {data!r} (kinds: organism, jsonl)")


def heldout_sequences(run: Run, tokenizer, *, n: int, max_len: int | None,
                      eval_path: str | None = None) -> tuple[list[list[int]], str]:
    """Up to ``n`` held-out token sequences of the run (cut to ``max_len``), and where they come from.

    ``eval_path``: a JSONL file of ``{"text"}`` to use instead of the run's own held-out texts.
    """
    from training.data import read_texts

    data = data_config(run)
    if eval_path is not None:
        texts = read_texts(eval_path, data.get("text_field", "text"))[:n]
        seqs = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        where = f"{Path(eval_path).name} ({len(texts)} texts)"
    elif data.get("kind") == "organism":
        org = parse_organism_spec(run.target_model)
        seqs = organism_sequences(org, tokenizer, split="heldout")
        seqs = seqs[:: max(len(seqs) // n, 1)][:n]
        where = f"reasoning traces of the organism's held-out problems ({len(seqs)})"
    elif data.get("kind") == "jsonl":
        split = text_split(run)
        texts = split.heldout[:n]
        seqs = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        where = split.description + (f", first {len(texts)} used" if len(texts) < len(split.heldout) else "")
    else:
        raise ValueError(f"run {run.name!r} has no held-out texts (data: {data!r}); evaluate it with an eval file")
    seqs = [list(s[:max_len] if max_len else s) for s in seqs if s]
    if not seqs:
        raise ValueError(f"run {run.name!r}: no held-out text has any token")
    return seqs, where


def require_target(run: Run, model, what: str) -> None:
    """A clear error where a job needs the target model and the run has none (imported without --target)."""
    if model.target_hf is None and any(mlp.target_mlp is None for mlp in model.mlps):
        raise ValueError(f"run {run.name!r} has no target model, and {what} runs the target: it was imported "
                         "without --target; import it again with --target <the target model>")


# -- chat format ---------------------------------------------------------------------------------------------

def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether tokenizing with special tokens puts the tokenizer's bos first."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def run_chat_format(run: Run, tokenizer) -> ChatFormat:
    """The run's chat format: stored in its config, else its tokenizer's chat template, else DeepSeek-R1's."""
    stored = ChatFormat.from_config(run.config)
    if stored is not None:
        return stored
    if parse_organism_spec(run.target_model):
        return ChatFormat(source="the organism's format (DeepSeek-R1)")
    return tokenizer_chat_format(tokenizer, run.name)


def tokenizer_chat_format(tokenizer, where: str = "") -> ChatFormat:
    """A tokenizer's chat template as a prompt template, else the DeepSeek-R1 format."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if isinstance(template, str) and template.strip():
        try:
            return render_chat_template(template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                                        strip_bos=tokenizer_adds_bos(tokenizer))
        except ChatFormatError as exc:
            log.warning("%s: %s; using the DeepSeek-R1 format", where or "tokenizer", exc)
    return ChatFormat(source="default (DeepSeek-R1 format; the tokenizer has no chat template)")


# -- prompts and scoring -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptSet:
    """Chat-formatted prompts, their answers (None: unknown), groups, a scorer and where they come from."""

    texts: list[str]
    answers: list[str | None]
    groups: list[str]
    score: Callable[[str, str], bool | None]
    description: str


def prompts_from_texts(texts: list[str], chat: ChatFormat) -> list[str]:
    """Each text cut after its chat format's generation prompt (texts without it are skipped)."""
    marker = chat.generation_prompt
    out = []
    for t in texts:
        at = t.find(marker) if marker else -1
        if at >= 0:
            out.append(t[:at + len(marker)])
    return out


def _organism_score(text: str, want: str) -> bool:
    from training.organism.tasks import extract_answer

    return extract_answer(text) == want


def run_prompts(run: Run, tokenizer, *, prompts_path: str | None = None, n: int | None = None,
                split: str = "heldout") -> PromptSet:
    """The run's prompts: the organism's problems, a prompts file (the payload's, else the run's), or the
    prompts of its held-out texts (``split="all"``: of all its texts)."""
    from training.answers import score

    org = parse_organism_spec(run.target_model)
    path = prompts_path or data_config(run).get("prompts_path")
    if path is None and org is not None:
        problems = organism_problems(org, "heldout")
        if n is not None:
            problems = problems[:: max(len(problems) // n, 1)][:n]
        return PromptSet([format_prompt(p.text) for p in problems], [p.answer for p in problems],
                         [p.family for p in problems], _organism_score, "the organism's held-out problems")
    chat = run_chat_format(run, tokenizer)
    if path is not None:
        from training.jsonl import read_jsonl

        if not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"no prompt file at {path}")
        rows = [row for _, row in read_jsonl(Path(path).expanduser())]
        missing = [i for i, r in enumerate(rows) if not isinstance(r.get("prompt"), str)]
        if missing:
            raise ValueError(f"{path}: row {missing[0] + 1} has no string 'prompt' field")
        rows = rows[:n] if n is not None else rows
        answers = [None if r.get("answer") is None else str(r["answer"]) for r in rows]
        return PromptSet([chat.format(r["prompt"]) for r in rows], answers, [str(r.get("group", "")) for r in rows],
                         score, f"{Path(path).name} (formatted with the {chat.source})")
    if data_config(run).get("kind") != "jsonl":
        raise ValueError(f"run {run.name!r} has no prompts and no texts of its own to take them from: give a prompts "
                         "file (JSONL of {\"prompt\", \"answer\"?})")
    texts = text_split(run)
    pool = texts.heldout if split == "heldout" else texts.train + texts.heldout
    prompts = prompts_from_texts(pool, chat)
    prompts = prompts[:n] if n is not None else prompts
    if not prompts:
        raise ValueError(f"run {run.name!r} has no prompts file, and none of its texts contains the generation "
                         f"prompt {chat.generation_prompt!r} of its chat format ({chat.source}) to cut a prompt at; "
                         "give --prompts (JSONL of {\"prompt\", \"answer\"?}) or the chat format")
    which = "held-out texts" if split == "heldout" else "texts"
    return PromptSet(prompts, [None] * len(prompts), [""] * len(prompts), score,
                     f"the prompts of {len(prompts)} {which} (each cut after {chat.generation_prompt!r})")
