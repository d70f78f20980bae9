"""Labelling a run: every collected feature (or a sample) through one labeler, slice by slice.

What the ``label`` job (worker/labels.py), ``adapterlens label`` and the end of the collect job call. Each
slice is read, labelled and written in its own short transaction, so a crash loses at most one slice, and a
rerun of an LLM labelling skips the features that model already labelled (``resume``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.db.schema import Feature, Run
from app.labels import BUILTIN
from app.labels.builtin import label_feature
from app.labels.evidence import TOP_EXAMPLES, feature_keys, load_evidence, slices
from app.labels.store import labelled_keys, write_labels
from app.web.tokens import Vocab
from training.hesitation import HesitationWordsError, normalize_words, words_from_config

log = logging.getLogger(__name__)

Progress = Callable[[float, float | None, str | None], None]


def run_vocab_for(session: Session, run: Run, data_dir: Path | None) -> Vocab:
    """The run's vocabulary, found as the web pages find it (app/web/tokens.py)."""
    from app.web.data.common import DATA_DIR_KEY, run_vocab

    if data_dir is not None:
        session.info[DATA_DIR_KEY] = str(data_dir)
    return run_vocab(session, run)


def run_words(run: Run) -> tuple[str, ...]:
    try:
        return words_from_config(run.config)
    except HesitationWordsError:
        return normalize_words(None)


def sample_keys(keys: Sequence[tuple[int, int]], per_layer: int | None, seed: int = 42) -> list[tuple[int, int]]:
    """Up to ``per_layer`` keys per layer, drawn uniformly with ``seed`` (the paper: 250 per layer, seed 42)."""
    if per_layer is None:
        return list(keys)
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for k in keys:
        by_layer.setdefault(k[0], []).append(k)
    rng = random.Random(seed)
    out = []
    for layer in sorted(by_layer):
        ks = by_layer[layer]
        out += sorted(rng.sample(ks, per_layer)) if len(ks) > per_layer else ks
    return out


def label_run(engine: Engine, run_id: int, *, labeler: str = BUILTIN, data_dir: Path | None = None,
              layers: Sequence[int] | None = None, per_layer: int | None = None, alive_only: bool = False,
              resume: bool = True, llm: Any = None, progress: Progress | None = None,
              check: Callable[[], None] | None = None, slice_size: int | None = None) -> dict[str, Any]:
    """Label the run's features with ``labeler`` (``builtin`` or ``llm``: then ``llm`` is an
    :class:`app.labels.llm.LLMLabeler`). Returns counts and timing.

    ``per_layer`` samples that many features per layer (seed 42); ``alive_only`` leaves out features that never
    fired (the paper samples among alive ones); ``resume`` skips features this labeler's source already has.
    """
    if labeler != BUILTIN and llm is None:
        raise ValueError(f"labeler {labeler!r} needs an LLMLabeler (app/labels/llm.py)")
    t0 = time.perf_counter()
    with Session(engine) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise LookupError(f"run {run_id} does not exist")
        vocab = run_vocab_for(session, run, data_dir)
        words = run_words(run)
        keys = feature_keys(session, run_id, layers)
        if alive_only or per_layer is not None:
            alive = {(r.layer, r.index) for r in session.execute(
                select(Feature.layer, Feature.index).where(Feature.run_id == run_id, Feature.frequency > 0))}
            keys = [k for k in keys if k in alive]
        keys = sample_keys(keys, per_layer)
        source = BUILTIN if labeler == BUILTIN else llm.source
        skipped = 0
        if resume and labeler != BUILTIN:
            done = labelled_keys(session, run_id, source)
            skipped = sum(k in done for k in keys)
            keys = [k for k in keys if k not in done]
    total = len(keys)
    written = 0
    if progress:
        progress(0, total, f"labelling {total} features ({source})")
    size = slice_size or (512 if labeler == BUILTIN else llm.batch_size)
    for batch in slices(keys, size):
        if check:
            check()
        with Session(engine) as session:
            evidence = load_evidence(session, run_id, batch, n_top=TOP_EXAMPLES if labeler == BUILTIN else 20,
                                     with_acts=labeler != BUILTIN)
        if labeler == BUILTIN:
            labels = [(ev.layer, ev.index, label_feature(ev, vocab, words)) for ev in evidence]
        else:
            labels = llm.label_batch(evidence, vocab, words)
        with Session(engine) as session, session.begin():
            written += write_labels(session, run_id, source, labels)
        if progress:
            progress(written, total, f"labelled {written} of {total} features ({source})")
    seconds = time.perf_counter() - t0
    log.info("labelled %d features of run %d with %s in %.1f s", written, run_id, source, seconds)
    return {"source": source, "labelled": written, "skipped": skipped, "seconds": round(seconds, 3),
            "labels_per_s": round(written / seconds, 1) if seconds > 0 else None}
