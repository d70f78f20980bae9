"""The paper's category analysis of a run: shares of each category per layer and overall, by one labeler.

Shares are of *alive* features (the paper classifies features sampled among alive ones); features that never
fired are counted apart. The paper's figure: about 8% of (sampled, alive) features of DeepSeek-R1-Distill-Qwen-7B
are reasoning features, by an LLM judge. The figure is drawn with Plotly from a ``{data, layout}`` dict (the
pages' ``data-fig`` convention, static/js/app.js).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from app.labels import BUILTIN, SUBCATEGORIES
from app.labels.store import category_counts, is_alive, label_sources, ordered_categories

PAPER_REASONING_SHARE = 0.08
PAPER_NOTE = ("The paper finds about 8% reasoning features in adapters on DeepSeek-R1-Distill-Qwen-7B (an LLM judge on "
              "up to 250 alive features per layer). An arithmetic organism is not a 7B reasoning model: its traces "
              "hold a few hesitation words among digits, so its share says how much of this small adapter went to "
              "hesitation, not what a real reasoning model's would be.")
COLORS = {"reasoning": "#e8793a", "domain": "#4a7bd0", "language": "#6bab5a", "uninterpretable": "#a0a0a0"}


class CategoryShare(BaseModel):
    category: str
    n: int
    share: float = Field(description="Of the alive features labelled.")
    subcategories: dict[str, int] = {}


class LayerShares(BaseModel):
    layer: int
    n_alive: int
    n_dead: int
    shares: dict[str, float]


class CategoryAnalysis(BaseModel):
    source: str = Field(description="The labeler shown: builtin, or the LLM's model name.")
    judge: str = Field(description="In words: the built-in rules or an LLM judge.")
    sources: list[str] = Field(description="Every labeler that labelled this run, newest first.")
    n_labelled: int
    n_alive: int
    n_dead: int
    overall: list[CategoryShare]
    layers: list[LayerShares]
    reasoning_share: float | None
    paper_reasoning_share: float = PAPER_REASONING_SHARE
    note: str = PAPER_NOTE
    figure: dict[str, Any]


def judge_name(source: str) -> str:
    return "built-in rules (app/labels/builtin.py)" if source == BUILTIN else f"LLM judge {source}"


def category_analysis(session: Session, run_id: int, source: str | None = None) -> CategoryAnalysis | None:
    """The analysis by ``source`` (default: the labeler that labelled last); None when nothing is labelled."""
    sources = label_sources(session, run_id)
    if not sources:
        return None
    names = [s.source for s in sources]
    source = source if source in names else names[0]
    counts = category_counts(session, run_id, source)
    totals: dict[str, int] = {}
    subs: dict[str, dict[str, int]] = {}
    layers: list[LayerShares] = []
    n_dead_all = 0
    for layer in sorted(counts):
        alive: dict[str, int] = {}
        dead = 0
        for (cat, sub), n in counts[layer].items():
            if not is_alive(cat, sub):
                dead += n
                continue
            alive[cat] = alive.get(cat, 0) + n
            totals[cat] = totals.get(cat, 0) + n
            if sub:
                subs.setdefault(cat, {})[sub] = subs.setdefault(cat, {}).get(sub, 0) + n
        n_alive = sum(alive.values())
        n_dead_all += dead
        layers.append(LayerShares(layer=layer, n_alive=n_alive, n_dead=dead,
                                  shares={c: n / n_alive for c, n in alive.items()} if n_alive else {}))
    n_alive_all = sum(totals.values())
    cats = ordered_categories(totals)
    overall = [CategoryShare(category=c, n=totals[c], share=totals[c] / n_alive_all if n_alive_all else 0.0,
                             subcategories=_ordered_subs(c, subs.get(c, {}))) for c in cats]
    reasoning = totals.get("reasoning", 0) / n_alive_all if n_alive_all else None
    return CategoryAnalysis(
        source=source, judge=judge_name(source), sources=names, n_labelled=n_alive_all + n_dead_all,
        n_alive=n_alive_all, n_dead=n_dead_all, overall=overall, layers=layers, reasoning_share=reasoning,
        figure=_figure(cats or ["reasoning"], overall, layers),
    )


def _ordered_subs(cat: str, found: dict[str, int]) -> dict[str, int]:
    order = list(SUBCATEGORIES.get(cat, ())) + sorted(set(found) - set(SUBCATEGORIES.get(cat, ())))
    return {s: found[s] for s in order if s in found}


def _figure(cats: list[str], overall: list[CategoryShare], layers: list[LayerShares]) -> dict[str, Any]:
    """Stacked bars: share of alive features per category, overall and per layer; reasoning at the bottom, so it
    reads against the paper's 8% line."""
    x = ["all"] + [f"L{ly.layer}" for ly in layers]
    by_cat = {c.category: c.share for c in overall}
    data = []
    for cat in cats:
        data.append({"type": "bar", "name": cat, "x": x,
                     "y": [by_cat.get(cat, 0.0)] + [ly.shares.get(cat, 0.0) for ly in layers],
                     "marker": {"color": COLORS.get(cat, "#c58bd6")},
                     "hovertemplate": "%{x}: %{y:.1%} " + cat + "<extra></extra>"})
    layout = {
        "barmode": "stack", "height": 260, "margin": {"t": 28, "l": 48, "r": 12, "b": 40},
        "yaxis": {"tickformat": ".0%", "range": [0, 1], "title": {"text": "share of alive features"}},
        "shapes": [{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": PAPER_REASONING_SHARE,
                    "y1": PAPER_REASONING_SHARE, "line": {"dash": "dash", "width": 1.5, "color": "#333"}}],
        "annotations": [{"xref": "paper", "x": 1, "y": PAPER_REASONING_SHARE, "yanchor": "bottom", "xanchor": "right",
                         "showarrow": False, "text": "paper: ~8% reasoning (7B)", "font": {"size": 10}}],
    }
    return {"data": data, "layout": layout}
