"""The diff lens pages over the seeded world: a request through the form and the API, a real worker runs it, the
page and its JSON twin show the result; bad input is a 4xx and stores nothing."""

from __future__ import annotations

import json

import pytest
from bs4 import BeautifulSoup
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.schema import Feature, LensResult, Prompt
from app.settings import Settings
from tests.helpers import randomize_adapters, tiny_qwen2
from tests.seed import N_FEATURES, N_LAYERS, TOK, VOCAB
from training.adapter import build_adapter_model
from training.config import AdapterConfig
from worker.ablation.job import encode, format_free_text, use_model_loader
from worker.lens.diff import diff_lens
from worker.loop import run_worker

IDS = [TOK[t] for t in ("<｜User｜>", "3", " +", "4", "<｜Assistant｜>", "<think>", "\n", "The", " sum", " is", " Wait")]


@pytest.fixture(scope="module")
def model():
    vocab = len(VOCAB) + 2
    base = tiny_qwen2(0, layers=N_LAYERS, vocab=vocab)
    target = tiny_qwen2(1, layers=N_LAYERS, vocab=vocab)
    return randomize_adapters(build_adapter_model(base, target, AdapterConfig(n_features=N_FEATURES)), 0).eval()


@pytest.fixture
def tokenizer(web):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(web.world.tokenizer_dir / "tokenizer.json"),
                                   bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>")


def _work(web, tmp_path, model, tokenizer) -> int:
    settings = Settings(database_url=str(web.engine.url.render_as_string(hide_password=False)), data_dir=tmp_path)
    with use_model_loader(lambda ctx, run_id: (model, tokenizer)):
        return run_worker(settings, wait=False, kinds=["lens"], handler_modules=["worker.lens.job"], migrate=False)


def _count(web) -> int:
    with Session(web.engine) as s:
        return s.scalar(select(func.count()).select_from(LensResult))


def test_lens_from_the_form_to_the_page(web, tmp_path, model, tokenizer):
    run = web.world.run_id
    form = web.client.get(f"/runs/{run}/lens")
    assert form.status_code == 200 and "data-lens-form" in form.text
    assert f'href="/runs/{run}/lens"' in web.client.get(f"/runs/{run}").text  # linked from the run's top bar
    made = web.client.post(f"/api/runs/{run}/lens", json={"token_ids": " ".join(map(str, IDS)), "features": "1:3"})
    assert made.status_code == 201
    lens_id = made.json()["id"]
    waiting = web.client.get(made.json()["url"])
    assert waiting.status_code == 200 and "data-waiting" in waiting.text and 'hx-trigger="every 1s"' in waiting.text

    assert _work(web, tmp_path, model, tokenizer) == 1
    api = web.client.get(f"/api/runs/{run}/lens/{lens_id}").json()
    direct = diff_lens(model, IDS, watch=[(1, 3)])
    assert api["done"] and api["lens"]["status"] == "done"
    assert [t["id"] for t in api["tokens"]] == IDS and api["tokens"][-1]["hesitation"]
    assert [p["kl_hybrid"] for p in api["positions"]] == pytest.approx(direct.kl_hybrid)
    assert [[f["layer"], f["index"]] for f in api["positions"][4]["features"]] == \
        [[a, b] for a, b, *_ in direct.features_at(4)]
    assert [t["id"] for t in api["positions"][4]["top"]["adapted"]] == [t for t, _ in direct.top_at("adapted", 4)]
    assert api["watched"]["1/3"] == pytest.approx(direct.watched["1/3"])

    page = web.client.get(f"/runs/{run}/lens/{lens_id}?pos=4&kl=adapted&sort=effect")
    assert page.status_code == 200
    soup = BeautifulSoup(page.text, "html.parser")
    strip = soup.select("[data-strip] .tok")
    assert len(strip) == len(IDS) and soup.select_one("[data-strip]")["data-kl"] == "adapted"
    assert "sel" in strip[4]["class"] and soup.select_one("#lens-panel")["data-pos"] == "4"
    listed = [r["data-feature"] for r in soup.select("[data-position-features] tr[data-feature]")]
    assert listed == [f"{a}/{b}" for a, b, *_ in direct.features_at(4)]
    links = [a["href"] for a in soup.select("[data-position-features] a.fid")]
    assert links[0] == f"/runs/{run}/features/{direct.features_at(4)[0][0]}/{direct.features_at(4)[0][1]}"
    effects = [abs(float(r.select("td")[4].text)) for r in soup.select("[data-feature-table] tbody tr")]
    assert effects == sorted(effects, reverse=True) and effects  # sorted by |effect|
    panel = web.client.get(f"/runs/{run}/lens/{lens_id}/pos/2")
    assert panel.status_code == 200 and 'data-pos="2"' in panel.text and "<html" not in panel.text

    # the same ids again: the stored lens, no new row
    again = web.client.post(f"/runs/{run}/lens", data={"token_ids": " ".join(map(str, IDS)), "features": "1:3"},
                            follow_redirects=False)
    assert again.status_code == 303 and again.headers["location"] == f"/runs/{run}/lens/{lens_id}"
    assert _count(web) == 1
    # free text: formatted by the worker with the run's chat format
    text = web.client.post(f"/api/runs/{run}/lens", json={"prompt": "3 + 4"}).json()
    assert _work(web, tmp_path, model, tokenizer) == 1
    got = web.client.get(f"/api/runs/{run}/lens/{text['id']}").json()
    assert got["lens"]["status"] == "done", got["lens"]["error"]
    formatted = encode(tokenizer, format_free_text(tokenizer, "3 + 4", config={}))
    assert [t["id"] for t in got["tokens"]] == formatted and TOK["<｜User｜>"] in formatted


@pytest.mark.parametrize("body", [
    {"prompt": ""}, {"prompt": "   "}, {"token_ids": "1 x 3"}, {"token_ids": "-4"}, {"prompt": "a", "features": "1-3"},
    {"prompt": "a", "features": "9:0"}, {"prompt": "a\x00"}, {"prompt": "a", "raw": "maybe"},
])
def test_bad_lens_requests_are_4xx(web, body):
    run = web.world.run_id
    api = web.client.post(f"/api/runs/{run}/lens", json=body)
    assert 400 <= api.status_code < 500, api.text
    form = web.client.post(f"/runs/{run}/lens", data=body)
    assert 400 <= form.status_code < 500
    assert _count(web) == 0


def test_missing_lens_and_positions_are_404_or_422(web, tmp_path, model, tokenizer):
    run = web.world.run_id
    assert web.client.get(f"/runs/{run}/lens/999").status_code == 404
    assert web.client.get(f"/api/runs/{run}/lens/999").status_code == 404
    assert web.client.get(f"/api/runs/{run}/lens/0").status_code == 422
    assert web.client.post("/api/runs/999/lens", json={"prompt": "a"}).status_code == 404
    lens_id = web.client.post(f"/api/runs/{run}/lens", json={"token_ids": "7 8 9"}).json()["id"]
    assert web.client.get(f"/runs/{web.world.empty_run_id}/lens/{lens_id}").status_code == 404  # another run's
    _work(web, tmp_path, model, tokenizer)
    assert web.client.get(f"/runs/{run}/lens/{lens_id}?pos=3").status_code == 422
    assert web.client.get(f"/runs/{run}/lens/{lens_id}?kl=nope").status_code == 422
    assert web.client.get(f"/runs/{run}/lens/{lens_id}/pos/2").status_code == 200


def test_test_your_text_on_a_feature_page(web, tmp_path, model, tokenizer):
    run = web.world.run_id
    sent = web.client.post(f"/runs/{run}/lens", data={"token_ids": " ".join(map(str, IDS)), "features": "1:3",
                                                       "back": "feature"}, follow_redirects=False)
    assert sent.status_code == 303
    location = sent.headers["location"]
    assert location.startswith(f"/runs/{run}/features/1/3?lens=") and location.endswith("#test-text")
    waiting = web.client.get(location.split("#")[0])
    assert "data-waiting" in waiting.text and 'hx-select="#feature-side"' in waiting.text
    _work(web, tmp_path, model, tokenizer)
    page = web.client.get(location.split("#")[0])
    soup = BeautifulSoup(page.text, "html.parser")
    acts = diff_lens(model, IDS, watch=[(1, 3)]).watched["1/3"]
    shown = [float(t["data-act"]) for t in soup.select("[data-text-tokens] .tok")]
    assert shown == pytest.approx(acts, rel=1e-2, abs=1e-3) and max(acts) > 0
    fig = json.loads(soup.select_one("[data-fig=fig-hist]")["data-fig-json"])
    marker = fig["data"][-1]
    assert marker["type"] == "scatter" and marker["x"] == pytest.approx([max(acts)] * 2)
    api = web.client.get(f"/api/runs/{run}/features/1/3?lens={location.split('lens=')[1].split('#')[0]}").json()
    assert api["text_test"]["max_act"] == pytest.approx(max(acts)) and api["text_test"]["source"] == "watched"
    assert web.client.get(f"/runs/{run}/features/1/3?lens=999").status_code == 404
    assert web.client.get(f"/runs/{run}/features/1/3?lens=abc").status_code == 422


def test_features_ranked_by_hesitation_lens(web):
    run = web.world.run_id
    with Session(web.engine) as s:
        want = [(f.layer, f.index) for f in s.scalars(
            select(Feature).where(Feature.run_id == run, Feature.hesitation_lens.is_not(None))
            .order_by(Feature.hesitation_lens.desc(), Feature.layer.desc(), Feature.index.desc()))]
    assert want[0] == (2, 7)  # the seeded " Wait" promoter
    got, after = [], None
    while True:  # every page of the keyset, in order, each feature with a hesitation lens once
        q = f"/api/runs/{run}/features?sort=hesitation&limit=7" + (f"&after={after}" if after else "")
        page = web.client.get(q).json()
        got += [(r["layer"], r["index"]) for r in page["rows"]]
        values = [r["hesitation_lens"] for r in page["rows"]]
        assert values == sorted(values, reverse=True)
        after = page["next"]
        if not after:
            break
    assert got == want and (0, 0) not in got  # no hesitation lens, not listed
    html = BeautifulSoup(web.client.get(f"/runs/{run}/features?sort=hesitation").text, "html.parser")
    assert html.select_one("[data-sort-hesitation]") is not None
    assert [c.text for c in html.select("[data-hesitation-lens]")][0] == "4.2"
    run_page = BeautifulSoup(web.client.get(f"/runs/{run}").text, "html.parser")
    listed = [tr["data-feature"] for tr in run_page.select("[data-promotes-hesitation] tr")]
    with Session(web.engine) as s:
        firing = {(f.layer, f.index) for f in s.scalars(select(Feature).where(Feature.run_id == run,
                                                                              Feature.frequency > 0))}
    assert listed == [f"{a}/{b}" for a, b in want if (a, b) in firing][:10] and len(listed) == 10
    assert web.client.get(f"/api/runs/{run}").json()["promotes_hesitation"][0]["layer"] == 2
    csv = web.client.get(f"/api/runs/{run}/features.csv?sort=hesitation").text.splitlines()
    assert csv[0].endswith("hesitation_lens") and csv[1].startswith("2,7,") and csv[1].endswith("4.2")


def test_trace_viewer_outlines_hesitations_and_shades_by_the_lens(web, tmp_path, model, tokenizer):
    run = web.world.run_id
    ids = IDS + [TOK[t] for t in (",", " let", " me", " check", ".", "7")] * 20  # a long trace, one hesitation
    with Session(web.engine) as s, s.begin():
        trace = Prompt(run_id=run, source="trace", text="3 + 4 …", token_ids=ids, regions=[[0, 5, "prompt"],
                                                                                           [5, len(ids), "thinking"]])
        s.add(trace)
        s.flush()
        trace_id = trace.id
    assert f"/runs/{run}/traces/{trace_id}" in web.client.get(f"/runs/{run}/traces").text
    page = BeautifulSoup(web.client.get(f"/runs/{run}/traces/{trace_id}").text, "html.parser")
    toks = page.select("[data-trace] .tok")
    minimap = json.loads(page.select_one("[data-minimap-data]").string)
    assert len(toks) == len(ids) and minimap["n"] == len(ids) and minimap["hes"] == [len(IDS) - 1]
    assert [int(t["data-pos"]) for t in toks if "outlined" in t["class"]] == [len(IDS) - 1]  # " Wait"
    assert "r-thinking" in toks[6]["class"] and "style" not in toks[6].attrs  # no lens yet: no shading
    form = page.select_one("[data-trace-lens]")
    data = {i["name"]: i["value"] for i in form.select("input[type=hidden]")}
    sent = web.client.post(form["action"], data=data, follow_redirects=False)
    assert sent.status_code == 303 and sent.headers["location"] == f"/runs/{run}/traces/{trace_id}"
    _work(web, tmp_path, model, tokenizer)
    direct = diff_lens(model, ids)
    api = web.client.get(f"/api/runs/{run}/traces/{trace_id}?shade=kl-adapted").json()
    assert api["lens_id"] is not None and api["n_hesitations"] == 1
    assert [t["value"] for t in api["tokens"]] == pytest.approx(direct.kl_adapted)
    ln, ix = direct.features_at(0)[0][:2]
    feat = web.client.get(f"/api/runs/{run}/traces/{trace_id}?feature={ln}/{ix}").json()
    assert feat["shade"] == "feature" and feat["feature_source"] == "lens"
    assert feat["tokens"][0]["value"] == pytest.approx(direct.features_at(0)[0][2])
    shaded = BeautifulSoup(web.client.get(f"/runs/{run}/traces/{trace_id}").text, "html.parser")
    assert all("--v:" in t["style"] for t in shaded.select("[data-trace] .tok"))
    shades = json.loads(shaded.select_one("[data-minimap-data]").string)["v"]
    assert len(shades) == len(ids) and all(v is not None for v in shades) and max(shades) == 1.0
    # shading by a feature from the lens' strongest per token: one click watches it at every token, and the
    # redirect comes back to the trace shaded by it (the feature page's "in its trace" link lands here so)
    watch = BeautifulSoup(web.client.get(f"/runs/{run}/traces/{trace_id}?feature={ln}/{ix}").text, "html.parser")
    form = watch.select_one("[data-section=shade] [data-trace-lens]")
    data = {i["name"]: i["value"] for i in form.select("input[type=hidden]")}
    assert data["features"] == f"{ln}/{ix}" and f"Watch {ln}/{ix}" in form.text
    sent = web.client.post(form["action"], data=data, follow_redirects=False)
    assert sent.status_code == 303 and sent.headers["location"] == f"/runs/{run}/traces/{trace_id}?feature={ln}/{ix}"
    _work(web, tmp_path, model, tokenizer)
    feat = web.client.get(f"/api/runs/{run}/traces/{trace_id}?feature={ln}/{ix}").json()
    assert feat["feature_source"] == "watched"
    assert [t["value"] for t in feat["tokens"]] == pytest.approx(diff_lens(model, ids, watch=[(ln, ix)])
                                                                  .watched[f"{ln}/{ix}"], abs=1e-6)
    for bad in ("?feature=x", "?shade=feature", "?shade=sideways"):
        assert web.client.get(f"/runs/{run}/traces/{trace_id}{bad}").status_code == 422
    assert web.client.get(f"/runs/{run}/traces/999999").status_code == 404
    assert web.client.get(f"/runs/{web.world.empty_run_id}/traces/{trace_id}").status_code == 404
