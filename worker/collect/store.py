"""Writing a collection into the store's ``features`` and ``examples`` tables (app/db/schema.py).

One transaction per call: the run's existing rows for the written layers are deleted first, so a
re-run (or a retried job) replaces and never duplicates. Rows are produced a slice of features at a
time (bounded memory at the paper's 229k features) and written in bulk: ``COPY … FROM STDIN`` through
psycopg on Postgres, ``executemany`` batches elsewhere.

JSON layouts (the feature page reads these):
- ``histogram``: ``{"edges": [1e-4, 1e-3, 10^-2.9, …, 1e2, 1e3], "counts": [52 counts]}`` (numpy style,
  one more edge than counts; 10 bins a decade); counts are of tokens with f > 0. The first bin holds
  all of (0, 1e-3) and the last all of [1e2, ∞): their outer edges are nominal, for drawing.
- ``logit_lens``: ``{"top": [[token_id, token_str, value], …], "bottom": [...]}``, most extreme first
  (convention in worker/collect/lens.py: gain-scaled decoder through W_U, demeaned over the vocabulary).
- ``region_counts``: ``{"prompt": n, "think-start": n, "thinking": n, "think-end": n, "answer": n}``,
  active tokens per region.
- ``think_pos_hist``: ``{"edges": [0, 0.1, …, 1], "counts": [10 counts]}``, active thinking tokens by
  relative position in their thinking span.
- ``neighbours``: ``[[layer, index, cosine], …]`` by decoder cosine, highest first.
- examples: ``token_ids`` and ``acts`` cover the window inside the sequence (up to 50 before, 20 after),
  ``prompt_id`` names the whole sequence, stored as a ``prompts`` row of source ``collection`` when the writer
  is given the corpus, and ``prompt_pos`` is the focus token's position in it (the feature page's "in its
  trace" link opens the trace viewer there),
  ``focus`` indexes the selected token, ``max_act`` is the window's largest activation, acts are
  rounded to 5 decimals; ``rank`` orders top examples by activation, random ones by sampling key; quantile
  examples (a random sample per half-decade activation band) have ``rank = band * 100 + place``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from sqlalchemy import Connection, Engine, Table, delete, insert, select
from sqlalchemy.orm import Session

from app.db.lens_request import token_key
from app.db.schema import COLLECTION_SOURCE, Example, Feature, FeatureToken, Prompt, Run
from app.db.text import storable
from app.labels.store import clear_labels
from training.chat import REGION_NAMES
from worker.collect.corpus import Corpus
from worker.collect.kept import KeptExamples
from worker.collect.result import QUANTILE_RANK_STRIDE, CollectionResult
from worker.collect.stats import N_QUANTILE_BANDS, FeatureStats, unpack_loc

try:  # optional: only makes large writes faster
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

logger = logging.getLogger(__name__)

FEATURE_SLICE = 1024  # features whose rows are built and sent together
INSERT_BATCH = 5000  # rows per executemany on backends without COPY
ACT_DECIMALS = 5  # stored precision of per-token activations

_EXAMPLE_COLUMNS = ("run_id", "layer", "index", "kind", "rank", "token_ids", "acts", "focus", "max_act", "prompt_id",
                    "prompt_pos")
SOURCE_TOKEN_LIMIT = 20_000_000  # at most this many tokens of them are stored (~100 MB of JSON)
_FEATURE_COLUMNS = ("run_id", "layer", "index", "frequency", "max_act", "mean_act", "histogram", "logit_lens",
                    "region_counts", "think_pos_hist", "neighbours", "hesitation_lens")
_TOKEN_COLUMNS = ("run_id", "relation", "token_id", "layer", "index", "rank", "value")
PROMOTES_TOP = 10  # logit-lens places a token must hold for the feature to "promote" it (search)
_JSON_COLUMNS = {"token_ids", "acts", "histogram", "logit_lens", "region_counts", "think_pos_hist", "neighbours"}


def write_collection(target: Session | Engine | Connection, run_id: int, result: CollectionResult,
                     tokenizer: Any = None, *, layers: Sequence[int] | None = None,
                     corpus: Corpus | None = None) -> dict[str, int]:
    """Replace the run's features and examples of ``layers`` (default: all in the result).

    ``target``: an Engine (a transaction is opened and committed here), or a Session / Connection
    (the rows are written inside its current transaction; the caller commits). ``tokenizer`` decodes
    logit-lens tokens for display (token strings are null without one) and the source sequences' text.
    ``corpus``: the corpus the result was collected on; every sequence a written example comes from is then
    stored as a ``prompts`` row (:func:`store_sources`) and the example points at it. Returns row counts.
    """
    layers = result.layers if layers is None else sorted(set(layers))
    missing = [x for x in layers if x not in result.stats]
    if missing:
        raise ValueError(f"layers {missing} are not in the collection (it has {result.layers})")
    if not result.complete:
        logger.warning("writing a partial collection (shards %s) for run %s", result.shards, run_id)
    if isinstance(target, Engine):
        with target.begin() as conn:
            return _write(conn, run_id, result, tokenizer, layers, corpus)
    if isinstance(target, Session):
        return _write(target.connection(), run_id, result, tokenizer, layers, corpus)
    if isinstance(target, Connection):
        return _write(target, run_id, result, tokenizer, layers, corpus)
    raise TypeError(f"write_collection needs a Session, Engine or Connection, not {type(target).__name__}")


def _write(conn: Connection, run_id: int, result: CollectionResult, tokenizer: Any, layers: list[int],
           corpus: Corpus | None) -> dict[str, int]:
    if conn.execute(select(Run.id).where(Run.id == run_id)).first() is None:
        raise ValueError(f"run {run_id} does not exist")
    t0 = time.perf_counter()
    sources = store_sources(conn, run_id, result, corpus, tokenizer, layers) if corpus is not None else {}
    conn.execute(delete(Example).where(Example.run_id == run_id, Example.layer.in_(layers)))
    conn.execute(delete(Feature).where(Feature.run_id == run_id, Feature.layer.in_(layers)))
    conn.execute(delete(FeatureToken).where(FeatureToken.run_id == run_id, FeatureToken.layer.in_(layers)))
    clear_labels(conn, run_id, layers)  # labels describe the old examples
    decode = _decoder(result, tokenizer, layers)
    n_vocab = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None
    n_feat = n_ex = n_tok = 0
    for layer in layers:
        s = result.stats[layer]
        for start in range(0, s.n_features, FEATURE_SLICE):
            stop = min(start + FEATURE_SLICE, s.n_features)
            n_feat += _bulk(conn, Feature.__table__, _FEATURE_COLUMNS, _feature_rows(run_id, result, layer, start, stop, decode))
            n_ex += _bulk(conn, Example.__table__, _EXAMPLE_COLUMNS, _example_rows(run_id, s, start, stop, sources))
            lens = result.lens.get(layer) if result.lens is not None else None
            n_tok += _bulk(conn, FeatureToken.__table__, _TOKEN_COLUMNS,
                           _token_rows(run_id, s, lens, start, stop, n_vocab))
    logger.info("stored run %s: %d features, %d examples, %d token rows, %d source sequences in %.1f s", run_id, n_feat,
                n_ex, n_tok, len(sources), time.perf_counter() - t0)
    return {"features": n_feat, "examples": n_ex, "feature_tokens": n_tok, "sources": len(sources)}


def store_sources(conn: Connection, run_id: int, result: CollectionResult, corpus: Corpus, tokenizer: Any,
                  layers: Sequence[int]) -> dict[int, int]:
    """Every corpus sequence that a kept example of ``layers`` comes from, as a ``prompts`` row of the run
    (source ``collection``, with its text and chat regions); returns {sequence id: prompt id}.

    A sequence already stored by an earlier collection of the run (the same ids) keeps its row, so a re-collection
    leaves trace links, lens results and graphs that point at it intact. Only sequences that examples come
    from are stored, each distinct one once (at most all of the corpus: its token ids once more, as JSON); beyond
    ``SOURCE_TOKEN_LIMIT`` tokens none are (the examples keep no link) and the log says so. A corpus whose ids
    differ from the examples' windows is refused (ValueError) before anything is written.
    """
    seqs: set[int] = set()
    for layer in layers:
        s = result.stats[layer]
        for kept in (s.top, s.random, s.quantile):
            loc = kept.loc[kept.loc >= 0]
            seqs.update(unpack_loc(loc)[0].unique().tolist())
    if not seqs:
        return {}
    if max(seqs) >= len(corpus):
        raise ValueError(f"the collection names sequence {max(seqs)}, beyond the corpus of {len(corpus)}: "
                         "not the corpus it was collected on")
    for layer in layers:
        _check_corpus(result.stats[layer], corpus)
    n_tokens = int(corpus.lengths[sorted(seqs)].sum())
    if n_tokens > SOURCE_TOKEN_LIMIT:
        logger.warning("run %s: the examples come from %d sequences of %d tokens in all, over the %d stored as traces; "
                       "the examples are written without links to them", run_id, len(seqs), n_tokens, SOURCE_TOKEN_LIMIT)
        return {}
    # rows of earlier collections by the hash of their ids, read a few hundred at a time (only the hashes stay)
    known: dict[str, int] = {}
    rows_seen = conn.execute(  # options on the statement: on the connection they would stay for the insert below
        select(Prompt.id, Prompt.token_ids).where(Prompt.run_id == run_id, Prompt.source == COLLECTION_SOURCE)
        .order_by(Prompt.id).execution_options(stream_results=True, yield_per=500))
    for pid, ids in rows_seen:
        known.setdefault(token_key(ids or []), int(pid))
    out: dict[int, int] = {}
    new: dict[str, tuple[list[int], list[int]]] = {}  # hash → (the new sequences with those ids, the ids)
    for seq in sorted(seqs):
        seq_ids = corpus[seq].tolist()
        key = token_key(seq_ids)
        if key in known:
            out[seq] = known[key]
        else:
            new.setdefault(key, ([], seq_ids))[0].append(seq)
    if new:
        firsts = [group[0] for group, _ in new.values()]
        ids = [seq_ids for _, seq_ids in new.values()]
        texts = tokenizer.batch_decode(ids) if tokenizer is not None and hasattr(tokenizer, "batch_decode") \
            else [""] * len(ids)
        rows = [{"run_id": run_id, "source": COLLECTION_SOURCE, "text": storable(text), "token_ids": seq_ids,
                 "regions": region_spans(corpus.regions_of(seq))}
                for seq, seq_ids, text in zip(firsts, ids, texts, strict=True)]
        table = Prompt.__table__
        pids = conn.execute(insert(table).returning(table.c.id, sort_by_parameter_order=True), rows).scalars().all()
        for (group, _), pid in zip(new.values(), pids, strict=True):
            out.update(dict.fromkeys(group, int(pid)))
    return out


def _check_corpus(stats: FeatureStats, corpus: Corpus) -> None:
    """The top examples' windows (cut from the corpus they were collected on) must be the given corpus' ids."""
    loc = stats.top.loc[stats.top.loc >= 0]
    if loc.numel() == 0 or "tokens" not in stats.top.data:  # no windows: the rows' writer says so
        return
    # the caller has checked that every sequence id is in the corpus
    if not torch.equal(corpus.windows(*unpack_loc(loc), stats.ctx_before, stats.ctx_after).to(torch.int32),
                       stats.top.data["tokens"][stats.top.loc >= 0].to(torch.int32)):
        raise ValueError("the examples' token windows are not in this corpus: not the corpus it was collected on")


def region_spans(regions: torch.Tensor) -> list[list[Any]]:
    """Runs of equal region codes as ``[[start, end, name], ...]`` (end exclusive), the trace viewer's layout."""
    n = regions.numel()
    if n == 0:
        return []
    change = torch.ones(n, dtype=torch.bool)
    change[1:] = regions[1:] != regions[:-1]
    starts = change.nonzero().squeeze(1).tolist()
    codes = regions[starts].tolist()
    return [[a, b, REGION_NAMES[c]] for a, b, c in zip(starts, starts[1:] + [n], codes, strict=True)]


def _decoder(result: CollectionResult, tokenizer: Any, layers: list[int]) -> dict[int, str | None]:
    """Display strings of every token id the logit lens names (decoded once each)."""
    if result.lens is None:
        return {}
    ids = sorted({int(i) for layer in layers if layer in result.lens
                  for t in (result.lens[layer].top_ids, result.lens[layer].bottom_ids) for i in t.unique().tolist()})
    if tokenizer is None:
        return dict.fromkeys(ids)
    return dict(zip(ids, (storable(t) for t in tokenizer.batch_decode([[i] for i in ids])), strict=True))


def _feature_rows(run_id: int, result: CollectionResult, layer: int, start: int, stop: int,
                  decode: dict[int, str | None]) -> Iterator[dict[str, Any]]:
    s = result.stats[layer]
    sl = slice(start, stop)
    freq, mean = s.frequency()[sl].tolist(), s.mean_act()[sl].tolist()
    amax, hist = s.act_max[sl].tolist(), s.hist[sl].tolist()
    regions, think = s.regions[sl].tolist(), s.think_hist[sl].tolist()
    hist_edges = result.meta.get("hist_edges")
    think_edges = result.meta.get("think_pos_edges")
    lens = result.lens.get(layer) if result.lens is not None else None
    if lens is not None:
        lens_parts = [t[sl].tolist() for t in (lens.top_ids, lens.top_values, lens.bottom_ids, lens.bottom_values)]
        hes = lens.hesitation[sl].tolist() if lens.hesitation is not None else None
    nb = result.neighbours.get(layer) if result.neighbours is not None else None
    if nb is not None:
        nb_parts = [t[sl].tolist() for t in (nb.layer, nb.index, nb.cosine)]
    for n, index in enumerate(range(start, stop)):
        row = {
            "run_id": run_id, "layer": layer, "index": index, "frequency": freq[n], "max_act": amax[n],
            "mean_act": mean[n], "histogram": {"edges": hist_edges, "counts": hist[n]},
            "region_counts": dict(zip(REGION_NAMES, regions[n], strict=True)),
            "think_pos_hist": {"edges": think_edges, "counts": think[n]},
            "logit_lens": None, "neighbours": None, "hesitation_lens": None,
        }
        if lens is not None:
            ti, tv, bi, bv = (p[n] for p in lens_parts)
            row["logit_lens"] = {"top": [[i, decode.get(i), v] for i, v in zip(ti, tv, strict=True)],
                                 "bottom": [[i, decode.get(i), v] for i, v in zip(bi, bv, strict=True)]}
            if hes is not None:
                row["hesitation_lens"] = hes[n]
        if nb is not None:
            nl, ni, nc = (p[n] for p in nb_parts)
            row["neighbours"] = [[a, b, c] for a, b, c in zip(nl, ni, nc, strict=True) if a >= 0]
        yield row


def _token_rows(run_id: int, s: FeatureStats, lens: Any, start: int, stop: int,
                n_vocab: int | None) -> Iterator[dict[str, Any]]:
    """``feature_tokens`` rows of features ``start:stop``: the tokens each promotes and the tokens it fires on.

    Ids at or beyond ``n_vocab`` (a padded vocabulary's unused rows) are not tokens and are left out.
    """
    def real(token_id: int) -> bool:
        return token_id >= 0 and (n_vocab is None or token_id < n_vocab)

    if lens is not None:
        ids = lens.top_ids[start:stop, :PROMOTES_TOP].tolist()
        values = lens.top_values[start:stop, :PROMOTES_TOP].tolist()
        for n, (row_ids, row_values) in enumerate(zip(ids, values, strict=True)):
            seen: set[int] = set()
            for rank, (tid, value) in enumerate(zip(row_ids, row_values, strict=True)):
                if real(tid) and tid not in seen:
                    seen.add(tid)
                    yield {"run_id": run_id, "relation": "promotes", "token_id": tid, "layer": s.layer,
                           "index": start + n, "rank": rank, "value": float(value)}
    kept = s.top
    if "tokens" not in kept.data:
        return
    loc = kept.loc[start:stop]
    occupied = loc >= 0
    if not occupied.any():
        return
    feat, rank = occupied.nonzero(as_tuple=True)
    focus_ids = kept.data["tokens"][start:stop][occupied][:, s.ctx_before].tolist()
    values = kept.data["value"][start:stop][occupied].double().tolist()
    best: dict[tuple[int, int], tuple[int, float]] = {}  # (feature, token) -> (best rank, largest value)
    for f, r, tid, value in zip(feat.tolist(), rank.tolist(), focus_ids, values, strict=True):
        if not real(tid):
            continue
        old = best.get((f, tid))
        best[(f, tid)] = (r, value) if old is None else (min(old[0], r), max(old[1], value))
    for (f, tid), (r, value) in sorted(best.items()):
        yield {"run_id": run_id, "relation": "fires_on", "token_id": tid, "layer": s.layer, "index": start + f,
               "rank": r, "value": value}


def _example_rows(run_id: int, s: FeatureStats, start: int, stop: int,
                  sources: dict[int, int]) -> Iterator[dict[str, Any]]:
    for kind, kept in (("top", s.top), ("random", s.random)):
        yield from _kept_rows(run_id, s.layer, kind, kept, start, stop, s.ctx_before, sources)
    # Quantile buffers have one row per (feature, band): rows start*B:stop*B, rank = band * stride + slot.
    yield from _kept_rows(run_id, s.layer, "quantile", s.quantile, start * N_QUANTILE_BANDS, stop * N_QUANTILE_BANDS,
                          s.ctx_before, sources, bands=N_QUANTILE_BANDS)


def _kept_rows(run_id: int, layer: int, kind: str, kept: KeptExamples, start: int, stop: int,
               ctx_before: int, sources: dict[int, int], bands: int = 1) -> Iterator[dict[str, Any]]:
    if "tokens" not in kept.data:
        raise ValueError("the collection has no token windows; it must come from collect() or a merge of its results")
    loc = kept.loc[start:stop]
    occupied = loc >= 0
    if not occupied.any():
        return
    feat, rank = occupied.nonzero(as_tuple=True)
    tokens = kept.data["tokens"][start:stop][occupied]  # [n, W]
    acts = kept.data["acts"][start:stop][occupied].double()
    inside = tokens >= 0
    width = tokens.shape[1]
    first = torch.where(inside, torch.arange(width), width).amin(dim=1)
    last = torch.where(inside, torch.arange(width), -1).amax(dim=1) + 1
    max_act = acts.masked_fill(~inside, 0).amax(dim=1)
    acts = acts.round(decimals=ACT_DECIMALS)
    seqs, positions = (t.tolist() for t in unpack_loc(loc[occupied]))
    row = feat + start
    feature, rank = row // bands, rank + (row % bands) * (QUANTILE_RANK_STRIDE if bands > 1 else 0)
    for f, r, tok, act, a, b, m, seq, pos in zip(feature.tolist(), rank.tolist(), tokens.numpy(), acts.numpy(),
                                                 first.tolist(), last.tolist(), max_act.tolist(), seqs, positions,
                                                 strict=True):
        source = sources.get(seq)
        yield {"run_id": run_id, "layer": layer, "index": f, "kind": kind, "rank": r, "token_ids": tok[a:b],
               "acts": act[a:b], "focus": ctx_before - a, "max_act": m, "prompt_id": source,
               "prompt_pos": pos if source is not None else None}


def _bulk(conn: Connection, table: Table, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> int:
    """Insert rows: COPY on Postgres (psycopg 3), driver-level executemany elsewhere. Returns the row count.

    JSON columns are serialised here, once, so the driver gets plain tuples (SQLAlchemy's per-value
    type processing would double the cost of a large write).
    """
    tuples = (tuple(_dumps(row[c]) if c in _JSON_COLUMNS and row[c] is not None else row[c] for c in columns)
              for row in rows)
    if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg":
        return _copy(conn, table, columns, tuples)
    style = conn.dialect.paramstyle
    marks = {"qmark": "?", "format": "%s", "pyformat": "%s", "numeric": ":{i}", "named": ":c{i}"}[style]
    placeholders = ", ".join(marks.format(i=i + 1) for i in range(len(columns)))
    sql = f'INSERT INTO "{table.name}" ({", ".join(_quoted(c) for c in columns)}) VALUES ({placeholders})'
    n = 0
    for batch in _batched(tuples, INSERT_BATCH):
        if style == "named":
            batch = [{f"c{i + 1}": v for i, v in enumerate(t)} for t in batch]
        conn.exec_driver_sql(sql, batch)
        n += len(batch)
    return n


def _copy(conn: Connection, table: Table, columns: Sequence[str], tuples: Iterable[tuple]) -> int:
    cols = ", ".join(_quoted(c) for c in columns)
    raw = conn.connection.driver_connection  # the psycopg connection, inside the same transaction
    n = 0
    with raw.cursor() as cur, cur.copy(f'COPY "{table.name}" ({cols}) FROM STDIN') as copy:
        for t in tuples:
            copy.write_row(t)
            n += 1
    return n


def _dumps(value: Any) -> str:
    """JSON text of a value; numpy arrays become lists. orjson (≈10× faster on float lists) when installed."""
    if _orjson is not None:
        return _orjson.dumps(value, option=_orjson.OPT_SERIALIZE_NUMPY).decode()
    if hasattr(value, "tolist"):  # a numpy array
        value = value.tolist()
    return json.dumps(value, separators=(",", ":"))


def _quoted(column: str) -> str:
    return f'"{column}"'


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
