"""POSTs: the ablate form (one row + one high-priority job, or a clear 4xx and nothing stored), retry, cancel."""

from __future__ import annotations

import html

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.schema import Ablation, Graph, Job, JobStatus, Run


def counts(web) -> tuple[int, int]:
    with Session(web.engine) as s:
        return s.scalar(select(func.count()).select_from(Ablation)), s.scalar(select(func.count()).select_from(Job))


def test_ablate_form_creates_ablation_and_job(web):
    before = counts(web)
    resp = web.client.post(f"{web.run}/ablations", data={
        "features": "1:3, 2/7\n0:2", "prompt": "3 + 4", "mode": "scale", "value": "2.5", "positions": "generated",
        "max_new_tokens": "16", "compare": ["target"]}, follow_redirects=False)
    assert resp.status_code == 303, resp.text[:300]
    assert counts(web) == (before[0] + 1, before[1] + 1)
    ablation_id = int(resp.headers["location"].rsplit("/", 1)[1])
    with Session(web.engine) as s:
        a = s.get(Ablation, ablation_id)
        job = s.get(Job, a.job_id)
        assert (job.kind, job.priority, job.status, job.payload) == ("ablate", 100, JobStatus.TODO, {"ablation_id": a.id})
        sel = a.request["selection"]
        assert sel["features"] == [[0, 2], [1, 3], [2, 7]] and sel["mode"] == "scale" and sel["value"] == 2.5
        assert a.request["request"]["compare"] == ["target"]
    page = web.client.get(resp.headers["location"])
    assert 'data-stream="' in page.text and "data-cancel" in page.text  # not done: streams, can be cancelled
    live = web.client.get(resp.headers["location"] + "/live", headers={"HX-Request": "true"})
    assert live.text.lstrip().startswith('<div id="ablation-live"') and "Waiting for the worker" in live.text


def test_ablate_json_from_a_stored_prompt(web):
    resp = web.client.post(f"/api{web.run}/ablations", json={"features": "2:7", "prompt_id": 1, "prompt_tokens": 10})
    assert resp.status_code == 201, resp.text
    data = web.client.get(f"/api{web.run}/ablations/{resp.json()['id']}").json()
    assert data["ablation"]["request"]["features"] == [[2, 7]] and data["done"] is False


@pytest.mark.parametrize("form,status,message", [
    ({"features": "1:3 99:1", "prompt": "3 + 4"}, 422, "unknown feature (99, 1)"),
    ({"features": "1:3", "prompt": "   "}, 422, "prompt is empty"),
    ({"features": "1:3", "prompt": "3 +\x00 4"}, 422, "NUL character"),
    ({"features": "one:two", "prompt": "3 + 4"}, 422, "Cannot read feature 'one:two'"),
    ({"features": "", "prompt": "3 + 4"}, 422, "No features given"),
    ({"features": "1:3", "prompt": "x", "mode": "scale", "value": "1000"}, 422, "out of range"),
    ({"features": "1:3", "prompt": "x", "mode": "clamp"}, 422, "needs a finite value"),
    ({"features": "1:3", "prompt": "x", "mode": "explode"}, 422, "mode"),
    ({"features": "1:3", "prompt": "x", "max_new_tokens": "100000"}, 422, "over the limit"),
    ({"features": "1:3", "prompt_id": "999"}, 404, "unknown prompt 999"),
])
def test_bad_ablation_requests_store_nothing(web, form, status, message):
    before = counts(web)
    resp = web.client.post(f"{web.run}/ablations", data=form, follow_redirects=False)
    assert resp.status_code == status
    assert message in html.unescape(resp.text)
    api = web.client.post(f"/api{web.run}/ablations", json={k: v for k, v in form.items()})
    assert api.status_code == status and message in str(api.json()["detail"])
    assert counts(web) == before


def test_ablate_on_unknown_run_is_404(web):
    assert web.client.post("/runs/nope/ablations", data={"features": "1:3", "prompt": "x"}).status_code == 404


def test_retry_and_cancel_buttons(web):
    failed, waiting = web.world.job_ids["attribute"], web.world.job_ids["experiment"]
    resp = web.client.post(f"/jobs/{failed}/retry", follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/jobs"
    resp = web.client.post(f"/api/jobs/{waiting}/cancel")
    assert resp.json() == {"id": waiting, "changed": True, "status": "cancelled"}
    assert web.client.post(f"/api/jobs/{waiting}/cancel").json()["changed"] is False
    with Session(web.engine) as s:
        assert s.get(Job, failed).status == JobStatus.TODO
    assert web.client.post("/api/jobs/9999/retry").status_code == 404


def test_free_text_prompt_longer_than_the_context_is_refused_before_queueing(web, tmp_path):
    """The web app encodes free text with the run's tokenizer and checks the target's context length itself
    (the worker's check would only fail the job later)."""
    from training.organism import train_tokenizer
    from training.organism.tasks import corpus

    tok_dir, model_dir = tmp_path / "real-tokenizer", tmp_path / "target-model"
    train_tokenizer(corpus(0, per_family=20)).save_pretrained(tok_dir)
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"max_position_embeddings": 24}')
    with Session(web.engine) as s:
        run = s.get(Run, web.world.run_id)
        run.config = {**run.config, "tokenizer": str(tok_dir)}
        run.target_model = str(model_dir)
        s.commit()
    before = counts(web)
    long_prompt = " ".join(["47 + 38 = ?"] * 10)
    resp = web.client.post(f"{web.run}/ablations", data={"features": "1:3", "prompt": long_prompt})
    assert resp.status_code == 422 and "the model's context is 24 tokens" in html.unescape(resp.text)
    api = web.client.post(f"/api{web.run}/ablations", json={"features": "1:3", "prompt": long_prompt})
    assert api.status_code == 422 and "context is 24" in str(api.json()["detail"])
    assert counts(web) == before
    ok = web.client.post(f"/api{web.run}/ablations", json={"features": "1:3", "prompt": "47 + 38 = ?"})
    assert ok.status_code == 201, ok.text


def test_prefilled_forms_post_stored_token_ids_not_text(web):
    """The feature page's form starts from its top example's own ids; the graph page's from the graph's prompt
    up to the explained position, with its target token. Neither posts re-formatted text."""
    from bs4 import BeautifulSoup

    layer, index = web.world.script_feature
    soup = BeautifulSoup(web.client.get(f"{web.run}/features/{layer}/{index}").text, "html.parser")
    form = soup.select_one("[data-ablate] form")
    assert form.select_one("input[name=source][checked]")["value"] == "example"
    example_id = int(form.select_one("input[name=example_id]")["value"])
    assert form.select_one("textarea[name=prompt]").text == ""  # no pre-filled chat-formatted text
    assert int(form.select_one("input[name=max_new_tokens]")["max"]) == 512  # the server's limit
    data = {i["name"]: i["value"] for i in form.select("input[type=hidden]")}
    resp = web.client.post(f"{web.run}/ablations", data={**data, "source": "example", "features": f"{layer}:{index}",
                                                         "prompt": "ignored while source=example"},
                           follow_redirects=False)
    assert resp.status_code == 303, resp.text[:300]
    with Session(web.engine) as s:
        a = s.get(Ablation, int(resp.headers["location"].rsplit("/", 1)[1]))
    assert a.request["request"]["example_id"] == example_id and a.request["request"]["prompt"] is None
    assert a.request["prompt_ids"] and a.request["prompt_text"] is None

    soup = BeautifulSoup(web.client.get(f"{web.run}/graphs/{web.world.graph_id}").text, "html.parser")
    these = soup.select_one("form[data-ablate-these]")
    fields = {i["name"]: i["value"] for i in these.select("input[type=hidden]")}
    assert fields["source"] == "prompt_id" and fields["prompt_tokens"] == "15" and fields["target_token_id"]
    resp = web.client.post(f"{web.run}/ablations", data=fields, follow_redirects=False)
    assert resp.status_code == 303
    with Session(web.engine) as s:
        a = s.get(Ablation, int(resp.headers["location"].rsplit("/", 1)[1]))
    req = a.request["request"]
    assert req["prompt_id"] and req["prompt_tokens"] == 15 and req["target_token_id"] == int(fields["target_token_id"])


def test_feature_page_offers_the_newest_graph_with_a_stored_prompt(web):
    """The ablate form's second source is the prompt of the newest graph whose prompt is stored, up to the position
    that graph explains; a newer graph without a stored prompt (imported, or its prompt deleted) is skipped."""
    from bs4 import BeautifulSoup

    layer, index = web.world.script_feature
    with Session(web.engine) as s, s.begin():
        g = s.get(Graph, web.world.graph_id)
        prompt_id, position = g.prompt_id, g.position
        s.add(Graph(run_id=g.run_id, slug="imported-no-prompt", prompt_id=None, prompt="x", target_token_id=1,
                    target_token_str="x", position=0, params={}, nodes=[], links=[], scores={}))
    soup = BeautifulSoup(web.client.get(f"{web.run}/features/{layer}/{index}").text, "html.parser")
    form = soup.select_one("[data-ablate] form")
    label = form.select_one("input[name=source][value=prompt_id]").parent.get_text(" ", strip=True)
    assert label == "the prompt of graph demo-wait-0", label
    assert form.select_one("input[name=prompt_id]")["value"] == str(prompt_id)
    assert form.select_one("input[name=prompt_tokens]")["value"] == str(position + 1)


def _events(text: str) -> list[tuple[str, dict]]:
    import json

    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_stream_sends_every_token_then_done(web):
    url = f"{web.run}/ablations/{web.world.ablation_id}/stream"
    resp = web.client.get(url)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = _events(resp.text)
    assert events[-1] == ("done", {"status": "done"})
    tokens = [e for kind, e in events if kind == "token"]
    assert {e["condition"] for e in tokens} == {"ablated", "unablated"} and len(tokens) == 24
    assert [e["step"] for e in tokens if e["condition"] == "ablated"] == list(range(12))
    assert web.client.get(f"{web.run}/ablations/999999/stream").status_code == 404


def test_cancel_a_waiting_ablation(web):
    resp = web.client.post(f"/api{web.run}/ablations", json={"features": "2:7", "prompt": "3 + 4"})
    ablation_id = resp.json()["id"]
    data = web.client.post(f"/api{web.run}/ablations/{ablation_id}/cancel").json()
    assert data == {"id": ablation_id, "changed": True, "status": "cancelled"}
    page = web.client.get(f"/api{web.run}/ablations/{ablation_id}").json()
    assert page["done"] is True and page["ablation"]["job_status"] == "cancelled"
    assert _events(web.client.get(f"{web.run}/ablations/{ablation_id}/stream").text) == [("done", {"status": "cancelled"})]
    assert web.client.post(f"/api{web.run}/ablations/{ablation_id}/cancel").json()["changed"] is False
    resp = web.client.post(f"{web.run}/ablations/{ablation_id}/cancel", follow_redirects=False)
    assert resp.status_code == 303


def test_experiment_from_the_browser_form_and_the_api_then_cancel(web):
    from app.db.schema import Experiment

    page = web.client.get(f"{web.run}/experiments")
    assert page.status_code == 200 and "data-experiment-form" in page.text and 'value="hesitation" selected' not in page.text
    resp = web.client.post(f"{web.run}/experiments", data={
        "feature_set": "hesitation", "roles": ["output"], "design": "necessity", "mode": "zero",
        "prompts": "3 + 4 = ? | 7\r\n5 + 5 = ?", "max_new_tokens": "32"}, follow_redirects=False)
    assert resp.status_code == 303, resp.text[:400]
    experiment_id = int(resp.headers["location"].rsplit("/", 1)[1])
    with Session(web.engine) as s:
        e = s.get(Experiment, experiment_id)
        job = s.get(Job, e.job_id)
        req = e.request["request"]
    assert job.kind == "experiment" and job.status == JobStatus.TODO
    assert req["items"] == [{"prompt": "3 + 4 = ?", "answer": "7"}, {"prompt": "5 + 5 = ?", "answer": None}]
    assert e.request["selection"]["features"] == [[1, 3], [2, 7], [2, 9]]  # the set's output members
    html_page = web.client.get(resp.headers["location"]).text
    assert 'hx-trigger="every 2s"' in html_page and "data-cancel" in html_page
    api = web.client.post(f"/api{web.run}/experiments", json={"features": "2:7", "prompts": "1 + 1 = ?"})
    assert api.status_code == 201
    assert web.client.post(f"/api{web.run}/experiments/{api.json()['id']}/cancel").json()["status"] == "cancelled"
    data = web.client.get(f"/api{web.run}/experiments/{api.json()['id']}").json()
    assert data["done"] is True and data["job_status"] == "cancelled"
    bad = web.client.post(f"/api{web.run}/experiments", json={"prompts": "1 + 1 = ?"})
    assert bad.status_code == 422 and "feature set or give features" in str(bad.json()["detail"])
    bad = web.client.post(f"{web.run}/experiments", data={"feature_set": "nope", "prompts": "x"})
    assert bad.status_code == 404 and "unknown feature set" in html.unescape(bad.text)
    over = web.client.post(f"/api{web.run}/experiments", json={"features": "2:7", "prompts": "x", "max_new_tokens": 9999})
    assert over.status_code == 422
