"""Downloads in formats other tools read: a feature as circuit-tracer's feature JSON, ablations and
experiments as JSONL transcripts (one validated object per line; models in :mod:`app.formats`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.schema import Ablation, AblationToken, Example, Experiment, ExperimentRow
from app.formats import (
    AblationTranscriptLine,
    ExamplesQuantile,
    ExperimentTranscriptLine,
    FeatureExample,
    FeatureFile,
    cantor_pair,
)
from app.web.data.ablations import CONDITION_ORDER, request_view
from app.web.data.common import NotFound, get_run, run_vocab
from app.web.data.feature import get_feature
from app.web.data.graphs import _lens_texts

QUANTILE_NAMES = {"top": "Top activations", "quantile": "Quantile samples", "random": "Random activations"}
LOGIT_TOKENS = 10  # top / bottom logit tokens in a feature file


def feature_file(session: Session, run_key: str | int, layer: int, index: int) -> FeatureFile:
    """One feature in circuit-tracer's feature format; ``index`` is the graph JSON's cantor-paired ``feature``."""
    run = get_run(session, run_key)
    feat = get_feature(session, run.id, layer, index)
    vocab = run_vocab(session, run)
    groups: dict[str, list[FeatureExample]] = {}
    seen: set[tuple[int, ...]] = set()
    for ex in session.scalars(select(Example).where(Example.run_id == run.id, Example.layer == layer,
                                                    Example.index == index).order_by(Example.kind, Example.rank)):
        ids = [int(t) for t in ex.token_ids or []]
        acts = [float(a) if isinstance(a, int | float) else 0.0 for a in (ex.acts or [])][:len(ids)]
        acts += [0.0] * (len(ids) - len(acts))
        key = tuple(ids)
        groups.setdefault(ex.kind, []).append(FeatureExample(
            tokens=vocab.decode(ids), tokens_acts_list=acts, train_token_ind=ex.focus if 0 <= ex.focus < len(ids) else 0,
            is_repeated_datapoint=key in seen))
        seen.add(key)
    order = [k for k in QUANTILE_NAMES if k in groups] + sorted(k for k in groups if k not in QUANTILE_NAMES)
    hist = feat.histogram if isinstance(feat.histogram, dict) else {}
    edges = [float(e) for e in hist.get("edges") or [] if isinstance(e, int | float)]
    return FeatureFile(
        transcoder_id=f"adapterlens-run-{run.id}/layer-{layer}", index=cantor_pair(layer, index),
        examples_quantiles=[ExamplesQuantile(quantile_name=QUANTILE_NAMES.get(k, k), examples=groups[k]) for k in order],
        top_logits=_lens_texts(feat.logit_lens, "top", vocab, LOGIT_TOKENS),
        bottom_logits=_lens_texts(feat.logit_lens, "bottom", vocab, LOGIT_TOKENS),
        act_min=0.0, act_max=float(feat.max_act or 0.0), quantile_values=edges,
        histogram=[float(c) for c in hist.get("counts") or [] if isinstance(c, int | float)],
        activation_frequency=float(feat.frequency or 0.0), layer=layer, feature_index=index,
        label=feat.label,
    )


def _jsonl(lines: list[Any]) -> Iterator[str]:
    for line in lines:
        yield json.dumps(line.model_dump(mode="json"), ensure_ascii=False) + "\n"


def ablation_transcript(session: Session, run_key: str | int, ablation_id: int) -> list[AblationTranscriptLine]:
    """One line per condition, in the page's order."""
    run = get_run(session, run_key)
    a = session.get(Ablation, ablation_id)
    if a is None or a.run_id != run.id:
        raise NotFound(f"No ablation {ablation_id} in run {run.id}.")
    req = request_view(a.request)
    by_cond: dict[str, list[AblationToken]] = {}
    for t in session.scalars(select(AblationToken).where(AblationToken.ablation_id == a.id)
                             .order_by(AblationToken.condition, AblationToken.step)):
        by_cond.setdefault(t.condition, []).append(t)
    order = [c for c in CONDITION_ORDER if c in by_cond] + sorted(c for c in by_cond if c not in CONDITION_ORDER)
    return [AblationTranscriptLine(
        ablation_id=a.id, run_id=run.id, condition=c, prompt=req.prompt, features=req.features, mode=req.mode,
        value=req.value, positions=req.positions, status=a.status, token_ids=[t.token_id for t in by_cond[c]],
        tokens=[t.token_str for t in by_cond[c]], text="".join(t.token_str for t in by_cond[c]),
        logprobs=[t.logprob for t in by_cond[c]], kl=[t.kl for t in by_cond[c]], summary=a.summary,
    ) for c in order]


def experiment_transcript(session: Session, run_key: str | int, experiment_id: int) -> list[ExperimentTranscriptLine]:
    """One line per (prompt, condition) row."""
    run = get_run(session, run_key)
    e = session.get(Experiment, experiment_id)
    if e is None or e.run_id != run.id:
        raise NotFound(f"No experiment {experiment_id} in run {run.id}.")
    rows = session.scalars(select(ExperimentRow).where(ExperimentRow.experiment_id == e.id)
                           .order_by(ExperimentRow.prompt_idx, ExperimentRow.condition))
    return [ExperimentTranscriptLine(
        experiment_id=e.id, run_id=run.id, name=e.name, prompt_idx=r.prompt_idx, condition=r.condition,
        prompt=(r.meta or {}).get("prompt") if isinstance(r.meta, dict) else None, response_len=r.response_len,
        hesitations=r.hesitations, correct=r.correct, answer=r.answer, meta=r.meta,
    ) for r in rows]


def jsonl_lines(lines: list[Any]) -> Iterator[str]:
    return _jsonl(lines)
