"""How an ablation's request reads in the page's request list (app/web/data/ablations.request_view): each prompt
source says what it was; the run page's "ablate the set" sends token ids, which read as "stored example None"."""

from __future__ import annotations

import pytest

from app.web.data.ablations import request_view


@pytest.mark.parametrize(("request_", "shown"), [
    ({"prompt": "1 + 1 = ?"}, "1 + 1 = ?"),
    ({"prompt_id": 4}, "stored prompt 4"),
    ({"example_id": 0}, "stored example 0"),
    ({"token_ids": [1, 2, 3], "prompt_tokens": 3}, "3 token ids"),
    ({}, "the stored prompt"),
])
def test_each_prompt_source_reads_as_what_it_was(request_, shown):
    stored = {"request": {**request_, "features": [[0, 1]]}, "selection": {"features": [[0, 1]], "mode": "zero"}}
    view = request_view(stored)
    assert view.prompt == shown and view.features == [(0, 1)]
    assert "None" not in view.prompt
    assert request_view({**stored, "prompt_text": "8 + 9 = ?"}).prompt == ("1 + 1 = ?" if "prompt" in request_ else
                                                                            "8 + 9 = ?")
