"""Markup checks on the seeded world: links, escaping, empty states, live partials."""

from __future__ import annotations

import re

from bs4 import BeautifulSoup

from tests.seed import N_FEATURES, N_LAYERS


def soup(resp) -> BeautifulSoup:
    assert resp.status_code == 200, resp.text[:500]
    return BeautifulSoup(resp.text, "html.parser")


def test_index_redirects_to_the_latest_run(web):
    resp = web.client.get("/", follow_redirects=False)
    assert resp.status_code == 307
    assert resp.headers["location"] == f"/runs/{web.world.run_id}"


def test_index_without_runs_says_what_to_run(empty_web):
    page = soup(empty_web.get("/"))
    assert "adapterlens up" in page.select_one("[data-empty] pre.cmd").text


def test_run_page_links_into_everything(web):
    page = soup(web.client.get(web.run))
    rows = {tr.th.text: [td.text for td in tr.find_all("td")] for tr in page.select("[data-table=models] tbody tr")}
    assert list(rows) == ["base", "hybrid", "adapted", "target"]
    assert rows["adapted"][4] == "78.0%"  # accuracy
    hrefs = {a["href"] for a in page.find_all("a", href=True)}
    w = web.world
    assert {f"{web.run}/features", f"{web.run}/graphs/{w.graph_id}", f"{web.run}/ablations/{w.ablation_id}",
            f"{web.run}/experiments/{w.experiment_id}"} <= hrefs
    assert page.select_one("[data-curves]") is not None
    graph_item = page.select_one(f"[data-section=graphs] a[href='{web.run}/graphs/{w.graph_id}']").parent
    assert re.search(r"\b\d+ features?\b", graph_item.text), graph_item.text  # what each graph kept


def test_empty_run_shows_empty_states_with_commands(web):
    page = soup(web.client.get(f"/runs/{web.world.empty_run_id}"))
    texts = " ".join(e.text for e in page.select("[data-empty]"))
    assert "Not evaluated yet" in texts and "No graphs yet" in texts
    assert "adapterlens evaluate --run empty-run" in texts
    page = soup(web.client.get(f"/runs/{web.world.empty_run_id}/features"))
    assert "adapterlens collect --run empty-run" in page.select_one("[data-empty]").text


def test_feature_tokens_are_escaped_text(web):
    layer, index = web.world.script_feature
    resp = web.client.get(f"{web.run}/features/{layer}/{index}")
    assert "<script>alert" not in resp.text and '<script>"' not in resp.text
    assert "&lt;script&gt;" in resp.text
    page = soup(resp)
    example = page.select_one("[data-examples=top] .example")
    assert example.select_one(".tok.focus").text == "<script>"  # parsed back: the browser shows the text
    texts = [t.text for t in example.select(".tok")]
    assert texts[texts.index("<script>") + 1] == '"'
    assert example.find("script") is None
    assert page.select_one("[data-ablate] textarea[name=features]").text == f"{layer}:{index}"


def test_feature_page_sections(web):
    page = soup(web.client.get(f"{web.run}/features/2/7"))
    assert len(page.select("[data-examples=top] .example")) == 5
    assert len(page.select("[data-examples=random] .example")) == 3
    assert page.select_one("[data-section=logit-lens] .tokchip").text == " Wait"
    graph_links = [a["href"] for a in page.select("[data-section=graphs] a")]
    assert graph_links == [f"{web.run}/graphs/{web.world.graph_id}"]
    assert "output" in page.select_one(".feature-hero h1").text  # its role in the hesitation set
    assert len(page.select("[data-section=neighbours] tr")) == 5


def test_features_index_filters_live_in_the_url(web):
    page = soup(web.client.get(f"{web.run}/features?layer=1&in_set=true"))
    assert [tr["data-feature"] for tr in page.select("[data-table=features] tbody tr")] == ["1/3", "1/5"]
    assert page.select_one("select[name=layer] option[selected]")["value"] == "1"
    assert page.select_one("input[name=in_set]").has_attr("checked")
    page = soup(web.client.get(f"{web.run}/features?limit=20"))
    assert len(page.select("[data-table=features] tbody tr")) == 20
    next_href = page.select_one("a[data-next]")["href"]
    assert "after=0%3A19" in next_href or "after=1%3A3" in next_href
    page = soup(web.client.get(next_href))
    assert page.select_one("[data-table=features] tbody tr")["data-feature"] == "1/4"
    page = soup(web.client.get(f"{web.run}/features?freq_min=0.9"))
    assert "No feature matches" in page.select_one("[data-empty]").text


def test_graph_page_prompt_lists_and_ablate_button(web):
    page = soup(web.client.get(f"{web.run}/graphs/{web.world.graph_id}"))
    target = page.select_one(".prompt-toks .tok.target")
    assert target["data-pos"] == "14"
    assert page.select_one(".prompt-toks .tok.next").text == " Wait"
    outputs = [a.text for a in page.select("[data-flist=output] a.fid")]
    assert outputs == ["L1/3", "L2/7", "L2/9"]
    form = page.select_one("form[data-ablate-these]")
    assert form.select_one("input[name=features]")["value"].split() == ["1:3", "2:7", "2:9", "0:2", "1:5"]
    assert form.select_one("input[name=prompt_tokens]")["value"] == "15"
    assert page.select_one("a[data-download]")["href"].endswith("/circuit-tracer.json")
    # counts and scores before any node loads; no inline script but the JSON config
    assert "30 nodes" in page.select_one("[data-counts]").text
    assert page.select_one("[data-score=replacement]").text == "0.61"
    assert "error nodes" in page.select_one("[data-non-feature]").text.lower()
    scripts = page.select("script")
    assert all(s.get("src") or s.get("type") == "application/json" for s in scripts)
    assert not any(attr.startswith("on") for tag in page.find_all(True) for attr in tag.attrs)


def test_ablation_page_marks_divergence_and_hesitations(web):
    page = soup(web.client.get(f"{web.run}/ablations/{web.world.ablation_id}"))
    live = page.select_one("#ablation-live")
    assert live["data-done"] == "true" and not live.has_attr("hx-trigger")  # finished: polling stops
    unablated = page.select("[data-condition=unablated] .tok")
    assert [t.text for t in unablated if "hes" in t["class"]] == [" Wait"]
    diverged = [t["data-step"] for t in page.select("[data-condition=ablated] .tok.div")]
    assert diverged[0] == "3" and len(diverged) == 9
    assert len(page.select("[data-condition=ablated] .kl-strip span")) == 12


def test_jobs_page_shows_progress_errors_and_buttons(web):
    page = soup(web.client.get("/jobs"))
    running = page.select_one(f"tr[data-job='{web.world.job_ids['collect']}']")
    assert "25%" in running.text and running.select_one("[data-cancel]")
    failed = page.select_one(f"tr[data-job='{web.world.job_ids['attribute']}']")
    assert failed.select_one("[data-retry]") is not None
    assert page.select_one(".error-line").text == 'RuntimeError: CUDA out of memory <oops> & "quoted"'
    assert page.select_one("#jobs-live").has_attr("hx-trigger")  # something runs: the page refreshes itself


def test_every_feature_page_renders(web):
    for layer in range(N_LAYERS):
        for index in range(0, N_FEATURES, 5):
            assert web.client.get(f"{web.run}/features/{layer}/{index}").status_code == 200


def test_experiment_rows_show_their_prompt_text(web):
    soup = BeautifulSoup(web.client.get(f"{web.run}/experiments/{web.world.experiment_id}").text, "html.parser")
    heads = [th.get_text() for th in soup.select('table[data-table="prompts"] tbody th')]
    assert heads[0] == "0" and heads[1:3] == ["1 + 7 = ?", "2 + 7 = ?"]  # index where no text was kept


def test_feature_index_filters_swap_only_the_results_and_csv_has_every_match(web, monkeypatch):
    import csv
    import io

    import app.web.data.features as features

    url = f"{web.run}/features?layer=1"
    full = web.client.get(url)
    part = web.client.get(url, headers={"HX-Request": "true", "HX-Target": "feature-results"})
    assert "<form" in full.text and "<form" not in part.text
    assert part.text.lstrip().startswith('<div id="feature-results"')
    monkeypatch.setattr(features, "CSV_PAGE", 5)  # several keyset pages in one export
    from app.web.routes import features as route
    monkeypatch.setattr(route, "CSV_PAGE", 5)
    resp = web.client.get(f"/api{web.run}/features.csv?layer=1&freq_min=0")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(resp.text)))
    api = web.client.get(f"/api{web.run}/features?layer=1&freq_min=0&limit=500").json()["rows"]
    assert [(int(r["layer"]), int(r["index"])) for r in rows] == [(r["layer"], r["index"]) for r in api]
    assert len(rows) == 16
    promoted = list(csv.DictReader(io.StringIO(web.client.get(f"/api{web.run}/features.csv?promotes=Wait").text)))
    assert promoted[0]["layer"] == "2" and promoted[0]["index"] == "7" and float(promoted[0]["strength"]) == 4.2


def test_run_page_leads_with_the_study_and_the_set_has_a_page(web):
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(web.client.get(web.run).text, "html.parser")
    study = soup.select_one("[data-section=study]")
    assert study is not None and "5 features" in study.select_one("[data-finding]").text
    assert study.select_one("[data-removal]").text.strip() == "100.0%"
    assert ") remove" in " ".join(study.select_one("[data-finding]").text.split())  # "(0.4% of 2,048) remove"
    assert study.select_one("[data-accuracy]").text.strip() == "95.0% → 90.0%"
    assert "5 random active features: 0.0% removed" in study.text
    assert [r.text.strip() for r in study.select("[data-top-features] h4")] == ["output features", "template features"]
    form = study.select_one("form[data-ablate-set]")
    fields = {i["name"]: i["value"] for i in form.select("input[type=hidden]")}
    assert fields["feature_set"] == "hesitation" and fields["source"] == "token_ids"
    assert len(fields["token_ids"].split()) == 7  # the trigger problem up to where the model starts answering
    resp = web.client.post(f"{web.run}/ablations", data=fields, follow_redirects=False)
    assert resp.status_code == 303
    ablation = web.client.get(f"/api{resp.headers['location']}").json()["ablation"]["request"]
    assert sorted(map(tuple, ablation["features"])) == [(0, 2), (1, 3), (1, 5), (2, 7), (2, 9)]
    from app.web.data.common import model_labels

    assert model_labels("organism:organism:s0", "organism:organism:s0") == (
        "organism base (organism, seed 0)", "organism reasoning target (organism, seed 0)")
    assert model_labels("Qwen/Qwen2.5-Math-7B", "/m/r1") == ("Qwen/Qwen2.5-Math-7B", "/m/r1")
    set_url = study.select_one("a[data-set-link]")["href"]
    set_page = BeautifulSoup(web.client.get(set_url).text, "html.parser")
    rows = set_page.select("[data-table=members] tbody tr")
    assert len(rows) == 5 and set_page.select_one("[data-finding]") is not None
    data = web.client.get(f"/api{set_url}").json()
    assert data["finding"]["families"][0] == {"family": "add", "adapted": data["finding"]["families"][0]["adapted"],
                                              "ablated": data["finding"]["families"][0]["ablated"]}
    assert data["finding"]["families"][0]["ablated"]["hesitation_rate"] == 0.0
    assert web.client.get(f"{web.run}/sets/99999").status_code == 404
    exp = web.client.get(f"{web.run}/experiments?feature_set=hesitation").text
    assert '<option selected>hesitation</option>' in exp
