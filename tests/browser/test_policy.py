"""The content-security policy in a real browser: the API docs render offline under it, and a form on a
file:// page cannot change anything (the page crawl in test_pages.py runs under the same policy: any
violation is a console error that fails it)."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from tests.browser.conftest import shot

pytestmark = pytest.mark.browser


def test_api_docs_render_from_local_files_under_the_policy(server, page):
    hosts = set()
    page.on("request", lambda req: hosts.add(urlsplit(req.url).netloc) if req.url.startswith("http") else None)
    page.goto(server.url + "/docs")
    page.wait_for_selector(".swagger-ui .opblock-summary-path")
    assert page.locator(".opblock-summary-path").count() >= 10
    shot(page, "docs-swagger")
    page.goto(server.url + "/redoc")
    page.wait_for_selector("#redoc [data-section-id]")
    shot(page, "docs-redoc")
    assert hosts == {urlsplit(server.url).netloc}, f"off-site requests: {hosts}"


def test_a_form_on_a_file_page_is_refused(server, world, page, tmp_path):
    job = world.job_ids["experiment"]  # waiting: cancel would change it
    form = tmp_path / "evil.html"
    form.write_text(f'<form method="post" action="{server.url}/jobs/{job}/cancel"><button>go</button></form>')
    page.allowed_errors = ("403",)
    page.goto(form.as_uri())
    with page.expect_navigation():
        page.click("button")
    assert "Cross-site request refused" in page.content()
