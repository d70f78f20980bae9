// Drawing the link graph with d3 (circuit-tracer's layout): one column per prompt token, as wide as its
// busiest (token, layer) cell asks, the whole fitting the pane; rows bottom-up Emb, L0 … L(n-1), Lgt; in a
// cell the most influential (for logits: most probable) node is right-most.
//
// Layers, bottom to top: a canvas with the layer bands and the links; a canvas with every node's glyph
// (● feature, ◆ error, ■ token and logit, coloured by kind); an SVG with the axes, logit labels and a mark
// for each node in a state (pinned, clicked, grouped, hovered and its feature's other positions): a few
// elements whatever the graph's size, so thousands of nodes stay smooth. Hover and click find the nearest
// visible node within 30 px with a d3.quadtree.

/* global d3 */

const M = { left: 46, right: 16, top: 64, bottom: 76 };
const ROW_H = 44;  // px per layer row
const SPACING = 12;  // px between nodes of a cell, at most
const HOVER_PX = 30;
const R = 4.5;  // glyph radius, px
export const KIND_FILL = { feature: "#7fa6e6", error: "#c9ced8", embedding: "#5d6470", logit: "#3aa675", diff: "#e8793a" };
const LINKS_DRAWN_MAX = 1500;  // "all links" draws the strongest this many (circuit-tracer draws one node's)

export function kindClass(nd) {
  return nd.diff ? "diff" : nd.kind;
}

export function linkColour(pct) {
  // circuit-tracer: purple (−) … green (+) over pctInput clamped to ±0.4
  const t = Math.max(-0.4, Math.min(0.4, pct));
  return d3.interpolatePRGn(0.5 + t / 0.8);
}

export function linkWidth(pct) {
  return Math.min(3, Math.max(0.35, Math.sqrt(Math.abs(pct)) * 3 / Math.sqrt(0.4)));
}

function glyph(ctx, nd, x, y, r) {
  ctx.beginPath();
  if (nd.kind === "feature") ctx.arc(x, y, r, 0, 2 * Math.PI);
  else if (nd.kind === "error") { ctx.moveTo(x, y - r * 1.3); ctx.lineTo(x + r, y); ctx.lineTo(x, y + r * 1.3); ctx.lineTo(x - r, y); ctx.closePath(); }
  else ctx.rect(x - r, y - r, 2 * r, 2 * r);
}

function sizeCanvas(cv, width, height) {
  const dpr = window.devicePixelRatio || 1;
  if (cv.width !== Math.round(width * dpr) || cv.height !== Math.round(height * dpr)) {
    cv.width = Math.round(width * dpr);
    cv.height = Math.round(height * dpr);
    cv.style.width = width + "px";
    cv.style.height = height + "px";
  }
  const ctx = cv.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  return ctx;
}

export class LinkGraph {
  constructor(pane, { prompt, position, onHover, onClick }) {
    this.pane = pane;
    this.prompt = prompt;
    this.position = position;
    this.onHover = onHover;
    this.onClick = onClick;
    this.expand = 1;
    this.linkCanvas = d3.select(pane).append("canvas").attr("class", "graph-canvas").attr("data-links", "").node();
    this.nodeCanvas = d3.select(pane).append("canvas").attr("class", "graph-canvas").attr("data-node-canvas", "").node();
    this.svg = d3.select(pane).append("svg").attr("class", "graph-svg").attr("data-nodes", "")
      .attr("role", "img").attr("aria-label", "attribution graph");
    this.axis = this.svg.append("g").attr("class", "axis");
    this.labelG = this.svg.append("g").attr("class", "logit-labels");
    this.markG = this.svg.append("g").attr("class", "marks").attr("data-marks", "");
    this.ringG = this.svg.append("g").attr("class", "rings").attr("data-rings", "");
    this.svg.on("mousemove", (ev) => this.onHover(this.nearest(ev), ev))
      .on("mouseleave", () => this.onHover(null, null))
      .on("click", (ev) => this.onClick(this.nearest(ev), ev));
  }

  // Positions of the visible nodes; recomputed when the filters change (as circuit-tracer rebuilds).
  layout(model, visible) {
    const rows = model.nLayers + 2;
    const nPos = Math.max(model.nPos, this.prompt.length);
    const cells = new Map();
    for (const nd of model.nodes) {
      if (!visible[nd.i]) continue;
      const key = nd.pos * rows + nd.row;
      (cells.get(key) || cells.set(key, []).get(key)).push(nd);
    }
    const colCount = new Array(nPos).fill(1);
    for (const [key, list] of cells) {
      const p = Math.floor(key / rows);
      colCount[p] = Math.max(colCount[p], list.length);
    }
    // the graph fits the pane's width (× the "expand" factor), each column as wide as its busiest cell asks;
    // a crowded cell packs its nodes closer (they may touch) instead of widening the page
    const avail = Math.max(400, (this.pane.clientWidth - M.left - M.right) * this.expand);
    const want = colCount.map((k) => Math.min(k * SPACING + 14, 40 + k * 3));
    const scale = avail / want.reduce((a, b) => a + b, 0);
    const colX = [];
    let x = M.left;
    want.forEach((w, p) => { colX[p] = [x, x + w * scale]; x += w * scale; });
    const width = x + M.right;
    const height = M.top + rows * ROW_H + M.bottom;
    const rowY = (r) => M.top + (rows - 1 - r) * ROW_H + ROW_H / 2;
    for (const [key, list] of cells) {
      const p = Math.floor(key / rows);
      const r = key % rows;
      list.sort((a, b) => (a.kind === "logit" || b.kind === "logit") ? (b.prob - a.prob)
        : ((a.influence ?? 2) - (b.influence ?? 2)));  // rank 0 (most influential / probable) right-most
      const right = colX[p][1] - 7;
      const step = Math.min(SPACING, Math.max(0.5, (colX[p][1] - colX[p][0] - 8) / Math.max(list.length, 1)));
      list.forEach((nd, k) => { nd.x = right - k * step; nd.y = rowY(r); });
    }
    this.geom = { width, height, rows, colX, rowY, nPos };
    this.visibleNodes = model.nodes.filter((nd) => visible[nd.i]);
    this.quadtree = d3.quadtree(this.visibleNodes, (d) => d.x, (d) => d.y);
    this.svg.attr("width", width).attr("height", height).attr("viewBox", `0 0 ${width} ${height}`);
  }

  drawAxes() {
    const { rows, colX, rowY, nPos } = this.geom;
    const rowNames = (r) => r === 0 ? "Emb" : r === rows - 1 ? "Lgt" : "L" + (r - 1);
    this.axis.selectAll("*").remove();
    for (let r = 0; r < rows; r++) this.axis.append("text").attr("x", 6).attr("y", rowY(r) + 4).text(rowNames(r));
    const baseY = rowY(0) + ROW_H / 2 + 10;
    const every = Math.max(1, Math.ceil(nPos / Math.max(1, (colX[nPos - 1]?.[1] ?? 1) / 12)));
    for (let p = 0; p < nPos; p++) {
      if (!colX[p] || (p % every && p !== this.position)) continue;
      const cx = (colX[p][0] + colX[p][1]) / 2;
      const tok = (this.prompt[p] ?? "").replace(/\n/g, "↵").replace(/\t/g, "→").replace(/\r/g, "↵");
      this.axis.append("text").attr("class", p === this.position ? "tok-label here" : "tok-label")
        .attr("transform", `translate(${cx},${baseY}) rotate(40)`).text(tok.length > 14 ? tok.slice(0, 13) + "…" : tok);
    }
  }

  // Every visible node on the canvas; the marked ones (pinned, clicked, grouped) also get an SVG mark.
  drawNodes(view) {
    const { pinned, clicked, grouped, neighbourColour, labelOf } = view;
    const { width, height } = this.geom;
    const ctx = sizeCanvas(this.nodeCanvas, width, height);
    ctx.lineWidth = 0.8;
    ctx.strokeStyle = "#1d2330";
    for (const kind of ["error", "embedding", "feature", "logit"]) {  // one fill per kind, then the exceptions
      ctx.fillStyle = KIND_FILL[kind];
      ctx.globalAlpha = kind === "error" ? 0.75 : 1;
      ctx.beginPath();
      for (const nd of this.visibleNodes) {
        if (nd.kind !== kind || nd.diff || neighbourColour.has(nd.i)) continue;
        if (kind === "feature") { ctx.moveTo(nd.x + R, nd.y); ctx.arc(nd.x, nd.y, R, 0, 2 * Math.PI); }
        else if (kind === "error") { ctx.moveTo(nd.x, nd.y - R * 1.3); ctx.lineTo(nd.x + R, nd.y); ctx.lineTo(nd.x, nd.y + R * 1.3); ctx.lineTo(nd.x - R, nd.y); ctx.closePath(); }
        else ctx.rect(nd.x - R, nd.y - R, 2 * R, 2 * R);
      }
      ctx.fill();
      ctx.stroke();
    }
    ctx.globalAlpha = 1;
    for (const nd of this.visibleNodes) {
      const fill = neighbourColour.get(nd.i) || (nd.diff ? KIND_FILL.diff : null);
      if (!fill) continue;
      ctx.fillStyle = fill;
      glyph(ctx, nd, nd.x, nd.y, R);
      ctx.fill();
      ctx.stroke();
    }
    const marked = this.visibleNodes.filter((d) => pinned.has(d.id) || clicked === d.id || grouped.has(d.id) || d.diff);
    const sel = this.markG.selectAll("circle.mark").data(marked, (d) => d.id);
    sel.exit().remove();
    sel.enter().append("circle").attr("r", R + 2.5).merge(sel)
      .attr("data-node-id", (d) => d.id).attr("data-kind", (d) => kindClass(d))
      .attr("cx", (d) => d.x).attr("cy", (d) => d.y)
      .attr("class", (d) => {
        let c = "mark " + kindClass(d);
        if (pinned.has(d.id)) c += " pinned";
        if (clicked === d.id) c += " clicked";
        if (grouped.has(d.id)) c += " grouped";
        return c;
      });
    const logits = this.visibleNodes.filter((d) => d.kind === "logit");
    const lab = this.labelG.selectAll("text").data(logits, (d) => d.id);
    lab.exit().remove();
    lab.enter().append("text").attr("class", "logit-label").merge(lab)
      .attr("data-node-id", (d) => d.id)
      .attr("transform", (d) => `translate(${d.x - 2},${d.y - 9}) rotate(-50)`)
      .text((d) => (labelOf(d) || "").slice(0, 24));
  }

  // Links on the canvas, thin first, batched by colour; "all links" draws the strongest LINKS_DRAWN_MAX.
  drawLinks(model, linkIdx, emphasis) {
    const { width, height, rows, rowY } = this.geom;
    const ctx = sizeCanvas(this.linkCanvas, width, height);
    for (let r = 0; r < rows; r++) {  // the layer bands, under the links
      ctx.fillStyle = r === 0 || r === rows - 1 ? "#e9ebf0" : "#f4f5f8";
      ctx.fillRect(M.left - 4, rowY(r) - ROW_H / 2 + 1, width - M.left - M.right + 8, ROW_H - 2);
    }
    let order = Array.from(linkIdx);
    if (order.length > LINKS_DRAWN_MAX) {
      order.sort((a, b) => Math.abs(model.pct[b]) - Math.abs(model.pct[a]));
      order = order.slice(0, LINKS_DRAWN_MAX);
    }
    this.linksDrawn = order.length;
    ctx.globalAlpha = emphasis ? 0.95 : 0.55;
    ctx.lineCap = "round";
    const buckets = new Map();
    for (const k of order) {
      const pct = model.pct[k];
      const key = Math.round(Math.max(-0.4, Math.min(0.4, pct)) * 20) * 100 + Math.round(linkWidth(pct) * 4);
      (buckets.get(key) || buckets.set(key, []).get(key)).push(k);
    }
    const keys = [...buckets.keys()].sort((a, b) => (((a % 100) + 100) % 100) - (((b % 100) + 100) % 100));
    for (const key of keys) {
      const ks = buckets.get(key);
      const pct = model.pct[ks[0]];
      ctx.strokeStyle = linkColour(pct);
      ctx.lineWidth = linkWidth(pct);
      ctx.beginPath();
      for (const k of ks) {
        const a = model.nodes[model.src[k]], b = model.nodes[model.tgt[k]];
        ctx.moveTo(a.x, a.y);
        ctx.lineTo(b.x, b.y);
      }
      ctx.stroke();
    }
    return this.linksDrawn;
  }

  drawRings(hovered, same) {
    const data = hovered ? [{ nd: hovered, cls: "ring hovered" }, ...same.map((nd) => ({ nd, cls: "ring same" }))] : [];
    const sel = this.ringG.selectAll("circle").data(data, (d) => d.nd.id + d.cls);
    sel.exit().remove();
    sel.enter().append("circle").attr("r", 8).merge(sel)
      .attr("class", (d) => d.cls).attr("data-node-id", (d) => d.nd.id)
      .attr("cx", (d) => d.nd.x).attr("cy", (d) => d.nd.y);
  }

  nearest(ev) {
    if (!this.quadtree || !ev) return null;
    const [x, y] = d3.pointer(ev, this.svg.node());
    return this.quadtree.find(x, y, HOVER_PX) || null;
  }

  // Where a node is on the page (tests and benchmarks move the mouse there).
  clientPoint(nd) {
    const box = this.svg.node().getBoundingClientRect();
    return { x: box.left + nd.x, y: box.top + nd.y };
  }
}
