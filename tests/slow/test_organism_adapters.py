"""Issue 2's acceptance on the full organism (tens of minutes on 2 cores: ``pytest -m slow``).

Adapters trained with the ``organism`` preset close ≥ 90% of the hybrid→target KL gap and reproduce
≥ 90% of the target's hesitation generations with ≤ 2% false ones, at an L0 well under 10% of the
width. The run is the slow tier's finished demo run (tests/slow/conftest.py).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluation(demo: dict) -> dict:
    """The demo run's evaluation (300 held-out prompts: the evaluate job's default)."""
    return demo["evaluation"]


def test_adapters_close_the_kl_gap(evaluation: dict) -> None:
    assert evaluation["kl_gap_closed"] >= 0.90, evaluation["kl_gap_closed"]


def test_adapters_reproduce_the_targets_hesitations(evaluation: dict) -> None:
    assert evaluation["reproduced_hesitation"] >= 0.90, evaluation["reproduced_hesitation"]
    assert evaluation["false_hesitation"] <= 0.02, evaluation["false_hesitation"]


def test_adapters_are_sparse(evaluation: dict) -> None:
    width = 512  # the organism preset's features per layer
    assert evaluation["l0_mean"] < 0.10 * width, evaluation["l0_per_layer"]
