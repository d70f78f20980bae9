"""Labels in the dashboard over the seeded world (SQLite and Postgres): the built-in labeler run on it, the run
page's category analysis, label search in the feature index, the feature page's labels per source."""

from __future__ import annotations

from bs4 import BeautifulSoup
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.schema import Feature, FeatureLabel
from app.labels.builtin import Label
from app.labels.run import label_run
from app.labels.store import write_labels


def _label(web) -> dict:
    return label_run(web.engine, web.world.run_id)


def test_builtin_labels_every_seeded_feature_and_the_run_page_shows_categories(web):
    out = _label(web)
    with Session(web.engine) as s:
        n = len(s.scalars(select(Feature.index).where(Feature.run_id == web.world.run_id)).all())
        assert out["labelled"] == n > 0
        assert all(f.label and f.category for f in s.scalars(select(Feature).where(Feature.run_id == web.world.run_id)))
    data = web.client.get(f"/api/runs/{web.world.run_id}").json()["categories"]
    assert data["source"] == "builtin" and data["sources"] == ["builtin"]
    assert data["n_labelled"] == n and data["n_alive"] + data["n_dead"] == n
    assert abs(sum(c["share"] for c in data["overall"]) - 1.0) < 1e-9
    assert data["paper_reasoning_share"] == 0.08 and "organism" in data["note"]
    fig = data["figure"]
    assert fig["layout"]["barmode"] == "stack" and [t["name"] for t in fig["data"]] == [c["category"] for c in data["overall"]]
    for layer in data["layers"]:
        if layer["n_alive"]:
            assert abs(sum(layer["shares"].values()) - 1.0) < 1e-9
    html = BeautifulSoup(web.client.get(web.run).text, "html.parser")
    section = html.select_one("[data-section=categories]")
    assert section.select_one("[data-categories-plot]") is not None
    assert "built-in rules" in section.select_one("[data-judge]").text
    assert "8%" in section.select_one("[data-reasoning-share]").text


def test_llm_source_is_shown_when_newest_and_builtin_on_request(web):
    _label(web)
    rid = web.world.run_id
    with Session(web.engine) as s, s.begin():
        keys = s.execute(select(Feature.layer, Feature.index).where(Feature.run_id == rid).limit(4)).all()
        write_labels(s, rid, "judge-model-1", [(ly, ix, Label("hedges before restating a result", "reasoning",
                                                              "output", 0.8)) for ly, ix in keys])
    data = web.client.get(f"/api/runs/{rid}").json()["categories"]
    assert data["source"] == "judge-model-1" and data["n_labelled"] == 4 and data["reasoning_share"] == 1.0
    assert set(data["sources"]) == {"builtin", "judge-model-1"}
    assert web.client.get(f"/api/runs/{rid}?labels=builtin").json()["categories"]["source"] == "builtin"
    assert web.client.get(f"/api/runs/{rid}?labels=nope").status_code == 200
    html = BeautifulSoup(web.client.get(f"{web.run}?labels=builtin").text, "html.parser")
    assert "built-in rules" in html.select_one("[data-judge]").text
    assert {a["data-labels-source"] for a in html.select("[data-labels-source]")} == {"builtin", "judge-model-1"}
    # the feature page lists both labelers' labels
    ly, ix = keys[0]
    page = web.client.get(f"/api/runs/{rid}/features/{ly}/{ix}").json()
    assert {lab["source"] for lab in page["labels"]} == {"builtin", "judge-model-1"}
    assert page["feature"]["label"] == "hedges before restating a result"
    html = BeautifulSoup(web.client.get(f"{web.run}/features/{ly}/{ix}").text, "html.parser")
    assert len(html.select("[data-labels] [data-label-source]")) == 2
    # label search: full text, word prefixes, all words required
    rows = web.client.get(f"/api/runs/{rid}/features?q=hedge+restat&limit=500").json()["rows"]
    assert {(r["layer"], r["index"]) for r in rows} == {tuple(k) for k in keys}
    assert web.client.get(f"/api/runs/{rid}/features?q=hedge+zebra").json()["rows"] == []
    html = BeautifulSoup(web.client.get(f"{web.run}/features?q=hedges").text, "html.parser")
    assert len(html.select("[data-table=features] tbody tr")) == 4
    assert html.select_one("[data-label-search]")["value"] == "hedges"


def test_hostile_label_queries_are_answered(web):
    _label(web)
    rid = web.world.run_id
    for q in ('"', "a AND (", "NEAR(x y)", "*", "x:* & !y", "'; drop table features;--", "é" * 200, " " * 150,
              "fires OR", "-wait", "^x"):
        resp = web.client.get(f"/api/runs/{rid}/features", params={"q": q})
        assert resp.status_code == 200, (q, resp.text)
    assert web.client.get(f"/api/runs/{rid}/features", params={"q": "x" * 201}).status_code in (400, 422)
    with Session(web.engine) as s:
        assert s.scalar(select(FeatureLabel.id).limit(1)) is not None


def test_ablation_page_names_its_features_labels(web):
    _label(web)
    page = web.client.get(f"/api/runs/{web.world.run_id}/ablations/{web.world.ablation_id}").json()
    feats = page["ablation"]["request"]["features"][:12]
    with Session(web.engine) as s:
        want = {f"{ly}/{ix}": s.get(Feature, (web.world.run_id, ly, ix)).label for ly, ix in feats
                if s.get(Feature, (web.world.run_id, ly, ix)) is not None}
    assert want and page["feature_labels"] == want
    html = BeautifulSoup(web.client.get(f"{web.run}/ablations/{web.world.ablation_id}").text, "html.parser")
    assert {a["title"] for a in html.select("a[data-feature-label]")} == set(want.values())
