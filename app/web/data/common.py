"""Shared pieces of the page contexts: errors, run lookup, small models."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from sqlalchemy import and_, false, or_, select
from sqlalchemy.orm import Session

from app.db.schema import FeatureSet, Run
from app.web.tokens import PromptChecker, Vocab, find_prompt_checker, find_vocab
from training.hesitation import HesitationWordsError, normalize_words


class NotFound(LookupError):
    """A run, feature, graph … that does not exist; the app answers 404 with this message."""


class BadInput(ValueError):
    """A request that cannot be served as asked; the app answers ``status_code`` (400) with this message."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code


class RunRef(BaseModel):
    """Just enough of a run to name it and link to it; ``base_label``/``target_label`` say which model is which
    (the organism's two models share one spec)."""

    id: int
    name: str
    status: str
    base_model: str
    target_model: str
    base_label: str = ""
    target_label: str = ""
    created: datetime | None = None


def model_labels(base: str, target: str) -> tuple[str, str]:
    """Readable names of a run's two models: an ``organism:<preset>:s<seed>`` spec names both of its models."""
    def organism(spec: str, which: str) -> str | None:
        if not spec.startswith("organism:"):
            return None
        preset, _, seed = spec[len("organism:"):].rpartition(":")
        return f"organism {which} ({preset}, seed {seed.lstrip('s')})"

    return organism(base, "base") or base, organism(target, "reasoning target") or target


def run_ref(run: Run) -> RunRef:
    base_label, target_label = model_labels(run.base_model, run.target_model)
    return RunRef(id=run.id, name=run.name, status=run.status, base_model=run.base_model,
                  target_model=run.target_model, base_label=base_label, target_label=target_label,
                  created=run.created)


def get_run(session: Session, run: str | int) -> Run:
    """A run by id (digits) or by name; :class:`NotFound` otherwise."""
    key = str(run)
    row = session.get(Run, int(key)) if key.isdigit() else None
    if row is None:
        row = session.scalars(select(Run).where(Run.name == key)).first()
    if row is None:
        raise NotFound(f"No run {key!r}. The index page lists the runs that exist.")
    return row


DATA_DIR_KEY = "adapterlens_data_dir"  # Session.info key: where organism:… model specs resolve


def _tokenizer_lookup(session: Session, run: Run) -> tuple[str | None, str, Path | None]:
    """(configured tokenizer, target model, data directory): where :mod:`app.web.tokens` looks for the tokenizer;
    ``session.info[DATA_DIR_KEY]`` (set by the app) locates organism tokenizers."""
    config = run.config or {}
    tok = config.get("tokenizer") or (config.get("paths") or {}).get("tokenizer")
    data_dir = session.info.get(DATA_DIR_KEY)
    return tok if isinstance(tok, str) else None, run.target_model, Path(data_dir) if data_dir else None


def run_vocab(session: Session, run: Run) -> Vocab:
    """The run's vocabulary (ids → display text)."""
    return find_vocab(*_tokenizer_lookup(session, run))


def run_prompt_checker(session: Session, run: Run) -> PromptChecker | None:
    """The run's prompt encoder and context length, found like :func:`run_vocab`'s tokenizer."""
    return find_prompt_checker(*_tokenizer_lookup(session, run))


def hesitation_words(run: Run) -> tuple[str, ...]:
    """The run's hesitation words (``runs.config["hesitation_words"]``), else the default list."""
    config = run.config or {}
    words = config.get("hesitation_words") or (config.get("hesitation") or {}).get("words")
    try:
        return normalize_words(words if isinstance(words, list | tuple) and words else None)
    except HesitationWordsError:
        return normalize_words(None)


def hesitation_set(session: Session, run_id: int) -> FeatureSet | None:
    """The run's hesitation feature set: the newest set whose name mentions hesitation, else None."""
    return session.scalars(
        select(FeatureSet)
        .where(FeatureSet.run_id == run_id, FeatureSet.name.ilike("%hesitation%"))
        .order_by(FeatureSet.id.desc())
    ).first()


def keys_condition(layer_col: Any, index_col: Any, keys: Iterable[tuple[int, int]]) -> Any:
    """``(layer, index) IN keys`` written as ``OR`` of ``layer = L AND index IN (...)`` per layer.

    Both backends turn this into primary-key lookups; a row-value ``IN`` makes SQLite scan the run.
    """
    by_layer: dict[int, list[int]] = {}
    for layer, index in keys:
        by_layer.setdefault(int(layer), []).append(int(index))
    if not by_layer:
        return false()
    return or_(*(and_(layer_col == layer, index_col.in_(sorted(set(idx)))) for layer, idx in sorted(by_layer.items())))


def as_float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None
