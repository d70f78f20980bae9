"""Checks of a finished demo run's labels, shared by the tiny organism's test and the slow tier's."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.db.schema import Feature, FeatureLabel, FeatureSetMember, Run
from app.labels import CATEGORIES, SUBCATEGORIES
from app.web.data.common import hesitation_set, hesitation_words


def every_feature_has_a_builtin_label(engine: Engine, run_id: int) -> dict[str, int]:
    """Every collected feature has one built-in label, with a category of the paper's; returns counts per category."""
    with Session(engine) as s:
        n = s.scalar(select(func.count()).select_from(Feature).where(Feature.run_id == run_id))
        rows = s.execute(select(FeatureLabel.layer, FeatureLabel.index, FeatureLabel.category, FeatureLabel.subcategory,
                                FeatureLabel.label)
                         .where(FeatureLabel.run_id == run_id, FeatureLabel.source == "builtin")).all()
        assert n and len(rows) == n == len({(r.layer, r.index) for r in rows})
        unlabelled = s.scalar(select(func.count()).select_from(Feature)
                              .where(Feature.run_id == run_id, Feature.label.is_(None)))
        assert unlabelled == 0
    counts: dict[str, int] = {}
    for r in rows:
        assert r.label and r.category in CATEGORIES and r.subcategory in SUBCATEGORIES[r.category]
        counts[r.category] = counts.get(r.category, 0) + 1
    return counts


def study_output_features_promote_hesitation(engine: Engine, run_id: int) -> list[str]:
    """The hesitation study's output features (its roles are not what the labeler reads) are labelled
    reasoning / output, "promotes" a hesitation word of the run. Returns their labels (none: the study found none)."""
    with Session(engine) as s:
        hset = hesitation_set(s, run_id)
        assert hset is not None, "the demo run has no hesitation feature set"
        words = hesitation_words(s.get(Run, run_id))
        members = s.execute(select(FeatureSetMember.layer, FeatureSetMember.index)
                            .where(FeatureSetMember.set_id == hset.id, FeatureSetMember.role == "output")).all()
        # and the output features among those that recur in the study's graphs (the set may pick none of them)
        recurring = [(f["layer"], f["index"]) for f in ((hset.summary or {}).get("features") or {}).get("top", [])
                     if f.get("role") == "output"]
        outputs = sorted({(r[0], r[1]) for r in members} | set(recurring))
        labels = []
        for layer, index in outputs:
            lab = s.scalars(select(FeatureLabel).where(FeatureLabel.run_id == run_id, FeatureLabel.layer == layer,
                                                       FeatureLabel.index == index, FeatureLabel.source == "builtin")).one()
            assert (lab.category, lab.subcategory) == ("reasoning", "output"), (layer, index, lab.label)
            assert lab.label.startswith("promotes '") and any(w in lab.label for w in words), lab.label
            labels.append(lab.label)
    return labels
