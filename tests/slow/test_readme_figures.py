"""The README's headline figures, reproduced by the slow tier's demo run within stated tolerances.

``readme_figures.json`` holds each figure as the README prints it (``text``), the value it stands for and a
tolerance. The test checks both halves: the README still prints that text (so an edit of the README without
re-measuring fails), and the demo run (the README's main command on a fresh data directory, seed 0) lands
within the tolerance of the value (so a change of the code that moves a figure fails until the README is
re-measured). Tolerances cover what differs between machines with the same thread count (float reduction
order); the README states the spread over training seeds separately.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FIGURES = json.loads((Path(__file__).with_name("readme_figures.json")).read_text())


def _lookup(demo: dict, path: str) -> Any:
    """``evaluation.kl_gap_closed`` or ``study.report.removal``: a dotted path into the demo run's results."""
    node: Any = demo
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


@pytest.mark.parametrize("figure", FIGURES["figures"], ids=lambda f: f["path"])
def test_readme_prints_the_figure(figure: dict) -> None:
    readme = (ROOT / "README.md").read_text()
    assert figure["text"] in readme, f"the README no longer prints {figure['text']!r} ({figure['path']})"


@pytest.mark.parametrize("figure", FIGURES["figures"], ids=lambda f: f["path"])
def test_demo_run_reproduces_the_figure(demo: dict, figure: dict) -> None:
    if demo["precision"] != FIGURES["precision"]:  # another organism: its figures are in README, Spread
        pytest.skip(f"the README's figures come from an organism built in {FIGURES['precision']}; this machine "
                    f"built it in {demo['precision']} (no native bf16 here, or a data directory from before)")
    value = _lookup(demo, figure["path"])
    assert value == pytest.approx(figure["value"], abs=figure["tolerance"]), (
        f"{figure['path']}: the demo run gives {value}, the README {figure['text']!r} "
        f"(± {figure['tolerance']}); re-measure with {FIGURES['command']!r}")
