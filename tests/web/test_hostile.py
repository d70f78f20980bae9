"""Hostile and malformed requests (issue 14's numbered cases): each gets a clear 4xx and changes nothing.

Cross-site writes, foreign Host names, integers beyond 64 bits, a run key that ``str.isdigit`` accepts
and ``int`` refuses, NUL, a lone surrogate, oversized bodies, the 503 of a database that is down, and the
headers every answer carries. Both backends (Postgres is where overflow and NUL used to turn into 500s).
"""

from __future__ import annotations

import json
import re

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.schema import Ablation, Job, JobStatus
from app.settings import Settings
from app.web import create_app
from tests.web.conftest import BASE_URL

HUGE = 2**64  # one past what a 64-bit id column holds (and Postgres' bigint refuses)


def n_ablations(web) -> int:
    with Session(web.engine) as s:
        return s.scalar(select(func.count()).select_from(Ablation))


def post_without_origin(client: TestClient, url: str, **kw):
    """A POST as a non-browser client (or a browser hiding its origin) sends it: no Origin header."""
    request = client.build_request("POST", url, **kw)
    del request.headers["origin"]
    return client.send(request, follow_redirects=False)


def job_status(web, job_id: int) -> JobStatus:
    with Session(web.engine) as s:
        return s.get(Job, job_id).status


# ------------------------------------------------------------------------------------ cross-site writes


def test_cross_site_posts_are_refused_and_change_nothing(web):
    running = web.world.job_ids["collect"]
    failed = web.world.job_ids["attribute"]
    evil = {"Origin": "http://evil.example"}
    resp = web.client.post(f"/jobs/{running}/cancel", headers=evil, follow_redirects=False)
    assert resp.status_code == 403 and "Cross-site" in resp.text
    assert web.client.post(f"/api/jobs/{running}/cancel", headers=evil).status_code == 403
    # A form on a file:// page (or a sandboxed frame) sends Origin: null.
    before = n_ablations(web)
    resp = web.client.post(f"{web.run}/ablations", headers={"Origin": "null"},
                           data={"features": "1:3", "prompt": "3 + 4"}, follow_redirects=False)
    assert resp.status_code == 403 and n_ablations(web) == before
    # text/plain is a "simple" request a page can send cross-site without a preflight.
    plain = {"Content-Type": "text/plain"}
    resp = post_without_origin(web.client, f"/api/jobs/{failed}/retry", headers=plain, content="{}")
    assert resp.status_code == 403
    resp = web.client.post(f"/api/jobs/{failed}/retry", headers=plain, content="{}")  # same origin, but not JSON
    assert resp.status_code == 415
    # A browser that hides Origin still sends Referer; a foreign one is refused too.
    resp = post_without_origin(web.client, f"/api/jobs/{running}/cancel", headers={"Referer": "http://evil.example/p"})
    assert resp.status_code == 403
    assert job_status(web, running) is JobStatus.RUNNING and job_status(web, failed) is JobStatus.FAILED


def test_same_site_and_non_browser_writes_pass(web):
    failed = web.world.job_ids["attribute"]
    same = web.client.post(f"/api/jobs/{failed}/retry", headers={"Origin": "http://127.0.0.1:80"})
    assert same.status_code == 200 and same.json()["changed"] is True
    running = web.world.job_ids["collect"]
    referer = post_without_origin(web.client, f"/jobs/{running}/cancel", headers={"Referer": f"{BASE_URL}/jobs"})
    assert referer.status_code == 303
    curl = post_without_origin(web.client, f"/api/jobs/{failed}/cancel")  # no body, no browser headers
    assert curl.status_code == 200
    form_without_origin = post_without_origin(web.client, f"/jobs/{failed}/retry", data={"x": "1"})
    assert form_without_origin.status_code == 403


def test_trusted_origin_and_configured_hosts(db_url, tmp_path):
    settings = Settings(database_url=db_url, data_dir=tmp_path, allowed_hosts=["lens.example.org", "*.lab.test"],
                        trusted_origins=["https://proxy.example.org"])
    app = create_app(settings)
    with TestClient(app, base_url="http://lens.example.org") as client:
        assert client.get("/api/jobs").status_code in (200, 503)  # answered (the store may be empty)
        assert client.get("/api/jobs", headers={"Host": "a.lab.test:8443"}).status_code != 400
        assert client.get("/api/jobs", headers={"Host": "lab.test"}).status_code == 400
        assert client.get("/api/jobs", headers={"Host": "127.0.0.1"}).status_code == 400  # not in this list
        refused = client.post("/api/jobs/1/cancel", headers={"Origin": "https://evil.example.org"})
        assert refused.status_code == 403
        trusted = client.post("/api/jobs/1/cancel", headers={"Origin": "https://proxy.example.org"})
        assert trusted.status_code == 404  # past the guard: there is no job 1 in an empty store


def test_foreign_host_is_refused(web):
    resp = web.client.get("/api/runs", headers={"Host": "attacker.example"})
    assert resp.status_code == 400 and "ADAPTERLENS_ALLOWED_HOSTS" in resp.json()["detail"]
    assert web.client.get("/", headers={"Host": "attacker.example:8000"}).status_code == 400
    for host in ("localhost:8000", "127.0.0.1:5000", "[::1]:8000"):
        assert web.client.get("/api/runs", headers={"Host": host}).status_code == 200, host


# -------------------------------------------------------------------------------------------- 4xx cases


def test_integers_beyond_64_bits_are_4xx(web):
    run = f"/api/runs/{web.world.run_id}"
    cases = {
        f"/api/jobs/{HUGE}/cancel": 422,
        f"{run}/graphs/{HUGE}": 422,
        f"{run}/ablations/{HUGE}": 422,
        f"{run}/experiments/{HUGE}": 422,
        f"/api/runs/{HUGE}": 404,  # a run key is an id or a name; this is neither
        f"{run}/features?layer={HUGE}": 422,
        f"{run}/features?after={HUGE}:1": 400,
        f"{run}/features?after=1:{HUGE}": 400,
        f"{run}/features?sort=frequency&after=0.5:{HUGE}:0": 400,
    }
    for url, status in cases.items():
        method = web.client.post if url.endswith("/cancel") else web.client.get
        assert method(url).status_code == status, url
    resp = web.client.post(f"{run}/ablations", json={"features": "1:3", "prompt_id": HUGE})
    assert resp.status_code == 422
    resp = web.client.post(f"{run}/ablations", json={"features": f"1:{HUGE}", "prompt": "3 + 4"})
    assert resp.status_code == 422
    assert web.client.get(f"/runs/{web.world.run_id}/graphs/{HUGE}").status_code == 422  # the page twin


def test_run_key_that_isdigit_accepts_and_int_refuses(web):
    assert "²".isdigit()
    for key in ("%C2%B2", "%D9%A3", "1%C2%B2"):  # superscript two, Arabic-Indic three
        resp = web.client.get(f"/api/runs/{key}")
        assert resp.status_code == 404, key
        assert web.client.get(f"/runs/{key}/features").status_code == 404


def test_nul_in_path_and_query_is_a_400(web):
    run = f"/api/runs/{web.world.run_id}"
    for url in ("/api/runs/%00", f"{run}/features?category=%00", f"{run}/features?q=a%00b", "/runs/x%00y",
                f"{run}/features?after=%00"):
        resp = web.client.get(url)
        assert resp.status_code == 400 and "NUL" in resp.text, url


def test_lone_surrogate_in_a_json_prompt_is_a_422_that_encodes(web):
    body = '{"features": "1:3", "prompt": "3 + \\ud800 4"}'
    resp = web.client.post(f"/api/runs/{web.world.run_id}/ablations", content=body,
                           headers={"Content-Type": "application/json"})
    assert resp.status_code == 422  # pydantic refuses it as text; the answer shows it escaped
    assert resp.json()["detail"][0]["where"] == "prompt" and resp.json()["detail"][0]["input"] == "3 + \\ud800 4"
    # In a field that is echoed back as the offending input, too.
    body = '{"features": "1:3", "prompt": "ok", "mode": "\\udfff"}'
    resp = web.client.post(f"/api/runs/{web.world.run_id}/ablations", content=body,
                           headers={"Content-Type": "application/json"})
    assert resp.status_code == 422 and resp.json()["detail"][0]["input"] == "\\udfff"


def test_oversized_bodies_get_413_and_errors_echo_a_short_prefix(web):
    url = f"/api/runs/{web.world.run_id}/ablations"
    big = json.dumps({"features": "1:3", "prompt": "x" * (3 * 1024 * 1024)})
    resp = web.client.post(url, content=big, headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and len(resp.content) < 1000

    def chunks():  # no Content-Length: the limit is counted while reading
        for _ in range(40):
            yield b"x" * 100_000

    resp = web.client.post(url, content=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 413
    long_prompt = json.dumps({"features": "1:3", "prompt": "y" * 150_000})  # under the body limit
    resp = web.client.post(url, content=long_prompt, headers={"Content-Type": "application/json"})
    assert resp.status_code == 422 and len(resp.content) < 2000
    resp = web.client.post(url, json={"features": "z" * 150_000, "prompt": "3 + 4"})
    assert resp.status_code == 422 and len(resp.content) < 2000


def test_database_down_is_a_503_without_connection_details(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg://secretuser:secretpw@127.0.0.1:{port}/secretdb?connect_timeout=2"
    app = create_app(Settings(database_url=url, data_dir=tmp_path))
    with TestClient(app, base_url=BASE_URL) as client:
        for path in ("/api/jobs", "/jobs"):
            resp = client.get(path)
            assert resp.status_code == 503 and resp.headers["Retry-After"]
            for secret in (str(port), "secretuser", "secretpw", "secretdb", "psycopg", "127.0.0.1"):
                assert secret not in resp.text, (path, secret)


# ----------------------------------------------------------------------------------------- headers


def test_every_answer_carries_the_policy_and_pages_use_its_nonce(web):
    pages = [web.client.get(f"/runs/{web.world.run_id}"), web.client.get(f"/runs/{web.world.run_id}")]
    nonces = []
    for resp in pages:
        csp = resp.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp and "'unsafe-eval'" not in csp
        nonce = re.search(r"script-src 'self' 'nonce-([^']+)'", csp).group(1)
        nonces.append(nonce)
        assert f'nonce="{nonce}"' in resp.text
        assert resp.headers["X-Content-Type-Options"] == "nosniff" and resp.headers["X-Frame-Options"] == "DENY"
        assert not re.search(r"\son[a-z]+=", resp.text), "inline event handlers are blocked by the policy"
    assert nonces[0] != nonces[1]
    assert '"includeIndicatorStyles": false' in pages[0].text
    for path in ("/api/runs", "/nothing-here", "/static/js/app.js"):
        assert "frame-ancestors 'none'" in web.client.get(path).headers["Content-Security-Policy"], path


def test_docs_are_served_from_local_files(web):
    for path, asset in (("/docs", "/docs-assets/swagger-ui-bundle.js"), ("/redoc", "/docs-assets/redoc.standalone.js")):
        resp = web.client.get(path)
        assert resp.status_code == 200
        assert not re.search(r"(src|href)=\"(https?:)?//", resp.text), "nothing off-site"
        assert asset in resp.text and "<script>" not in resp.text
        assert web.client.get(asset).status_code == 200
    assert 'href="/docs"' in web.client.get(f"/runs/{web.world.run_id}").text


def test_a_json_boolean_is_not_a_token_id(web):
    """``true`` as a graph's target or contrast token is refused (pydantic's lax mode read it as id 1; the API
    fuzzer found it), and nothing is queued."""
    def n_jobs() -> int:
        with Session(web.engine) as s:
            return s.scalar(select(func.count()).select_from(Job))

    before = n_jobs()
    for body in ({"prompt": "3 + 4", "target_token": True}, {"prompt": "3 + 4", "target_token": 5,
                                                             "contrast_token": False}):
        resp = web.client.post(f"/api{web.run}/graphs", json=body)
        assert resp.status_code == 422, resp.text
    assert n_jobs() == before
