// The attribution graph as SVG: nodes by (layer, position), edges by weight and sign.
// Rows bottom→top: token embeddings, layers 0..L-1, logits. Hover shows the feature; click opens its page,
// or (with "click adds") toggles it in the ablation form. The slider hides edges below a share of max |weight|.
(function () {
  "use strict";
  const NS = "http://www.w3.org/2000/svg";
  const ROW_H = 56, LEFT = 56, BOTTOM = 96, TOP = 16, NODE_R = 6, GAP = 15;

  function el(tag, attrs, parent) {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (parent) parent.appendChild(e);
    return e;
  }

  function draw(root) {
    const data = JSON.parse(document.getElementById(root.dataset.graph).textContent);
    const nodes = data.nodes, links = data.links;
    const layers = nodes.filter((n) => n.kind === "feature" || n.kind === "error").map((n) => +n.layer).filter((x) => !isNaN(x));
    const nLayers = layers.length ? Math.max(...layers) + 1 : 1;
    const rowOf = (n) => n.kind === "embedding" ? 0 : n.kind === "logit" ? nLayers + 1 : (+n.layer + 1);
    const nPos = Math.max(data.prompt.length, ...nodes.map((n) => n.ctx_idx + 1), 1);
    const cells = {};
    nodes.forEach((n) => { (cells[rowOf(n) + ":" + n.ctx_idx] ||= []).push(n); });
    const fill = Math.max(44, Math.floor((root.clientWidth - LEFT - 24) / nPos));  // use the panel's width
    const colW = new Array(nPos).fill(fill);
    Object.entries(cells).forEach(([k, ns]) => { const p = +k.split(":")[1]; colW[p] = Math.max(colW[p], ns.length * GAP + 16); });
    const colX = []; let x = LEFT;
    colW.forEach((w, i) => { colX[i] = x; x += w; });
    const width = x + 16, height = TOP + (nLayers + 2) * ROW_H + BOTTOM;
    const pos = {};
    Object.entries(cells).forEach(([k, ns]) => {
      const [r, p] = k.split(":").map(Number);
      ns.sort((a, b) => Math.abs(b.influence || 0) - Math.abs(a.influence || 0));
      const start = colX[p] + colW[p] / 2 - ((ns.length - 1) * GAP) / 2;
      ns.forEach((n, i) => { pos[n.node_id] = [start + i * GAP, TOP + (nLayers + 1 - r) * ROW_H + ROW_H / 2]; });
    });

    const svg = el("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "attribution graph" });
    const axis = el("g", { class: "axis" }, svg);
    for (let r = 0; r <= nLayers + 1; r++) {
      const y = TOP + (nLayers + 1 - r) * ROW_H + ROW_H / 2;
      el("line", { x1: LEFT - 4, x2: width - 8, y1: y, y2: y, stroke: "#eef0f4" }, axis);
      const t = el("text", { x: 6, y: y + 4 }, axis);
      t.textContent = r === 0 ? "emb" : r === nLayers + 1 ? "logit" : "L" + (r - 1);
    }
    data.prompt.forEach((tok, p) => {
      if (colX[p] === undefined) return;
      const cx = colX[p] + colW[p] / 2, y = height - BOTTOM + 14;
      const t = el("text", { x: cx, y, transform: `rotate(40 ${cx} ${y})`, fill: p === data.position ? "#a4460f" : "#6b7280",
        "font-weight": p === data.position ? "700" : "400" }, axis);
      const label = tok.replace(/\n/g, "↵");
      t.textContent = label.length > 12 ? label.slice(0, 11) + "…" : label;
    });

    const maxW = Math.max(1e-12, ...links.map((e) => Math.abs(e.weight)));
    const edgeG = el("g", {}, svg), nodeG = el("g", {}, svg);
    const edges = links.map((e) => {
      const a = pos[e.source], b = pos[e.target];
      if (!a || !b) return null;
      const rel = Math.abs(e.weight) / maxW;
      const my = (a[1] + b[1]) / 2;
      const path = el("path", {
        class: "edge", d: `M${a[0]},${a[1]} C${a[0]},${my} ${b[0]},${my} ${b[0]},${b[1]}`,
        stroke: e.weight >= 0 ? "#4a7bd0" : "#d0474a", "stroke-width": (0.4 + 3.6 * rel).toFixed(2),
        "stroke-opacity": (0.25 + 0.6 * rel).toFixed(2), "data-source": e.source, "data-target": e.target,
      }, edgeG);
      return { e, rel, path };
    }).filter(Boolean);

    const colour = (n) => n.kind === "logit" ? "#3aa675" : n.kind === "embedding" ? "#8a8f98" : n.kind === "error" ? "#c9ced8"
      : n.role === "output" ? "#e8793a" : n.role === "template" ? "#2b5aa8" : "#b7bcc6";
    const nodeEls = {};
    nodes.forEach((n) => {
      const p = pos[n.node_id];
      if (!p) return;
      const g = el("g", { class: "node", "data-node-id": n.node_id, "data-kind": n.kind }, nodeG);
      if (n.fl) { g.dataset.layer = n.fl[0]; g.dataset.index = n.fl[1]; }
      const lines = [n.fl ? `L${n.fl[0]}/${n.fl[1]} @ pos ${n.ctx_idx}` : `${n.kind} @ pos ${n.ctx_idx}`];
      if (n.clerp) lines.push(n.clerp);
      if (n.top_tokens && n.top_tokens.length) lines.push("promotes: " + n.top_tokens.map((t) => JSON.stringify(t)).join(" "));
      if (n.label) lines.push(n.label);
      if (n.role) lines.push("role: " + n.role);
      if (n.activation !== null && n.activation !== undefined) lines.push("activation " + n.activation.toPrecision(3));
      if (n.influence !== null && n.influence !== undefined) lines.push("influence " + n.influence.toPrecision(3));
      g.dataset.tip = lines.join("\n");
      if (n.kind === "feature" || n.kind === "error") el("circle", { cx: p[0], cy: p[1], r: NODE_R, fill: colour(n), stroke: "#fff", "stroke-width": 1.5 }, g);
      else el("rect", { x: p[0] - NODE_R, y: p[1] - NODE_R, width: 2 * NODE_R, height: 2 * NODE_R, rx: 2, fill: colour(n), stroke: "#fff" }, g);
      nodeEls[n.node_id] = g;
      g.addEventListener("mouseenter", () => {
        edges.forEach(({ path }) => {
          const on = path.dataset.source === n.node_id || path.dataset.target === n.node_id;
          path.classList.toggle("dim", !on);
        });
      });
      g.addEventListener("mouseleave", () => edges.forEach(({ path }) => path.classList.remove("dim")));
      g.addEventListener("click", () => {
        if (!n.fl) return;
        const pick = document.querySelector("[data-pick-mode]");
        if (pick && pick.checked) togglePick(n, g);
        else window.location.href = `${data.feature_url}/${n.fl[0]}/${n.fl[1]}`;
      });
    });
    root.appendChild(svg);

    const slider = document.querySelector("[data-threshold]"), out = document.querySelector("[data-threshold-out]");
    function applyThreshold() {
      const t = slider ? +slider.value : 0;
      if (out) out.textContent = t.toFixed(2);
      const live = new Set();
      edges.forEach(({ e, rel, path }) => {
        const show = rel >= t;
        path.style.display = show ? "" : "none";
        if (show) { live.add(e.source); live.add(e.target); }
      });
      Object.entries(nodeEls).forEach(([id, g]) => g.classList.toggle("dim", !live.has(id) && g.dataset.kind === "feature"));
    }
    if (slider) slider.addEventListener("input", applyThreshold);
    applyThreshold();
  }

  function togglePick(n, g) {
    const form = document.querySelector("[data-ablate] [data-features]");
    if (!form) return;
    const key = `${n.fl[0]}:${n.fl[1]}`;
    const items = form.value.split(/[\s,]+/).filter(Boolean);
    const at = items.indexOf(key);
    if (at >= 0) items.splice(at, 1); else items.push(key);
    form.value = items.join(" ");
    document.querySelectorAll(`.node[data-layer="${n.fl[0]}"][data-index="${n.fl[1]}"]`).forEach((x) => x.classList.toggle("picked", at < 0));
    form.closest("details").open = true;
  }

  document.addEventListener("DOMContentLoaded", () => document.querySelectorAll("[data-graph]").forEach(draw));
})();
