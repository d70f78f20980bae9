"""The trace viewer's "why here?" links (a stored graph of the same ids, else a queue button), next/previous
firing marks for a shaded feature, and feature-page examples linking to their place in a trace."""

from __future__ import annotations

import json

from bs4 import BeautifulSoup
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.lens_request import token_key
from app.db.schema import Example, Graph, Job, LensResult, Prompt
from tests.seed import TOK


def _ids(*tokens: str) -> list[int]:
    return [TOK[t] for t in tokens]


def _trace(web, ids: list[int]) -> int:
    with Session(web.engine) as s, s.begin():
        row = Prompt(run_id=web.world.run_id, source="trace", text="…", token_ids=ids)
        s.add(row)
        s.flush()
        return row.id


def _seed_prompt_ids(web) -> list[int]:
    with Session(web.engine) as s:
        graph = s.get(Graph, web.world.graph_id)
        return [int(t) for t in graph.params["prompt_token_ids"]]


def _soup(web, url: str) -> BeautifulSoup:
    resp = web.client.get(url)
    assert resp.status_code == 200, resp.text[:300]
    return BeautifulSoup(resp.text, "html.parser")


def test_why_here_opens_the_stored_graph_or_queues_one(web):
    run = web.world.run_id
    prefix = _seed_prompt_ids(web)  # the seeded graph explains " Wait" right after these ids
    ids = prefix + _ids(" Wait", " so", " check", " again", " Hmm", " the", " sum")
    wait_pos, hmm_pos = len(prefix), len(prefix) + 4
    trace_id = _trace(web, ids)
    page = _soup(web, f"/runs/{run}/traces/{trace_id}")
    links = {int(a["data-why"]): a for a in page.select("[data-trace] a.why")}
    assert sorted(links) == [wait_pos, hmm_pos]  # one per hesitation token
    assert links[wait_pos]["href"] == f"/runs/{run}/graphs/{web.world.graph_id}"
    assert links[hmm_pos]["href"] == f"/runs/{run}/traces/{trace_id}/why/{hmm_pos}"
    api = web.client.get(f"/api/runs/{run}/traces/{trace_id}").json()
    assert api["tokens"][wait_pos]["graph_id"] == web.world.graph_id and api["tokens"][hmm_pos]["graph_id"] is None

    # the why page of a token with a graph redirects to it
    got = web.client.get(f"/runs/{run}/traces/{trace_id}/why/{wait_pos}", follow_redirects=False)
    assert got.status_code == 303 and got.headers["location"] == f"/runs/{run}/graphs/{web.world.graph_id}"

    # a token without one: a queue form; posting it queues an attribute job of the prefix → that token
    why = _soup(web, f"/runs/{run}/traces/{trace_id}/why/{hmm_pos}")
    form = why.select_one("form[data-why-queue]")
    assert form is not None and why.select_one("[data-why-token]").text.strip() == "Hmm"
    sent = web.client.post(form["action"], follow_redirects=False)
    assert sent.status_code == 303 and sent.headers["location"] == f"/runs/{run}/traces/{trace_id}/why/{hmm_pos}"
    with Session(web.engine) as s:
        job = s.scalars(select(Job).where(Job.kind == "attribute").order_by(Job.id.desc())).first()
        assert job.payload["token_ids"] == ids[:hmm_pos] and job.payload["target_token"] == TOK[" Hmm"]
        assert job.run_id == run
    queued = _soup(web, f"/runs/{run}/traces/{trace_id}/why/{hmm_pos}")
    assert queued.select_one("[data-why-queued]") is not None and queued.select_one("form[data-why-queue]") is None
    assert int(queued.select_one("[data-why-job]")["data-why-job"]) == job.id
    status = web.client.get(queued.select_one("[data-why-job]")["href"]).json()
    assert status["job_id"] == job.id and status["graph_url"] is None

    # once a graph of those ids is stored, the trace links straight to it
    with Session(web.engine) as s, s.begin():
        g = Graph(run_id=run, slug="why-hmm", prompt="…", target_token_id=TOK[" Hmm"], position=hmm_pos - 1,
                  params={"prompt_token_ids": ids[:hmm_pos]}, nodes=[], links=[])
        other = Graph(run_id=run, slug="other-ids", prompt="…", target_token_id=TOK[" Hmm"], position=hmm_pos - 1,
                      params={"prompt_token_ids": [TOK["1"]] * hmm_pos}, nodes=[], links=[])
        s.add_all([g, other])
        s.flush()
        gid = g.id
    page = _soup(web, f"/runs/{run}/traces/{trace_id}")
    assert page.select_one(f'a.why[data-why="{hmm_pos}"]')["href"] == f"/runs/{run}/graphs/{gid}"
    assert queued.select_one('meta[http-equiv="refresh"]') is not None  # the queued page reloads until then
    got = web.client.get(f"/runs/{run}/traces/{trace_id}/why/{hmm_pos}", follow_redirects=False)
    assert got.status_code == 303 and got.headers["location"] == f"/runs/{run}/graphs/{gid}"

    # an imported graph without prompt ids in params: matched through its stored prompt's ids
    so_pos = wait_pos + 1
    with Session(web.engine) as s, s.begin():
        prompt = Prompt(run_id=run, source="graph", text="…", token_ids=ids[:so_pos])
        s.add(prompt)
        s.flush()
        imported = Graph(run_id=run, slug="imported", prompt="…", prompt_id=prompt.id, target_token_id=TOK[" so"],
                         position=so_pos - 1, params={}, nodes=[], links=[])
        s.add(imported)
        s.flush()
        imported_id = imported.id
    got = web.client.get(f"/runs/{run}/traces/{trace_id}/why/{so_pos}", follow_redirects=False)
    assert got.status_code == 303 and got.headers["location"] == f"/runs/{run}/graphs/{imported_id}"

    # the JSON twin queues too
    made = web.client.post(f"/api/runs/{run}/traces/{trace_id}/why/{wait_pos + 2}")
    assert made.status_code == 202 and made.json()["status_url"].endswith(f"/graph-jobs/{made.json()['job_id']}")


def test_why_here_refuses_bad_ids(web):
    run = web.world.run_id
    ids = _ids("The", " Wait", " so")
    trace_id = _trace(web, ids)
    before = _jobs(web)
    for url, status in ((f"/runs/{run}/traces/{trace_id}/why/0", 404),  # nothing before it to explain it from
                        (f"/runs/{run}/traces/{trace_id}/why/3", 404),
                        (f"/runs/{run}/traces/{trace_id}/why/-1", 422),
                        (f"/runs/{run}/traces/{trace_id}/why/x", 422),
                        (f"/runs/{run}/traces/999999/why/1", 404),
                        (f"/runs/{run}/traces/0/why/1", 422),
                        (f"/runs/{web.world.empty_run_id}/traces/{trace_id}/why/1", 404),
                        (f"/runs/999999/traces/{trace_id}/why/1", 404)):
        assert web.client.get(url).status_code == status, url
        assert web.client.post(url, follow_redirects=False).status_code == status, url
        assert web.client.post("/api" + url).status_code == status, url
    assert _jobs(web) == before


def _jobs(web) -> int:
    with Session(web.engine) as s:
        return len(s.scalars(select(Job.id).where(Job.kind == "attribute")).all())


def test_firing_marks_follow_the_shaded_feature(web):
    run = web.world.run_id
    ids = _ids("The", " sum", " is", " Wait", ",", " so", " check", "7")
    acts = [0.0, 0.5, 0.0, 0.0, 2.0, 0.0, 0.0, 1.0]
    trace_id = _trace(web, ids)
    with Session(web.engine) as s, s.begin():
        s.add(LensResult(run_id=run, status="done", request={}, request_key="t", token_key=token_key(ids),
                         n_tokens=len(ids), result={"kl_hybrid": [0.1] * len(ids), "kl_adapted": [0.2] * len(ids),
                                                    "features": [[[], [], []] for _ in ids],
                                                    "watched": {"1/3": acts}}))
    page = _soup(web, f"/runs/{run}/traces/{trace_id}?feature=1/3")
    assert [int(t["data-pos"]) for t in page.select("[data-trace] .tok.fires")] == [1, 4, 7]
    minimap = json.loads(page.select_one("[data-minimap-data]").string)
    assert minimap["fires"] == [1, 4, 7] and minimap["hes"] == [3] and minimap["v"][4] == 1.0
    nav = page.select_one("[data-firing-nav]")
    assert nav.select_one("[data-n-firing]").text == "3" and nav.select_one("[data-next-firing]") is not None
    assert web.client.get(f"/api/runs/{run}/traces/{trace_id}?feature=1/3").json()["n_firing"] == 3
    plain = _soup(web, f"/runs/{run}/traces/{trace_id}")  # KL shading: no firing marks, no buttons
    assert not plain.select(".tok.fires") and plain.select_one("[data-firing-nav]") is None
    assert json.loads(plain.select_one("[data-minimap-data]").string)["fires"] == []


def test_feature_examples_link_to_their_place_in_the_trace(web):
    run = web.world.run_id
    ids = _ids("The", " sum", " is", " ", "7", ".", " Wait", " so", " check", " again", " the", " sum")
    trace_id = _trace(web, ids)
    with Session(web.engine) as s, s.begin():
        s.add(Example(run_id=run, layer=2, index=5, kind="top", rank=50, token_ids=ids[3:10],
                      acts=[0, 0, 0, 3.0, 0, 0, 0], focus=3, prompt_id=trace_id, max_act=3.0))
        s.add(Example(run_id=run, layer=2, index=5, kind="top", rank=51, token_ids=_ids("1", "2", "3"),
                      acts=[0, 1.0, 0], focus=1, prompt_id=trace_id, max_act=1.0))  # not a window of it
        s.add(Example(run_id=run, layer=2, index=5, kind="top", rank=52, token_ids=ids[9:12], acts=[0, 2.0, 0],
                      focus=1, prompt_id=trace_id, prompt_pos=1, max_act=2.0))  # a stored place is used as it is
    page = _soup(web, f"/runs/{run}/features/2/5")
    hrefs = [a["href"] for a in page.select("a[data-example-trace]")]
    assert f"/runs/{run}/traces/{trace_id}?feature=2/5#t6" in hrefs  # " Wait", where the example's focus is
    assert f"/runs/{run}/traces/{trace_id}?feature=2/5" in hrefs
    assert f"/runs/{run}/traces/{trace_id}?feature=2/5#t1" in hrefs  # the stored place: no read of the trace
    target = _soup(web, f"/runs/{run}/traces/{trace_id}?feature=2/5")
    assert "hes" in target.select_one("#t6")["class"]
    form = target.select_one("[data-trace-lens]")  # no lens yet: the one it runs watches the feature
    assert form.select_one("input[name=features]")["value"] == "2/5" and "watching 2/5" in form.text
    unknown = _soup(web, f"/runs/{run}/traces/{trace_id}?feature=2/99999")  # not a feature of the run: the lens
    assert unknown.select_one("[data-trace-lens] input[name=features]") is None  # runs without watching it


def test_trace_strip_escapes_stored_text(web):
    run = web.world.run_id
    ids = _ids("<script>", '"', "alert(1)", '"', "</script>", " Wait", ",")
    with Session(web.engine) as s, s.begin():
        row = Prompt(run_id=run, source="trace", text="…", token_ids=ids,
                     regions=[[0, 3, '"><script>alert(2)</script>'], [3, 7, "thinking"]])
        s.add(row)
        s.flush()
        trace_id = row.id
    html = web.client.get(f"/runs/{run}/traces/{trace_id}").text
    assert "<script>alert" not in html and "alert(2)</script>" not in html
    page = BeautifulSoup(html, "html.parser")
    toks = page.select("[data-trace] .tok")
    assert [t.text for t in toks[:3]] == ["<script>", '"', "alert(1)"] and "r-thinking" in toks[4]["class"]
    assert [int(a["data-why"]) for a in page.select("[data-trace] a.why")] == [5]


def test_trace_list_puts_collected_sequences_after_the_rest(web):
    """collect stores hundreds of sequences as traces: the list shows the study's and requested ones first."""
    run = web.world.run_id
    with Session(web.engine) as s, s.begin():
        mine = Prompt(run_id=run, source="trace", text="mine", token_ids=_ids("The", " sum"))
        s.add(mine)
        s.flush()
        mine_id = mine.id
        s.add_all([Prompt(run_id=run, source="collection", text=f"c{i}", token_ids=_ids("7")) for i in range(3)])
    listed = web.client.get(f"/api/runs/{run}/traces").json()["traces"]
    sources = [t["source"] for t in listed]
    first = sources.index("collection")  # newer than every other trace, listed after them all
    assert first > 0 and all(src == "collection" for src in sources[first:])
    other = [t["id"] for t in listed[:first]]
    assert mine_id in other and other == sorted(other, reverse=True)
