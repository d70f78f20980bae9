// The panes around the link graph: the clicked node's connections and mini feature card, the pinned
// subgraph with supernodes, "ablate pinned" and the "new graph" form. Every text goes in with
// textContent (labels come from URLs and files: never markup).

/* global d3 */
import { kindClass, linkColour } from "./render.js";

const GLYPH = { feature: "●", error: "◆", embedding: "■", logit: "■", diff: "■" };

export function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") e.textContent = v;
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

export function fmt(x, digits = 3) {
  if (x === null || x === undefined || !Number.isFinite(x)) return "–";
  return Math.abs(x) >= 1000 || (Math.abs(x) < 1e-3 && x !== 0) ? x.toExponential(2) : x.toFixed(digits);
}

export function nodeTitle(nd) {
  if (nd.kind === "feature") return `L${nd.layer}/${nd.index} @ ${nd.pos}`;
  if (nd.kind === "error") return `Err L${nd.layer} @ ${nd.pos}`;
  if (nd.kind === "embedding") return `Emb @ ${nd.pos}`;
  return nd.diff ? "Logit diff" : `Logit @ ${nd.pos}`;
}

function layerName(nd) {
  return nd.kind === "embedding" ? "Emb" : nd.kind === "logit" ? "Lgt" : "L" + nd.layer;
}

// -- the clicked node ----------------------------------------------------------------------------------

export function renderNodePanel(root, nd, ctx) {
  const { model, labelOf, visible, featureUrl, pinned } = ctx;
  root.replaceChildren();
  delete root.dataset.nodeId;
  if (!nd) {
    root.append(el("p", { class: "muted small", text: "Click a node to see its inputs and outputs; ctrl/⌘-click to pin it." }));
    return;
  }
  root.dataset.nodeId = nd.id;
  const head = el("div", { class: "np-head" },
    el("span", { class: "glyph " + kindClass(nd), text: GLYPH[kindClass(nd)] }),
    el("b", { class: "fid", text: nodeTitle(nd) }), " ", el("span", { class: "np-label", "data-np-label": true, text: labelOf(nd) || "" }));
  const meta = el("div", { class: "np-meta small muted" });
  const bits = [];
  if (nd.activation !== null) bits.push(`activation ${fmt(nd.activation)}`);
  if (nd.influence !== null) bits.push(`influence ${fmt(nd.influence)} (cumulative share at its rank)`);
  if (nd.kind === "logit" && !nd.diff) bits.push(`p = ${fmt(nd.prob)}${nd.target ? " · target" : ""}`);
  meta.textContent = bits.join(" · ");
  const actions = el("div", { class: "np-actions" },
    el("button", { type: "button", class: "button small", "data-pin-toggle": nd.id, text: pinned.has(nd.id) ? "Unpin" : "Pin" }),
    el("button", { type: "button", class: "button small", "data-edit-label": nd.id, text: "Edit label" }));
  root.append(head, meta, actions);
  if (nd.kind === "feature") root.append(featureCard(nd, featureUrl));
  const lists = el("div", { class: "np-lists" });
  const sides = [["Input", model.inL[nd.i], (k) => model.src[k]], ["Output", model.outL[nd.i], (k) => model.tgt[k]]];
  for (const [name, links, other] of sides) {
    const col = el("div", { class: "np-col", "data-side": name.toLowerCase() });
    col.append(el("h4", { text: `${name} (${links.length})` }));
    for (const sign of ["positive", "negative"]) {
      const chosen = links.filter((k) => (sign === "positive" ? model.w[k] > 0 : model.w[k] < 0))
        .sort((a, b) => Math.abs(model.pct[b]) - Math.abs(model.pct[a]));
      const list = el("ul", { class: "conn-list", "data-sign": sign });
      col.append(el("div", { class: "small muted", text: `${sign} (${chosen.length})` }), list);
      for (const k of chosen.slice(0, 200)) {
        const o = model.nodes[other(k)];
        const dir = o.pos < nd.pos ? "←" : o.pos > nd.pos ? "→" : "·";
        const li = el("li", { class: "conn" + (visible[o.i] ? "" : " hidden-node"), "data-node-id": o.id },
          el("span", { class: "dir", text: dir }), el("span", { class: "lay", text: layerName(o) }),
          el("span", { class: "lab", text: labelOf(o) || nodeTitle(o) }),
          el("span", { class: "w", text: (model.w[k] >= 0 ? "+" : "") + fmt(model.w[k]) }));
        li.style.setProperty("--c", linkColour(model.pct[k]));
        li.title = `pctInput ${fmt(100 * model.pct[k], 1)}% of ${name === "Input" ? "this node's" : "its target's"} input`;
        list.append(li);
      }
    }
    lists.append(col);
  }
  root.append(lists);
}

function featureCard(nd, featureUrl) {
  const card = nd.card || {};
  const box = el("div", { class: "mini-card", "data-feature-card": nd.fkey });
  box.append(el("div", {},
    el("a", { class: "fid", href: `${featureUrl}/${nd.layer}/${nd.index}`, "data-feature-link": true, text: `feature L${nd.layer}/${nd.index} →` }),
    card.role ? el("span", { class: "badge role-" + card.role, text: card.role }) : null));
  if (card.label) box.append(el("div", { class: "small", text: card.label }));
  const toks = (title, list, cls) => {
    if (!list || !list.length) return null;
    return el("div", { class: "lens-row " + cls }, el("span", { class: "small muted", text: title + " " }),
      ...list.map((t) => el("code", { class: "tokchip", text: t.replace(/\n/g, "↵") })));
  };
  box.append(toks("promotes", card.top, "pos") || el("div", { class: "small muted", text: card.top ? "no logit lens collected" : "loading…" }));
  const bottom = toks("suppresses", card.bottom, "neg");
  if (bottom) box.append(bottom);
  if (card.frequency !== null && card.frequency !== undefined) {
    box.append(el("div", { class: "small muted", text: `fires on ${fmt(100 * card.frequency, 2)}% of tokens · max act ${fmt(card.max_act)}` }));
  }
  return box;
}

// -- the pinned subgraph and supernodes ----------------------------------------------------------------

// Units of the subgraph: a supernode (its members) or a single pinned node.
export function subgraphUnits(state, model) {
  const inGroup = new Map();
  state.supernodes.forEach((g, gi) => g.slice(1).forEach((id) => inGroup.set(id, gi)));
  const units = state.supernodes.map((g, gi) => ({ key: "g" + gi, label: g[0], members: g.slice(1), group: gi }));
  for (const id of state.pinned) if (!inGroup.has(id)) units.push({ key: id, label: null, members: [id], group: null });
  units.forEach((u) => { u.nodes = u.members.map((id) => model.byId.get(id)).filter((i) => i !== undefined); });
  return units.filter((u) => u.nodes.length);
}

export function renderSubgraph(root, units, ctx) {
  const { model, labelOf, selected, groupMode } = ctx;
  root.replaceChildren();
  if (!units.length) {
    root.append(el("p", { class: "muted small", text: "ctrl/⌘-click nodes to pin them into a subgraph." }));
    return;
  }
  const unitOf = new Map();
  units.forEach((u, ui) => u.nodes.forEach((i) => unitOf.set(i, ui)));
  // layout: x by position, y by layer (top = logits), like the link graph
  const W = Math.max(root.clientWidth || 640, 320), boxW = 118, boxH = 30;
  const posOf = (u) => d3.mean(u.nodes, (i) => model.nodes[i].pos);
  const rowOf = (u) => d3.mean(u.nodes, (i) => model.nodes[i].row);
  const rows = [...new Set(units.map(rowOf))].sort((a, b) => b - a);
  const byRow = d3.group(units, rowOf);
  const H = rows.length * (boxH + 34) + 20;
  const svg = d3.select(root).append("svg").attr("class", "sub-svg").attr("width", W).attr("height", H);
  const pos = new Map();
  rows.forEach((r, ri) => {
    const us = byRow.get(r).sort((a, b) => posOf(a) - posOf(b));
    us.forEach((u, k) => pos.set(u, [((k + 1) * W) / (us.length + 1), 16 + ri * (boxH + 34) + boxH / 2]));
  });
  // group edges: links between units summed by pctInput, self-loops dropped
  const sums = new Map();
  for (let k = 0; k < model.nLinks; k++) {
    const a = unitOf.get(model.src[k]), b = unitOf.get(model.tgt[k]);
    if (a === undefined || b === undefined || a === b) continue;
    sums.set(a + ">" + b, (sums.get(a + ">" + b) || 0) + model.pct[k]);
  }
  const edges = [...sums.entries()].map(([key, v]) => { const [a, b] = key.split(">").map(Number); return { a, b, v }; });
  svg.append("g").selectAll("line").data(edges).enter().append("line").attr("class", "sub-edge")
    .attr("x1", (d) => pos.get(units[d.a])[0]).attr("y1", (d) => pos.get(units[d.a])[1])
    .attr("x2", (d) => pos.get(units[d.b])[0]).attr("y2", (d) => pos.get(units[d.b])[1])
    .attr("stroke", (d) => linkColour(d.v)).attr("stroke-width", (d) => Math.min(8, 0.5 + Math.abs(d.v) * 15));
  const g = svg.append("g").selectAll("g").data(units).enter().append("g")
    .attr("class", (u) => "sub-unit" + (u.group !== null ? " supernode" : "") + (u.nodes.some((i) => selected.has(model.nodes[i].id)) ? " selected" : ""))
    .attr("data-unit", (u) => u.key)
    .attr("data-members", (u) => u.members.join(","))
    .attr("transform", (u) => `translate(${pos.get(u)[0] - boxW / 2},${pos.get(u)[1] - boxH / 2})`);
  g.append("title").text((u) => (u.group !== null ? `[${u.label}] ` : "") + u.nodes.map((i) => labelOf(model.nodes[i]) || nodeTitle(model.nodes[i])).join(" · "));
  g.append("rect").attr("width", boxW).attr("height", boxH).attr("rx", 5);
  g.append("text").attr("class", "sub-label").attr("x", 6).attr("y", 13)
    .attr("data-group-label", (u) => u.group !== null ? u.group : null)
    .text((u) => (u.group !== null ? `[${u.label}]` : (labelOf(model.nodes[u.nodes[0]]) || "")).slice(0, 20));
  g.append("text").attr("class", "sub-id").attr("x", 6).attr("y", 25)
    .text((u) => u.group !== null ? `${u.nodes.length} nodes` : nodeTitle(model.nodes[u.nodes[0]]));
  g.filter((u) => u.group !== null).append("text").attr("class", "ungroup").attr("x", boxW - 12).attr("y", 12)
    .attr("data-ungroup", (u) => u.group).text("×");
  if (groupMode) root.classList.add("grouping"); else root.classList.remove("grouping");
}

// -- ablate pinned ---------------------------------------------------------------------------------------

// The distinct (layer, index) features among pinned nodes and group members, with their positions.
export function pinnedFeatures(state, model) {
  const ids = new Set(state.pinned);
  state.supernodes.forEach((g) => g.slice(1).forEach((id) => ids.add(id)));
  const feats = new Map();
  for (const id of ids) {
    const i = model.byId.get(id);
    if (i === undefined) continue;
    const nd = model.nodes[i];
    if (nd.kind !== "feature") continue;
    const key = `${nd.layer}:${nd.index}`;
    (feats.get(key) || feats.set(key, []).get(key)).push(nd.pos);
  }
  return feats;
}

export function renderAblateFeatures(root, feats) {
  root.replaceChildren();
  if (!feats.size) {
    root.append(el("span", { class: "muted small", text: "no pinned features" }));
    return;
  }
  for (const [key, positions] of feats) {
    root.append(el("code", { class: "tokchip", "data-ap-feature": key, text: `${key} @ ${positions.sort((a, b) => a - b).join(",")}` }), " ");
  }
}

export function renderAblationStatus(root, data, url) {
  root.replaceChildren();
  const a = data.ablation || {};
  root.append(el("div", {}, el("a", { href: url, "data-ablation-link": true, text: `Ablation #${a.id}` }),
    el("span", { class: "small muted", text: ` · ${a.status}${data.done ? "" : " …"}` })));
  const s = a.summary || {};
  if (data.divergence !== null && data.divergence !== undefined) {
    root.append(el("div", { class: "small", text: `first divergence at step ${data.divergence}` }));
  }
  const target = s.target;  // the worker's report on the graph's target token, per condition
  if (target && typeof target === "object") {
    const rows = Object.entries(target).filter(([, v]) => v && typeof v === "object").map(([cond, v]) =>
      `${cond}: p(first) ${fmt(v.p_first)}${v.first ? ", generated first" : ""}${v.produced ? "" : ", never produced"}`);
    root.append(el("div", { class: "small", "data-ap-target": true },
      el("code", { class: "tokchip", text: String(target.text ?? target.token_id) }), " " + rows.join(" · ")));
  }
  (data.conditions || []).forEach((c) => {
    const text = c.tokens.map((t) => t.text).join("");
    root.append(el("div", { class: "small ap-cond", "data-condition": c.name },
      el("b", { text: c.name + ": " }), el("span", { class: "mono", text: text.slice(0, 400) })));
  });
}
