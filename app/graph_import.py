"""Import a graph file (circuit-tracer, Neuronpedia or our own export) into the store, torch-free.

The CLI (``adapterlens import-graph``) and the API (``POST /api/runs/{run}/graphs/import``) call
:func:`import_graph`. The file is read by :func:`app.formats.normalize_graph` (both error-id forms; the
current one is stored), filed under a run with a slug (the file's by default; a re-import replaces it),
and its metadata is kept whole in ``params["metadata"]`` so that exporting the row gives the file back.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.db.graphs import index_graph_features
from app.db.schema import Graph, Run
from app.db.text import storable
from app.db.write import upsert
from app.formats import GraphFile, GraphFormatError, normalize_graph, parse_node

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 200 * 2**20  # bytes: larger graph files are refused (prune them first)
SLUG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
TOKEN_STR_MAX = 200  # characters: the width of graphs.target_token_str


class GraphImportError(ValueError):
    """A file that cannot be imported; ``status_code`` is what an HTTP route answers."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


def slug_for(text: str) -> str:
    """A valid slug from a file's slug or name (letters, digits, ``_.-``; at most 200 characters)."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-._")[:200]
    return s if s and SLUG_RE.match(s) else "imported-graph"


def _prompt_ids(f: GraphFile) -> list[int] | None:
    """Token ids of the prompt from the embedding nodes (``E_{vocab}_{pos}``), when every position has one."""
    by_pos: dict[int, int] = {}
    for n in f.nodes:
        if n.kind == "embedding":
            _, _, vocab, pos = parse_node(n)
            by_pos[pos] = vocab
    n_pos = len(f.metadata.prompt_tokens)
    if not by_pos or sorted(by_pos) != list(range(max(n_pos, max(by_pos) + 1))):
        return None
    return [by_pos[p] for p in sorted(by_pos)]


def graph_row(run_id: int, f: GraphFile, slug: str) -> dict[str, Any]:
    """The ``graphs`` row for a normalised file."""
    meta = f.metadata
    ours = (meta.model_extra or {}).get("adapterlens") or {}
    logits = [n for n in f.nodes if n.kind == "logit"]
    target = next((n for n in logits if n.is_target_logit), None) or max(logits, key=lambda n: n.token_prob,
                                                                       default=None)
    target_id, target_str, position = None, None, None
    if target is not None:
        _, _, target_id, position = parse_node(target)
        m = re.match(r'^Output "(.*)" \(p=', target.clerp or "", re.S)
        target_str = storable(m.group(1))[:TOKEN_STR_MAX] if m else None
    prune = meta.pruning_settings
    params: dict[str, Any] = {
        "mode": ours.get("mode") or "imported",
        "node_threshold": prune.node_threshold if prune and prune.node_threshold is not None else meta.node_threshold,
        "edge_threshold": prune.edge_threshold if prune else None,
        "scan": meta.scan, "transcoder_list": meta.transcoder_list, "prompt_tokens": meta.prompt_tokens,
        "metadata": meta.model_dump(mode="json", exclude_none=True),
        "qParams": f.qParams.model_dump(mode="json"),
        "imported": {"file_slug": meta.slug, "generator": (meta.info.generator.name if meta.info and
                                                           meta.info.generator else None)},
    }
    ids = ours.get("input_ids") or _prompt_ids(f)
    if ids:
        params["prompt_token_ids"] = [int(i) for i in ids]
    for key in ("n_error_nodes", "non_feature_nodes", "logit_diff"):
        if key in ours:
            params[key] = ours[key]
    scores = ours.get("scores") if isinstance(ours.get("scores"), dict) else {}
    return {
        "run_id": run_id, "slug": slug, "prompt_id": None, "prompt": storable(meta.prompt),
        "target_token_id": target_id, "target_token_str": target_str, "position": position, "params": params,
        "nodes": [n.model_dump(mode="json", exclude_none=True) for n in f.nodes],
        "links": [e.model_dump(mode="json") for e in f.links],
        "scores": {**scores, "n_nodes": len(f.nodes), "n_links": len(f.links),
                   "n_pruned_features": sum(n.kind == "feature" for n in f.nodes)},
    }


def import_graph(session: Session, run_id: int, data: Any, *, slug: str | None = None) -> tuple[int, int, int]:
    """Validate ``data`` (a parsed graph file) and store it in run ``run_id``; returns (graph id, nodes, links).

    The caller commits. A re-import under the same slug replaces the row.
    """
    if session.get(Run, run_id) is None:
        raise GraphImportError(f"no run {run_id}", 404)
    try:
        f = normalize_graph(data)
    except GraphFormatError as exc:
        raise GraphImportError(str(exc)) from None
    if slug is not None and not SLUG_RE.match(slug):
        raise GraphImportError(f"slug {slug!r}: use letters, digits and _.- (at most 200 characters)")
    row = graph_row(run_id, f, slug or slug_for(f.metadata.slug))
    (graph_id,) = upsert(session, Graph, row, key=["run_id", "slug"])
    index_graph_features(session, int(graph_id), run_id, row["nodes"])
    log.info("imported graph %r into run %d: %d nodes, %d links", row["slug"], run_id, len(f.nodes), len(f.links))
    return int(graph_id), len(f.nodes), len(f.links)


def parse_graph_bytes(raw: bytes) -> Any:
    if len(raw) > MAX_FILE_BYTES:
        raise GraphImportError(f"the file has {len(raw) / 2**20:.0f} MB; the limit is {MAX_FILE_BYTES // 2**20} MB",
                               413)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GraphImportError(f"not JSON: {exc}") from None


def ensure_import_run(session: Session, name: str, model: str) -> int:
    """A run to file foreign graphs under (found by name, or created with status ``imported``)."""
    from sqlalchemy import select

    row = session.scalar(select(Run).where(Run.name == name))
    if row is None:
        row = Run(name=name[:200], base_model=model[:500], target_model=model[:500], config={}, status="imported")
        session.add(row)
        session.flush()
    return int(row.id)


def import_graph_file(session: Session, run_id: int, path: Path, *, slug: str | None = None) -> tuple[int, int, int]:
    """:func:`import_graph` on a file (``.json`` or ``.json.gz``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GraphImportError(f"no file at {path}", 404)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        import gzip

        raw = gzip.decompress(raw)
    return import_graph(session, run_id, parse_graph_bytes(raw), slug=slug)
