// The graph as the viewer holds it: nodes, links (typed arrays), adjacency lists, and the filters.
// Built once from the server's columnar view; the virtual logit-difference node is added on demand.

export const KINDS = ["feature", "error", "embedding", "logit"];
export const DIFF_ID = "logit-diff";

export function buildModel(view) {
  const c = view.nodes;
  const n = c.id.length;
  const nLayers = view.n_layers;
  const nodes = new Array(n);
  const byId = new Map();
  const byFeature = new Map();
  let nPos = 0;
  for (let i = 0; i < n; i++) {
    const kind = KINDS[c.kind[i]];
    const layer = c.layer[i];
    const row = kind === "embedding" ? 0 : kind === "logit" ? nLayers + 1 : layer + 1;
    const fkey = kind === "feature" ? `${layer}/${c.index[i]}` : null;
    const node = {
      i, id: c.id[i], kind, layer, row, pos: c.pos[i], index: c.index[i], influence: c.influence[i],
      activation: c.activation[i], clerp: c.clerp[i], prob: c.prob[i], target: c.target[i], fkey,
      card: fkey ? view.features[fkey] || null : null,
    };
    nodes[i] = node;
    byId.set(node.id, i);
    if (fkey) (byFeature.get(fkey) || byFeature.set(fkey, []).get(fkey)).push(i);
    nPos = Math.max(nPos, node.pos + 1);
  }
  const m = view.links.source.length;
  const model = {
    nodes, byId, byFeature, nLayers, nPos, n,
    src: Int32Array.from(view.links.source), tgt: Int32Array.from(view.links.target),
    w: Float64Array.from(view.links.weight), nLinks: m, diff: null,
    meta: {
      nTotal: view.n_nodes_total, nNotSent: view.n_not_sent, cutAt: view.cut_at_influence,
      linksTotal: view.n_links_total, sentThreshold: view.pruning_threshold,
    },
  };
  indexLinks(model);
  return model;
}

function indexLinks(model) {
  const N = model.nodes.length;
  const inL = Array.from({ length: N }, () => []);
  const outL = Array.from({ length: N }, () => []);
  const absIn = new Float64Array(N);
  for (let k = 0; k < model.nLinks; k++) {
    inL[model.tgt[k]].push(k);
    outL[model.src[k]].push(k);
    absIn[model.tgt[k]] += Math.abs(model.w[k]);
  }
  const pct = new Float64Array(model.nLinks);
  for (let k = 0; k < model.nLinks; k++) pct[k] = absIn[model.tgt[k]] > 0 ? model.w[k] / absIn[model.tgt[k]] : 0;
  Object.assign(model, { inL, outL, pct });
}

// The token text of a logit node (the server sends it as the node's clerp).
export function logitText(node) {
  return node.clerp;
}

// Add (or replace, or remove with pair = null) circuit-tracer's virtual "Logit diff: A − B" node, whose
// incoming weight from each source is w(→A) − w(→B). Returns false when A or B is not a logit here.
export function setLogitDiff(model, pair) {
  if (model.diff) {  // drop the previous virtual node and its links (they are always last)
    model.nodes.pop();
    model.byId.delete(DIFF_ID);
    model.nLinks = model.diff.firstLink;
    model.src = model.src.slice(0, model.nLinks);
    model.tgt = model.tgt.slice(0, model.nLinks);
    model.w = model.w.slice(0, model.nLinks);
    model.diff = null;
  }
  if (!pair) { indexLinks(model); return true; }
  const find = (text) => model.nodes.find((nd) => nd.kind === "logit" && logitText(nd) === text);
  const a = find(pair[0]), b = find(pair[1]);
  if (!a || !b) { indexLinks(model); return false; }
  const weights = new Map();
  for (let k = 0; k < model.nLinks; k++) {
    const t = model.tgt[k];
    if (t === a.i) weights.set(model.src[k], (weights.get(model.src[k]) || 0) + model.w[k]);
    else if (t === b.i) weights.set(model.src[k], (weights.get(model.src[k]) || 0) - model.w[k]);
  }
  const i = model.nodes.length;
  model.nodes.push({
    i, id: DIFF_ID, kind: "logit", diff: true, layer: model.nLayers + 1, row: model.nLayers + 1, pos: a.pos, index: -1,
    influence: null, activation: null, clerp: `Logit diff: ${pair[0]} − ${pair[1]}`, prob: 1, target: false,
    fkey: null, card: null,
  });
  model.byId.set(DIFF_ID, i);
  const first = model.nLinks;
  const extra = [...weights.entries()].filter(([, w]) => w !== 0);
  const grow = (arr, Ctor) => { const out = new Ctor(first + extra.length); out.set(arr.subarray(0, first)); return out; };
  model.src = grow(model.src, Int32Array);
  model.tgt = grow(model.tgt, Int32Array);
  model.w = grow(model.w, Float64Array);
  extra.forEach(([s, w], j) => { model.src[first + j] = s; model.tgt[first + j] = i; model.w[first + j] = w; });
  model.nLinks = first + extra.length;
  model.diff = { firstLink: first, pair, a: a.i, b: b.i };
  indexLinks(model);
  return true;
}

// Which nodes show, and why the others do not (the ledger counts these).
export function filterNodes(model, state, extra) {
  const { pruning, density } = state;
  const visible = new Uint8Array(model.nodes.length);
  const ledger = { pruning: 0, density: 0, pruningErrors: 0 };
  const keep = extra.keep;  // pinned ids, clicked id, group members
  for (const nd of model.nodes) {
    if (nd.kind === "embedding" || nd.kind === "logit" || keep.has(nd.id)) { visible[nd.i] = 1; continue; }
    if (pruning !== null && nd.influence !== null && nd.influence > pruning + 1e-12) {
      ledger.pruning += 1;
      if (nd.kind === "error") ledger.pruningErrors += 1;
      continue;
    }
    const freq = nd.card ? nd.card.frequency : null;
    if (nd.kind === "feature" && density !== null && density < 1 && freq !== null && freq !== undefined && freq > density) {
      ledger.density += 1;
      continue;
    }
    visible[nd.i] = 1;
  }
  let links = 0;
  for (let k = 0; k < model.nLinks; k++) if (visible[model.src[k]] && visible[model.tgt[k]]) links += 1;
  let nodes = 0;
  for (let i = 0; i < visible.length; i++) nodes += visible[i];
  ledger.linksHidden = model.nLinks - links;
  return { visible, nodes, links, ledger };
}

// Neuronpedia's density slider is logarithmic: slider p in [0, 1] -> (10^(2p) - 1) / 99 of tokens.
export function densityFromSlider(p) { return p >= 1 ? 1 : (Math.pow(10, 2 * p) - 1) / 99; }
export function sliderFromDensity(d) { return d >= 1 ? 1 : Math.log10(d * 99 + 1) / 2; }
