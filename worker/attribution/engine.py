"""Attribution graphs on the adapter model: ``attribute(model, input_ids) -> Graph``.

Follows circuit-tracer's algorithm (Ameisen et al. 2025, "Circuit Tracing"), on the adapter model
itself (no replacement model), linearised as in the transcoder-adapters paper (Hu et al. 2026,
hesitation study). The nodes that are not features depend on the mode:

- ``frozen-mlp``: the base MLP's output at each (layer, position) is an *error node*, as circuit-tracer's
  reconstruction-error nodes: a source whose value is that frozen vector, so it takes its share of every
  row's normalisation, of influence and of pruning exactly as circuit-tracer's do;
- ``relp``: the base MLP is linearised (half rule), so its contribution flows *through* it to features,
  tokens and other error-free paths: the only non-feature nodes are token embeddings and logits.

In both modes biases (and whatever an excluded BOS position writes) are per-row constants, not nodes.

Steps:

0. one forward caches the frozen quantities (:func:`worker.attribution.linearize.linearize`);
1. logit targets: the top tokens up to ``desired_logit_prob`` cumulative probability, at most
   ``max_n_logits``, plus ``target_token`` if asked; each a demeaned unembedding direction;
2. logit rows: one batched backward gives their edges to every active feature and token;
3. feature rows in influence order: rank the unvisited active features by their influence on the
   logits through the rows known so far (circuit-tracer's partial influence), compute the top ones in
   rounds, until ``max_feature_nodes`` features have rows (all of them when fewer are active);
4. the graph: the visited features, the tokens and the logits, edges among them; what non-node active
   features contribute is kept per row (``dropped_contributions``), as are the constants.

Edge weight = source activation × gradient of the target's pre-activation in the linearised model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from training.adapter import AdapterModel
from worker.attribution.backward import (
    ChunkResult,
    DecoderBlocks,
    MLPJacobians,
    chunk_passes,
    decoder_blocks,
    run_chunk,
)
from worker.attribution.graph import Graph
from worker.attribution.linearize import MODES, Linearization, LinearMode, linearize

logger = logging.getLogger(__name__)


def select_logits(logits: torch.Tensor, max_n_logits: int, desired_logit_prob: float,
                  target_token: int | None = None, *, n_real_tokens: int | None = None,
                  extra_tokens: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Top tokens until their probability reaches ``desired_logit_prob`` (at most ``max_n_logits``).

    ``target_token`` and then ``extra_tokens`` are always included (each replacing the least probable
    unforced token when the list is full). ``n_real_tokens``: ids at or above it are padding of the
    embedding matrix (a padded ``vocab_size``), never a logit node. Probabilities stay the softmax over
    the whole output. Returns (token ids [k], probabilities [k]), most probable first, forced tokens last.
    """
    probs = torch.softmax(logits.double(), -1)
    ranked = probs if n_real_tokens is None else probs[:n_real_tokens]
    top_p, top_i = ranked.sort(descending=True)
    cum = top_p.cumsum(0)
    k = min(int(torch.searchsorted(cum, torch.tensor(desired_logit_prob, dtype=cum.dtype))) + 1, max_n_logits,
            ranked.numel())
    chosen = top_i[:k].tolist()
    forced = list(dict.fromkeys(int(t) for t in ([target_token] if target_token is not None else [])
                                + list(extra_tokens)))
    if len(forced) > max_n_logits:
        raise ValueError(f"{len(forced)} forced logit tokens do not fit in max_n_logits={max_n_logits}")
    missing = [t for t in forced if t not in chosen]
    while len(chosen) + len(missing) > max_n_logits:  # drop the least probable token that is not forced
        drop = next(i for i in range(len(chosen) - 1, -1, -1) if chosen[i] not in forced)
        chosen.pop(drop)
    ids = torch.tensor(chosen + missing, dtype=torch.long, device=logits.device)
    return ids, probs[ids].to(logits.dtype)


@dataclass
class _Targets:
    """A set of targets ready for :func:`run_chunk`: layer (L for logits), position, seed, own constant."""

    layers: torch.Tensor
    positions: torch.Tensor
    seeds: torch.Tensor
    constants: torch.Tensor


def _logit_targets(lin: Linearization, token_ids: torch.Tensor) -> _Targets:
    T, L = lin.n_pos, lin.n_layers
    seeds = lin.demeaned_unembed(token_ids) * lin.final_ln * lin.r_final[T - 1]
    const = torch.zeros(len(token_ids), dtype=seeds.dtype, device=seeds.device)
    if lin.b_U is not None:
        const = lin.b_U[token_ids] - lin.b_U.mean()
    n = len(token_ids)
    return _Targets(torch.full((n,), L, dtype=torch.long, device=seeds.device),
                    torch.full((n,), T - 1, dtype=torch.long, device=seeds.device), seeds, const)


def _feature_targets(lin: Linearization, which: torch.Tensor) -> _Targets:
    """Targets for active features ``which`` (indices into the active list)."""
    layers, pos, idx = lin.feat_layer[which], lin.feat_pos[which], lin.feat_index[which]
    seeds = torch.empty(len(which), lin.d_model, dtype=lin.embeds.dtype, device=lin.embeds.device)
    const = torch.empty(len(which), dtype=lin.embeds.dtype, device=lin.embeds.device)
    for layer in layers.unique().tolist():
        m = layers == layer
        w = lin.weights[layer]
        seeds[m] = w.W_enc[idx[m]] * w.ln2 * lin.r2[layer, pos[m], None]
        const[m] = w.b_enc[idx[m]]
    return _Targets(layers, pos, seeds, const)


def _run_targets(lin: Linearization, dec: DecoderBlocks, tg: _Targets, batch_size: int,
                 bar: tqdm | None, jac: MLPJacobians | None = None) -> ChunkResult:
    """Rows for all of ``tg`` (in its order): chunked by position, each chunk sorted by layer."""
    n = int(tg.layers.numel())
    by_pos = torch.argsort(tg.positions * (lin.n_layers + 1) + (lin.n_layers - tg.layers), stable=True)
    chunks = []
    for start in range(0, n, batch_size):
        chunk = by_pos[start:start + batch_size]
        chunks.append(chunk[torch.argsort(tg.layers[chunk], descending=True, stable=True)])
    if jac is not None and chunks:
        jac.plan(sum(chunk_passes(lin.n_layers, lin.n_pos, tg.layers[c], tg.positions[c]) for c in chunks))
    feat = torch.empty(n, int(lin.feat_act.numel()), dtype=lin.embeds.dtype, device=lin.embeds.device)
    tok = torch.empty(n, lin.n_pos, dtype=lin.embeds.dtype, device=lin.embeds.device)
    const = torch.empty(n, dtype=lin.embeds.dtype, device=lin.embeds.device)
    err = None
    if lin.error_vectors is not None:
        err = torch.empty(n, lin.n_layers * lin.n_pos, dtype=lin.embeds.dtype, device=lin.embeds.device)
    for chunk in chunks:
        r = run_chunk(lin, dec, tg.layers[chunk], tg.positions[chunk], tg.seeds[chunk], tg.constants[chunk], jac)
        feat[chunk], tok[chunk], const[chunk] = r.feature_edges, r.token_edges, r.constants
        if err is not None:
            err[chunk] = r.error_edges
        if bar is not None:
            bar.update(len(chunk))
    return ChunkResult(feat, tok, const, err)


def partial_influence(feature_rows: torch.Tensor, token_rows: torch.Tensor, row_feature: torch.Tensor,
                      row_weights: torch.Tensor, max_iter: int = 1000,
                      error_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Influence of every active feature on the logits through the rows computed so far [n_active].

    Rows are targets (logits and visited features), columns sources; each row is normalised by its total
    |edge| (tokens and, in frozen-mlp, error nodes included, as circuit-tracer's partial influence). ``row_feature`` [rows]: the feature column a row belongs to (-1 for logit
    rows); ``row_weights`` [rows]: logit probabilities on logit rows, 0 elsewhere. The sum
    ``w A + w A² + …`` runs until nothing is left (the graph is acyclic).
    """
    absf = feature_rows.abs()
    norm = absf.sum(1) + token_rows.abs().sum(1)
    if error_rows is not None:
        norm = norm + error_rows.abs().sum(1)
    norm = norm.clamp(min=1e-10)
    A = absf / norm[:, None]
    x = row_weights.to(A.dtype)
    is_feat = row_feature >= 0
    total = torch.zeros(A.shape[1], dtype=A.dtype, device=A.device)
    for _ in range(max_iter):
        y = x @ A
        total += y
        x = torch.zeros_like(x)
        x[is_feat] = y[row_feature[is_feat]]
        if not bool(x.any()):
            return total
    raise RuntimeError(f"influence did not converge in {max_iter} iterations (is the graph acyclic?)")


def attribute(model: AdapterModel, input_ids: torch.Tensor, *, mode: LinearMode = "relp",
              max_feature_nodes: int = 10_000, max_n_logits: int = 10, desired_logit_prob: float = 0.95,
              batch_size: int = 32, round_size: int = 1024, target_token: int | None = None,
              progress: bool = True, dtype: torch.dtype | None = None, exclude_bos: bool = True,
              bos_token_id: int | None = None, jacobian_budget_mb: float = 512.0, n_real_tokens: int | None = None,
              extra_logit_tokens: tuple[int, ...] = ()) -> Graph:
    """Attribution graph of the adapter model on one prompt ``input_ids`` [seq] (logits at the last position).

    - ``mode``: ``relp`` (half rule, σ frozen) or ``frozen-mlp`` (circuit-tracer: base MLP outputs constant).
    - ``max_feature_nodes``: feature nodes (features with rows), chosen by influence on the logits.
    - ``max_n_logits`` / ``desired_logit_prob``: logit targets; ``target_token`` is always one of them.
    - ``batch_size``: targets per backward pass (chunks of nearby positions); ``round_size``: features
      ranked and computed per influence round when not every active feature fits.
    - ``dtype``: compute dtype (default the model's; float64 for exactness checks).
    - ``exclude_bos``: features at position 0 are no nodes when token 0 is BOS (``bos_token_id``,
      default the model config's); their output is a constant.
    - ``jacobian_budget_mb``: relp only, memory for per-position MLP Jacobians (0 disables them).
    - ``n_real_tokens``: the tokenizer's size when the model's vocabulary is padded beyond it: padded ids
      never become logit nodes.
    - ``extra_logit_tokens``: further tokens that must be logit nodes (e.g. the other side of a logit
      difference).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1:
        raise ValueError(f"input_ids must be a 1-D tensor [seq], got {getattr(input_ids, 'shape', input_ids)!r}")
    for name, val in (("max_feature_nodes", max_feature_nodes), ("max_n_logits", max_n_logits),
                      ("batch_size", batch_size), ("round_size", round_size)):
        if int(val) < 1:
            raise ValueError(f"{name} must be at least 1, got {val}")
    if not 0.0 < desired_logit_prob <= 1.0:
        raise ValueError(f"desired_logit_prob must be in (0, 1], got {desired_logit_prob}")
    vocab = model.hf.lm_head.weight.shape[0]
    real = vocab if n_real_tokens is None else min(int(n_real_tokens), vocab)
    for name, tok in [("target_token", target_token)] + [("extra_logit_tokens", t) for t in extra_logit_tokens]:
        if tok is not None and not 0 <= int(tok) < real:
            raise ValueError(f"{name} {tok} outside the vocabulary [0, {real})")

    t0 = time.perf_counter()
    lin = linearize(model, input_ids, mode, dtype=dtype, exclude_bos=exclude_bos, bos_token_id=bos_token_id)
    dec = decoder_blocks(lin)
    jac = MLPJacobians(lin, int(jacobian_budget_mb * 2**20)) if mode == "relp" and jacobian_budget_mb > 0 else None
    n_active = int(lin.feat_act.numel())
    logger.info("phase 0: forward and frozen quantities in %.2fs; %d active features", time.perf_counter() - t0,
                n_active)

    t1 = time.perf_counter()
    logit_ids, logit_p = select_logits(lin.logits, max_n_logits, desired_logit_prob, target_token,
                                       n_real_tokens=real, extra_tokens=tuple(extra_logit_tokens))
    budget = min(max_feature_nodes, n_active)
    bar = tqdm(total=len(logit_ids) + budget, desc="attribution", unit="target", disable=not progress)
    logit_rows = _run_targets(lin, dec, _logit_targets(lin, logit_ids), batch_size, bar)
    logger.info("phase 1: %d logit rows in %.2fs", len(logit_ids), time.perf_counter() - t1)

    t2 = time.perf_counter()
    rows_f, rows_t, rows_c = [logit_rows.feature_edges], [logit_rows.token_edges], [logit_rows.constants]
    rows_e = [logit_rows.error_edges] if logit_rows.error_edges is not None else None
    row_feature = [torch.full((len(logit_ids),), -1, dtype=torch.long, device=lin.embeds.device)]
    visited = torch.zeros(n_active, dtype=torch.bool, device=lin.embeds.device)
    n_rounds = 0
    while int(visited.sum()) < budget:
        left = budget - int(visited.sum())
        unvisited = (~visited).nonzero().squeeze(1)
        if left >= unvisited.numel():
            todo = unvisited  # everything fits: no ranking needed
        else:
            weights = torch.zeros(sum(len(r) for r in row_feature), dtype=lin.embeds.dtype, device=visited.device)
            weights[:len(logit_ids)] = logit_p
            infl = partial_influence(torch.cat(rows_f), torch.cat(rows_t), torch.cat(row_feature), weights,
                                     error_rows=torch.cat(rows_e) if rows_e is not None else None)
            infl[visited] = -1.0
            todo = torch.topk(infl, min(round_size, left)).indices
        r = _run_targets(lin, dec, _feature_targets(lin, todo), batch_size, bar, jac)
        rows_f.append(r.feature_edges)
        rows_t.append(r.token_edges)
        rows_c.append(r.constants)
        if rows_e is not None:
            rows_e.append(r.error_edges)
        row_feature.append(todo)
        visited[todo] = True
        n_rounds += 1
    bar.close()
    logger.info("phase 2: %d feature rows in %d rounds, %.2fs", budget, n_rounds, time.perf_counter() - t2)

    graph = _assemble(lin, logit_ids, logit_p, torch.cat(rows_f), torch.cat(rows_t), torch.cat(rows_c),
                      torch.cat(row_feature), torch.cat(rows_e) if rows_e is not None else None, settings={
                          "mode": mode, "max_feature_nodes": max_feature_nodes, "max_n_logits": max_n_logits,
                          "desired_logit_prob": desired_logit_prob, "batch_size": batch_size,
                          "round_size": round_size, "target_token": target_token, "rounds": n_rounds,
                          "extra_logit_tokens": [int(t) for t in extra_logit_tokens],
                          "mlp_jacobians": sum(jac.cut) if jac is not None else 0,
                          "backward_chunks": _n_chunks(len(logit_ids), batch_size) + _n_chunks(budget, batch_size),
                      })
    logger.info("attribution done in %.2fs: %d nodes", time.perf_counter() - t0, graph.n_nodes)
    return graph


def _n_chunks(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def _assemble(lin: Linearization, logit_ids: torch.Tensor, logit_p: torch.Tensor, feat_rows: torch.Tensor,
              tok_rows: torch.Tensor, consts: torch.Tensor, row_feature: torch.Tensor,
              err_rows: torch.Tensor | None, settings: dict) -> Graph:
    """Square adjacency over (selected features, error nodes, tokens, logits); non-node feature columns summed."""
    n_logits, T = len(logit_ids), lin.n_pos
    n_err = 0 if err_rows is None else lin.n_layers * T
    selected = row_feature[row_feature >= 0].sort().values
    n_sel = int(selected.numel())
    tok0 = n_sel + n_err
    n_nodes = tok0 + T + n_logits
    dt, dev = lin.embeds.dtype, lin.embeds.device
    adj = torch.zeros(n_nodes, n_nodes, dtype=dt, device=dev)
    values = torch.zeros(n_nodes, dtype=dt, device=dev)
    const = torch.zeros(n_nodes, dtype=dt, device=dev)
    dropped = torch.zeros(n_nodes, dtype=dt, device=dev)
    # node index of each row: logit rows come first in the row list, then feature rows
    node_of_col = torch.full((int(lin.feat_act.numel()),), -1, dtype=torch.long, device=dev)
    node_of_col[selected] = torch.arange(n_sel, device=dev)
    row_node = torch.empty(len(row_feature), dtype=torch.long, device=dev)
    is_logit = row_feature < 0
    row_node[is_logit] = tok0 + T + torch.arange(n_logits, device=dev)
    row_node[~is_logit] = node_of_col[row_feature[~is_logit]]
    adj[row_node, :n_sel] = feat_rows[:, selected]
    if err_rows is not None:
        adj[row_node, n_sel:tok0] = err_rows
    adj[row_node, tok0:tok0 + T] = tok_rows
    const[row_node] = consts
    dropped[row_node] = feat_rows.sum(1) - feat_rows[:, selected].sum(1)
    values[:n_sel] = lin.feat_act[selected]  # active features: pre-activation = activation
    values[tok0 + T:] = lin.logits[logit_ids] - lin.logits.mean()
    active = torch.stack([lin.feat_layer, lin.feat_pos, lin.feat_index], 1)
    return Graph(
        input_ids=lin.input_ids.cpu(), active_features=active.cpu(), activation_values=lin.feat_act.cpu(),
        selected_features=selected.cpu(), adjacency_matrix=adj.cpu(), logit_tokens=logit_ids.cpu(),
        logit_probabilities=logit_p.cpu(), target_values=values.cpu(), constant_contributions=const.cpu(),
        dropped_contributions=dropped.cpu(), mode=lin.mode, n_layers=lin.n_layers,
        n_features_per_layer=lin.n_features, target_token=settings.get("target_token"), settings=settings,
        n_error_nodes=n_err,
    )
