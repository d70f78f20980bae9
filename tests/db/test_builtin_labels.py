"""The built-in labeler's rules on features whose evidence is known (tests/label_world.py), end to end through
``label_run`` and the store: each gets the label and the paper's category its evidence calls for."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.schema import Feature, FeatureLabel
from app.db.session import make_engine
from app.labels.builtin import token_class
from app.labels.run import label_run
from tests.label_world import rules_world

EXPECTED = {
    0: ("reasoning", "input_simple", "fires on ' Wait' after a stated answer in thinking"),
    1: ("reasoning", "input_abstract", "fires just before ' Wait' after a stated answer in thinking"),
    2: ("reasoning", "output", "promotes ' Wait', ' Hmm' in thinking"),
    3: ("domain", "math", "fires on digits in thinking"),
    4: ("language", "formatting", "fires on '\\n\\n' in the prompt"),
    5: ("uninterpretable", "dead", "dead: never fired on the collection corpus"),
}


def test_rules_label_known_features(sqlite_db_url: str, tmp_path: Path) -> None:
    engine = make_engine(sqlite_db_url)
    try:
        rid = rules_world(engine, tmp_path / "tok")
        out = label_run(engine, rid)
        assert out["labelled"] == 6 and out["source"] == "builtin"
        with Session(engine) as s:
            got = {r.index: r for r in s.scalars(select(FeatureLabel).where(FeatureLabel.run_id == rid))}
            for index, (cat, sub, label) in EXPECTED.items():
                r = got[index]
                assert (r.category, r.subcategory, r.label) == (cat, sub, label), index
                assert s.get(Feature, (rid, 0, index)).label == label
            assert got[0].score == 1.0 and got[5].score == 0.0
        again = label_run(engine, rid)  # deterministic, and replaces its own rows
        with Session(engine) as s:
            assert again["labelled"] == 6
            assert {r.index: r.label for r in s.scalars(select(FeatureLabel))} == {i: e[2] for i, e in EXPECTED.items()}
    finally:
        engine.dispose()


def test_token_classes() -> None:
    assert token_class(" Wait", "text") == "hesitation"
    assert token_class("Waiting", "text") == "word"
    assert token_class(" Hmm", "text", ("Wait",)) == "reasoning"  # a reasoning marker though not a hesitation word
    assert token_class(" 42", "text") == "math" and token_class(" +", "text") == "math"
    assert token_class("\n\n", "text") == "formatting" and token_class("<think>", "special") == "formatting"
    assert token_class(" therefore", "text") == "connective"
    assert token_class(" def", "text") == "code" and token_class(" energy", "text") == "science"
