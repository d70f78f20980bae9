"""Attribution graphs on the adapter model (circuit-tracer's algorithm on the linearised adapter model).

Public API: :func:`attribute` → :class:`Graph`; :func:`prune_graph` → :class:`PrunedGraph`;
:func:`to_circuit_tracer_json` / :func:`from_circuit_tracer_json` for the viewer's JSON.
"""

from worker.attribution.engine import attribute
from worker.attribution.export import from_circuit_tracer_json, to_circuit_tracer_json
from worker.attribution.graph import (
    Graph,
    GraphNode,
    PrunedGraph,
    compute_graph_scores,
    compute_node_influence,
    prune_graph,
)

__all__ = [
    "Graph",
    "GraphNode",
    "PrunedGraph",
    "attribute",
    "compute_graph_scores",
    "compute_node_influence",
    "from_circuit_tracer_json",
    "prune_graph",
    "to_circuit_tracer_json",
]
