// Drawing the link graph with d3 (circuit-tracer's layout): one column per prompt token, as wide as its
// busiest (token, layer) cell; rows bottom-up Emb, L0 … L(n-1), Lgt; in a cell the most influential (for
// logits: most probable) node is right-most. Nodes are SVG paths (d3.symbol: ● feature, ◆ error,
// ■ token and logit); links are drawn on a canvas underneath, so thousands stay smooth; hover uses a
// d3.quadtree over the visible nodes (nearest node within 30 px).

/* global d3 */

const M = { left: 46, right: 16, top: 64, bottom: 76 };
const ROW_H = 44;  // px per layer row
const SPACING = 12;  // px between nodes of a cell
const HOVER_PX = 30;
const SYMBOL = { feature: "circle", error: "diamond", embedding: "square", logit: "square" };

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

export class LinkGraph {
  constructor(pane, { prompt, position, onHover, onClick }) {
    this.pane = pane;
    this.prompt = prompt;
    this.position = position;
    this.onHover = onHover;
    this.onClick = onClick;
    this.canvas = d3.select(pane).append("canvas").attr("class", "links-canvas").attr("data-links", "").node();
    this.svg = d3.select(pane).append("svg").attr("class", "graph-svg").attr("data-nodes", "")
      .attr("role", "img").attr("aria-label", "attribution graph");
    this.axis = this.svg.append("g").attr("class", "axis");
    this.nodeG = this.svg.append("g").attr("class", "nodes");
    this.ringG = this.svg.append("g").attr("class", "rings").attr("data-rings", "");
    this.labelG = this.svg.append("g").attr("class", "logit-labels");
    this.symbols = {};
    for (const [k, s] of Object.entries(SYMBOL)) {
      const type = { circle: d3.symbolCircle, diamond: d3.symbolDiamond, square: d3.symbolSquare }[s];
      this.symbols[k] = d3.symbol(type, k === "feature" ? 64 : 72)();
    }
    this.svg.on("mousemove", (ev) => this._hover(ev)).on("mouseleave", () => this._hover(null))
      .on("click", (ev) => {
        const nd = this.nearest(ev);
        this.onClick(nd, ev);
      });
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
    const avail = Math.max(400, this.pane.clientWidth - M.left - M.right);
    const want = colCount.map((k) => k * SPACING + 14);
    const total = want.reduce((a, b) => a + b, 0);
    const scale = total < avail ? avail / total : 1;
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
      const step = Math.min(SPACING, (colX[p][1] - colX[p][0] - 8) / Math.max(list.length, 1));
      list.forEach((nd, k) => { nd.x = right - k * step; nd.y = rowY(r); });
    }
    this.geom = { width, height, rows, colX, rowY, nPos };
    this.visibleNodes = model.nodes.filter((nd) => visible[nd.i]);
    this.quadtree = d3.quadtree(this.visibleNodes, (d) => d.x, (d) => d.y);
  }

  drawAxes(nLayers) {
    const { width, rows, colX, rowY, nPos } = this.geom;
    const rowNames = (r) => r === 0 ? "Emb" : r === rows - 1 ? "Lgt" : "L" + (r - 1);
    this.axis.selectAll("*").remove();
    for (let r = 0; r < rows; r++) {
      const y = rowY(r);
      this.axis.append("text").attr("x", 6).attr("y", y + 4).text(rowNames(r));
    }
    const baseY = rowY(0) + ROW_H / 2 + 10;
    for (let p = 0; p < nPos; p++) {
      if (!colX[p]) continue;
      const cx = (colX[p][0] + colX[p][1]) / 2;
      const tok = (this.prompt[p] ?? "").replace(/\n/g, "↵").replace(/\t/g, "→").replace(/\r/g, "↵");
      this.axis.append("text").attr("class", p === this.position ? "tok-label here" : "tok-label")
        .attr("transform", `translate(${cx},${baseY}) rotate(40)`).text(tok.length > 14 ? tok.slice(0, 13) + "…" : tok);
    }
    void nLayers;
  }

  // The node glyphs (one path each) with their state classes.
  drawNodes(view) {
    const { pinned, clicked, grouped, neighbourColour, labelOf } = view;
    const { width, height } = this.geom;
    this.svg.attr("width", width).attr("height", height).attr("viewBox", `0 0 ${width} ${height}`);
    const sel = this.nodeG.selectAll("path.node").data(this.visibleNodes, (d) => d.id);
    sel.exit().remove();
    sel.enter().append("path")
      .attr("data-node-id", (d) => d.id).attr("data-kind", (d) => kindClass(d))
      .attr("data-layer", (d) => d.kind === "feature" ? d.layer : null)
      .attr("data-index", (d) => d.kind === "feature" ? d.index : null)
      .attr("data-pos", (d) => d.pos)
      .attr("d", (d) => this.symbols[d.kind])
      .merge(sel)
      .attr("transform", (d) => `translate(${d.x},${d.y})`)
      .attr("class", (d) => {
        let c = "node " + kindClass(d);
        if (pinned.has(d.id)) c += " pinned";
        if (clicked === d.id) c += " clicked";
        if (grouped.has(d.id)) c += " grouped";
        return c;
      })
      .style("fill", (d) => neighbourColour.get(d.i) || null);
    const logits = this.visibleNodes.filter((d) => d.kind === "logit");
    const lab = this.labelG.selectAll("text").data(logits, (d) => d.id);
    lab.exit().remove();
    lab.enter().append("text").attr("class", "logit-label").merge(lab)
      .attr("transform", (d) => `translate(${d.x - 2},${d.y - 9}) rotate(-50)`)
      .text((d) => (labelOf(d) || "").slice(0, 24));
    void height;
  }

  // Links on the canvas: those of ``linkIdx`` (indices into the model's link arrays), thin first.
  drawLinks(model, linkIdx, emphasis) {
    const { width, height } = this.geom;
    const dpr = window.devicePixelRatio || 1;
    const cv = this.canvas;
    if (cv.width !== Math.round(width * dpr) || cv.height !== Math.round(height * dpr)) {
      cv.width = Math.round(width * dpr);
      cv.height = Math.round(height * dpr);
      cv.style.width = width + "px";
      cv.style.height = height + "px";
    }
    const ctx = cv.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    // the layer bands go on the canvas, under the links (SVG shapes would cover them)
    const { rows, rowY } = this.geom;
    for (let r = 0; r < rows; r++) {
      ctx.fillStyle = r === 0 || r === rows - 1 ? "#e9ebf0" : "#f4f5f8";
      ctx.fillRect(M.left - 4, rowY(r) - ROW_H / 2 + 1, width - M.left - M.right + 8, ROW_H - 2);
    }
    const order = Array.from(linkIdx).sort((a, b) => Math.abs(model.pct[a]) - Math.abs(model.pct[b]));
    ctx.globalAlpha = emphasis ? 0.95 : 0.55;
    ctx.lineCap = "round";
    // batch by colour bucket: far fewer strokes than one per link
    const buckets = new Map();
    for (const k of order) {
      const pct = model.pct[k];
      const key = Math.round(Math.max(-0.4, Math.min(0.4, pct)) * 20) * 100 + Math.round(linkWidth(pct) * 4);
      (buckets.get(key) || buckets.set(key, []).get(key)).push(k);
    }
    const keys = [...buckets.keys()].sort((a, b) => (a % 100) - (b % 100));
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
    if (!this.quadtree) return null;
    const [x, y] = d3.pointer(ev, this.svg.node());
    return this.quadtree.find(x, y, HOVER_PX) || null;
  }

  _hover(ev) {
    this.onHover(ev ? this.nearest(ev) : null, ev);
  }
}
