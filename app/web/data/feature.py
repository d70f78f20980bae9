"""One feature's page: its examples with per-token activations, statistics, graphs and neighbours.

Token text comes from the run's vocabulary (ids are stored, never text). Examples carry their whole
stored context; ``window`` marks the part shown before the user expands it (around the focus token).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from app.db.schema import (
    Example,
    Feature,
    FeatureLabel,
    FeatureSet,
    FeatureSetMember,
    Graph,
    GraphFeature,
    Prompt,
)
from app.web.data.common import (
    NotFound,
    RunRef,
    as_float,
    get_run,
    hesitation_words,
    keys_condition,
    run_ref,
    run_vocab,
)
from app.web.tokens import EMPTY_VOCAB, Vocab

WINDOW_BEFORE, WINDOW_AFTER = 12, 6  # tokens shown around the focus before "expand" (of 50 / 20 stored)
KIND_ORDER = ("top", "quantile", "random")
MAX_GRAPHS_LISTED = 200  # graphs listed on a feature page, newest first


class Tok(BaseModel):
    id: int
    text: str
    kind: str = Field("text", description="text | special | bytes | padding (the vocabulary module's kinds).")
    act: float = 0.0
    hesitation: bool = False


class ExampleView(BaseModel):
    """One example; per-token data as parallel lists (circuit-tracer's ``tokens`` / ``tokens_acts_list``)."""

    id: int
    kind: str
    rank: int
    max_act: float
    focus: int
    window: tuple[int, int] = Field(description="[start, end) of the tokens shown before expanding.")
    tokens: list[str] = Field(description="Each token's text, decoded on its own.")
    token_ids: list[int]
    acts: list[float] = Field(description="The feature's activation at each token.")
    token_kinds: list[str] = Field([], description="Each token's kind: text | special | bytes | padding.")
    hesitation: list[bool] = Field([], description="Each token: part of a hesitation word (the run's rule).")
    prompt_id: int | None = None
    prompt_pos: int | None = Field(None, exclude=True)  # stored by collect: the focus token's place in prompt_id
    trace_id: int | None = Field(None, description="The source prompt, when it is stored in this run (the trace "
                                 "viewer opens it).")
    trace_pos: int | None = Field(None, description="The focus token's position in that prompt (the trace viewer's "
                                  "#t anchor), when the prompt holds these ids.")


class Band(BaseModel):
    """One activation band of the quantile examples ("across the activation range")."""

    band: int
    low: float
    high: float | None = Field(description="None: no upper edge.")
    share: float | None = Field(description="Share of the feature's activations that fall in this band.")
    examples: list[ExampleView]


class Hist(BaseModel):
    edges: list[float]
    counts: list[float]


class LensToken(BaseModel):
    id: int | None
    text: str
    kind: str = "text"
    value: float | None


class GraphUse(BaseModel):
    id: int
    slug: str
    target: str | None
    positions: list[int]
    influence: float | None
    roles: list[str]


class SetUse(BaseModel):
    id: int
    name: str
    role: str | None
    score: float | None


class Neighbour(BaseModel):
    layer: int
    index: int
    cosine: float | None
    label: str | None = None
    top_token: str | None = None
    exists: bool = False


class LabelView(BaseModel):
    """One labeler's label of the feature (``source``: builtin, or the LLM's model name)."""

    source: str
    label: str
    category: str | None
    subcategory: str | None
    score: float | None
    judge: str


class FeatureInfo(BaseModel):
    layer: int
    index: int
    frequency: float
    max_act: float
    mean_act: float
    label: str | None
    category: str | None


class TextTest(BaseModel):
    """"Test your text": this feature's activation on a user's text, token by token (from a diff lens request)."""

    lens_id: int
    status: str
    done: bool
    error: str | None = None
    tokens: list[Tok] = Field([], description="The text's tokens with this feature's activation.")
    max_act: float | None = Field(None, description="Its largest activation on the text (the histogram's marker).")
    max_pos: int | None = None
    source: str | None = Field(None, description="watched: every token; lens: the lens' strongest features only.")


class FeaturePage(BaseModel):
    run: RunRef
    feature: FeatureInfo
    examples: dict[str, list[ExampleView]] = Field(description="Top and random examples.")
    bands: list[Band] = Field(description="Quantile examples by activation band, highest band first.")
    histogram: Hist | None
    think_pos_hist: Hist | None
    region_counts: dict[str, float] = Field(description="Active tokens per chat region (raw counts).")
    region_shares: dict[str, float] = Field(description="Share of the feature's active tokens per region.")
    logit_top: list[LensToken]
    logit_bottom: list[LensToken]
    graphs: list[GraphUse]
    sets: list[SetUse]
    neighbours: list[Neighbour]
    labels: list[LabelView] = Field([], description="Every labeler's label, newest first.")
    vocab_source: str | None = Field(description="The tokenizer.json token text came from (None: ids shown).")
    text_test: TextTest | None = Field(None, description="With ?lens=ID: this feature on that lens' text.")


def token_views(vocab: Vocab, ids: list[Any], acts: list[Any] | None, words: tuple[str, ...]) -> list[Tok]:
    """Tokens with their display text and kind, activation, and whether they are part of a hesitation word."""
    acts = acts or []
    ids = [int(t) for t in ids]
    marks = vocab.hesitation_marks(ids, words)
    out = []
    for i, tid in enumerate(ids):
        t = vocab.token(tid)
        act = acts[i] if i < len(acts) and isinstance(acts[i], int | float) else 0.0
        out.append(Tok(id=tid, text=t.text, kind=t.kind, act=float(act), hesitation=marks[i]))
    return out


def _hist(raw: Any) -> Hist | None:
    if not isinstance(raw, dict):
        return None
    edges, counts = raw.get("edges"), raw.get("counts")
    if not isinstance(edges, list) or not isinstance(counts, list) or not counts:
        return None
    try:
        return Hist(edges=[float(e) for e in edges], counts=[float(c) for c in counts])
    except (TypeError, ValueError):
        return None


def _lens(entries: Any, vocab: Vocab | None = None, limit: int | None = None) -> list[LensToken]:
    """Logit-lens entries ``[id, text, value]`` as the vocabulary module shows them (partial bytes as bytes,
    special tokens readable); ids of a padded vocabulary are not tokens and are left out. Without a tokenizer
    the stored text is used. ``limit``: stop after that many (the index shows one per row)."""
    vocab = vocab or EMPTY_VOCAB
    out: list[LensToken] = []
    for e in entries or []:
        if limit is not None and len(out) >= limit:
            break
        if not (isinstance(e, list | tuple) and len(e) >= 3):
            continue
        tid = e[0] if isinstance(e[0], int) else None
        if tid is not None and vocab.tokenizer is not None:
            t = vocab.token(tid)
            if t.kind == "padding":
                continue
            out.append(LensToken(id=tid, text=t.text, kind=t.kind, value=as_float(e[2])))
        else:
            text = e[1] if isinstance(e[1], str) else vocab.text(tid) if tid is not None else "?"
            out.append(LensToken(id=tid, text=text, value=as_float(e[2])))
    return out


def top_token(logit_lens: Any, vocab: Vocab | None = None) -> str | None:
    top = _lens(logit_lens.get("top"), vocab, limit=1) if isinstance(logit_lens, dict) else []
    return top[0].text if top else None


QUANTILE_RANK_STRIDE = 100  # as worker/collect: a quantile example's rank = band * 100 + its place in the band
QUANTILE_LOG10_LOW, QUANTILE_BANDS_PER_DECADE = -2.0, 2  # as worker/collect/stats.py: half-decades from 1e-2


def band_edges(band: int) -> tuple[float, float | None]:
    """``[low, high)`` of an activation band (band 0 starts at 0; the last band has no upper edge)."""
    low = 0.0 if band == 0 else 10.0 ** (QUANTILE_LOG10_LOW + (band - 1) / QUANTILE_BANDS_PER_DECADE)
    high = 10.0 ** (QUANTILE_LOG10_LOW + band / QUANTILE_BANDS_PER_DECADE)
    return low, (high if band < 9 else None)


def _bands(quantile: list[ExampleView], hist: Hist | None) -> list[Band]:
    """Group quantile examples by band (highest first) with each band's share of the histogram's counts."""
    by_band: dict[int, list[ExampleView]] = {}
    for ex in quantile:
        by_band.setdefault(ex.rank // QUANTILE_RANK_STRIDE, []).append(ex)
    total = sum(hist.counts) if hist is not None else 0
    out = []
    for band in sorted(by_band, reverse=True):
        low, high = band_edges(band)
        share = None
        if hist is not None and total > 0 and len(hist.edges) == len(hist.counts) + 1:
            inside = sum(c for c, a, b in zip(hist.counts, hist.edges[:-1], hist.edges[1:], strict=True)
                         if (a >= low * (1 - 1e-9) or band == 0) and (high is None or b <= high * (1 + 1e-9)))
            share = inside / total
        out.append(Band(band=band, low=low, high=high, share=share,
                        examples=sorted(by_band[band], key=lambda e: -e.acts[e.focus])))
    return out


# The page's per-feature queries, built once with bound parameters: building the SQL expressions anew for each
# request was ~10% of a feature page's time (and a statement built once hits SQLAlchemy's compiled cache).
_RUN, _LAYER, _INDEX = bindparam("run"), bindparam("layer"), bindparam("index")
_EXAMPLES = (select(Example.id, Example.kind, Example.rank, Example.token_ids, Example.acts, Example.focus,
                    Example.max_act, Example.prompt_id, Example.prompt_pos)
             .where(Example.run_id == _RUN, Example.layer == _LAYER, Example.index == _INDEX)
             .order_by(Example.kind, Example.rank))
_GRAPHS = (select(Graph.id, Graph.slug, Graph.target_token_str, GraphFeature.positions, GraphFeature.influence)
           .join(GraphFeature, GraphFeature.graph_id == Graph.id)
           .where(GraphFeature.run_id == _RUN, GraphFeature.layer == _LAYER, GraphFeature.index == _INDEX)
           .order_by(Graph.id.desc()).limit(MAX_GRAPHS_LISTED))
_LABELS = (select(FeatureLabel)
           .where(FeatureLabel.run_id == _RUN, FeatureLabel.layer == _LAYER, FeatureLabel.index == _INDEX)
           .order_by(FeatureLabel.created.desc(), FeatureLabel.id.desc()))
_SETS = (select(FeatureSet.id, FeatureSet.name, FeatureSetMember.role, FeatureSetMember.score)
         .join(FeatureSetMember, FeatureSetMember.set_id == FeatureSet.id)
         .where(FeatureSet.run_id == _RUN, FeatureSetMember.layer == _LAYER, FeatureSetMember.index == _INDEX))


def _key(run_id: int, layer: int, index: int) -> dict[str, int]:
    return {"run": run_id, "layer": layer, "index": index}


def get_feature(session: Session, run_id: int, layer: int, index: int) -> Feature:
    feat = session.get(Feature, (run_id, layer, index))
    if feat is None:
        raise NotFound(f"No feature {layer}/{index} in run {run_id}: it was not collected, or the layer or "
                       "index is out of range.")
    return feat


def graphs_with_feature(session: Session, run_id: int, layer: int, index: int) -> list[GraphUse]:
    """The stored graphs holding this feature (the ``graph_features`` index), newest first."""
    rows = session.execute(_GRAPHS, _key(run_id, layer, index)).all()
    return [GraphUse(id=g.id, slug=g.slug, target=g.target_token_str, positions=list(g.positions or []),
                     influence=g.influence, roles=[]) for g in rows]


def _node_index(node: dict[str, Any]) -> int | None:
    """The feature index of a feature node: our ``index`` key, else the middle of ``node_id``."""
    if isinstance(node.get("index"), int):
        return node["index"]
    parts = str(node.get("node_id", "")).split("_")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def feature_labels(session: Session, run_id: int, layer: int, index: int) -> list[LabelView]:
    from app.labels.analysis import judge_name

    rows = session.scalars(_LABELS, _key(run_id, layer, index))
    return [LabelView(source=r.source, label=r.label, category=r.category, subcategory=r.subcategory, score=r.score,
                      judge=judge_name(r.source)) for r in rows]


def _find(haystack: list[int], needle: list[int]) -> int | None:
    """The first index where ``needle`` occurs in ``haystack`` as a contiguous run, else None."""
    if not needle or len(needle) > len(haystack):
        return None
    first, n = needle[0], len(needle)
    for i in range(len(haystack) - n + 1):
        if haystack[i] == first and haystack[i:i + n] == needle:
            return i
    return None


def _place_in_traces(session: Session, run_id: int, examples: list[ExampleView]) -> None:
    """Examples whose source prompt is stored (``examples.prompt_id``, same run) get their focus token's position
    in it: the stored one (``prompt_pos``, what collect writes: no read of the trace), else where the example's
    window of ids occurs in the prompt's ids (examples written otherwise)."""
    for e in examples:
        if e.prompt_id is not None and e.prompt_pos is not None:  # the key is a foreign key: the prompt exists
            e.trace_id, e.trace_pos = e.prompt_id, e.prompt_pos
    wanted = {e.prompt_id for e in examples if e.prompt_id is not None and e.trace_id is None}
    if not wanted:
        return
    prompts = {pid: [int(t) for t in ids or []] for pid, ids in session.execute(
        select(Prompt.id, Prompt.token_ids).where(Prompt.run_id == run_id, Prompt.id.in_(wanted)))}
    for e in examples:
        if e.prompt_id is None or e.trace_id is not None:
            continue
        ids = prompts.get(e.prompt_id)
        if ids is None:
            continue
        e.trace_id = e.prompt_id
        start = _find(ids, e.token_ids)
        e.trace_pos = None if start is None else start + e.focus


def feature_page(session: Session, run_key: str | int, layer: int, index: int) -> FeaturePage:
    run = get_run(session, run_key)
    feat = get_feature(session, run.id, layer, index)
    vocab = run_vocab(session, run)
    examples: dict[str, list[ExampleView]] = {}
    words = hesitation_words(run)
    # columns, not ORM objects: a page's ~50 rows skip the identity map (~10% of its time)
    for ex in session.execute(_EXAMPLES, _key(run.id, layer, index)):
        ids = [int(t) for t in ex.token_ids or []]
        raw_acts = list(ex.acts or [])
        acts = [float(a) if isinstance(a, int | float) else 0.0 for a in raw_acts[: len(ids)]]
        acts += [0.0] * (len(ids) - len(acts))
        focus = ex.focus if 0 <= ex.focus < len(ids) else 0
        window = (max(0, focus - WINDOW_BEFORE), min(len(ids), focus + WINDOW_AFTER + 1))
        texts, kinds, marks = vocab.example_views(ids, words)
        examples.setdefault(ex.kind, []).append(ExampleView(
            id=ex.id, kind=ex.kind, rank=ex.rank, max_act=ex.max_act, focus=focus, window=window,
            tokens=texts, token_ids=ids, acts=acts, token_kinds=kinds, hesitation=marks, prompt_id=ex.prompt_id,
            prompt_pos=ex.prompt_pos))
    _place_in_traces(session, run.id, [e for exs in examples.values() for e in exs])
    bands = _bands(examples.pop("quantile", []), _hist(feat.histogram))
    examples = {k: examples[k] for k in sorted(examples, key=lambda k: (KIND_ORDER + (k,)).index(k))}

    sets = [SetUse(id=s.id, name=s.name, role=s.role, score=s.score)
            for s in session.execute(_SETS, _key(run.id, layer, index))]
    neighbours = []
    raw_nb = [n for n in (feat.neighbours or []) if isinstance(n, list | tuple) and len(n) >= 2][:20]
    if raw_nb:
        keys = [(int(n[0]), int(n[1])) for n in raw_nb]
        found = {
            (r.layer, r.index): r
            for r in session.execute(
                select(Feature.layer, Feature.index, Feature.label, Feature.logit_lens)
                .where(Feature.run_id == run.id, keys_condition(Feature.layer, Feature.index, keys))
            )
        }
        for n, key in zip(raw_nb, keys, strict=True):
            r = found.get(key)
            neighbours.append(Neighbour(layer=key[0], index=key[1], cosine=as_float(n[2]) if len(n) > 2 else None,
                                        label=r.label if r else None, top_token=top_token(r.logit_lens, vocab) if r else None,
                                        exists=r is not None))
    lens = feat.logit_lens if isinstance(feat.logit_lens, dict) else {}
    regions = {str(k): float(v) for k, v in (feat.region_counts or {}).items() if isinstance(v, int | float)}
    total = sum(regions.values())
    shares = {k: v / total for k, v in regions.items()} if total > 0 else {}
    return FeaturePage(
        run=run_ref(run),
        feature=FeatureInfo(layer=layer, index=index, frequency=feat.frequency, max_act=feat.max_act,
                            mean_act=feat.mean_act, label=feat.label, category=feat.category),
        examples=examples, bands=bands, histogram=_hist(feat.histogram), region_shares=shares, think_pos_hist=_hist(feat.think_pos_hist),
        region_counts=regions, logit_top=_lens(lens.get("top"), vocab), logit_bottom=_lens(lens.get("bottom"), vocab),
        graphs=graphs_with_feature(session, run.id, layer, index), sets=sets, neighbours=neighbours,
        labels=feature_labels(session, run.id, layer, index), vocab_source=vocab.source,
    )
