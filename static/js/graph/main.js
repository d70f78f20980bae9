// The graph page: loads the pruned view from the server, then keeps the view state (pins, groups, labels,
// thresholds, selection, logit difference) in the URL and redraws on every change.

import { buildModel, densityFromSlider, DIFF_ID, filterNodes, setLogitDiff, sliderFromDensity } from "./model.js";
import {
  el, fmt, nodeTitle, pinnedFeatures, renderAblateFeatures, renderAblationStatus, renderNodePanel, renderSubgraph,
  subgraphUnits,
} from "./panels.js";
import { LinkGraph, linkColour } from "./render.js";
import { readState, writeState } from "./state.js";

const $ = (sel, root = document) => root.querySelector(sel);
const POLL_MS = 1000;

function debounce(fn, ms) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}

class GraphPage {
  constructor(config) {
    this.cfg = config;
    this.defaults = { pruning: config.node_threshold ?? 1 };
    this.state = readState(window.location.search);
    if (this.state.pruning === null) this.state.pruning = this.defaults.pruning;
    if (this.state.density === null) this.state.density = 1;
    if (!this.state.logitDiff && config.logit_diff && !new URLSearchParams(window.location.search).has("logitDiff")) {
      this.state.logitDiff = config.logit_diff;
    }
    this.selected = new Set();  // subgraph nodes picked for a supernode
    this.cardsPending = new Set();
    this.groupMode = false;
    this.hovered = null;
    this.pane = $("[data-graph-pane]");
    this.stats = { lastRenderMs: null };
  }

  async load(threshold) {
    const q = new URLSearchParams();
    if (threshold !== null && threshold !== undefined) q.set("pruningThreshold", String(threshold));
    const keep = [...this.state.pinned, ...(this.state.clickedId ? [this.state.clickedId] : [])];
    this.state.supernodes.forEach((g) => keep.push(...g.slice(1)));
    if (keep.length) q.set("keep", keep.join(","));
    const resp = await fetch(this.cfg.view_url + (q.toString() ? "?" + q : ""));
    if (!resp.ok) throw new Error(`the graph did not load: ${resp.status}`);
    const view = await resp.json();
    this.model = buildModel(view);
    this.loadedCut = threshold ?? null;
    if (this.state.logitDiff && !setLogitDiff(this.model, this.state.logitDiff)) this.state.logitDiff = null;
    this.fillLogitDiff();
    $("[data-loading]")?.remove();
    if (!this.graph) {
      this.graph = new LinkGraph(this.pane, {
        prompt: this.cfg.prompt, position: this.cfg.position,
        onHover: (nd, ev) => this.hover(nd, ev), onClick: (nd, ev) => this.click(nd, ev),
      });
    }
    this.render();
    document.body.dataset.graphReady = "true";
  }

  labelOf(nd) {
    if (!nd) return "";
    const own = this.state.clerps.get(nd.id);
    if (own !== undefined) return own;
    if (nd.kind === "feature") {
      const byNumber = this.state.clerps.get(String(cantor(nd.layer, nd.index)));
      if (byNumber !== undefined) return byNumber;
      return nd.clerp || (nd.card && nd.card.label) || (nd.card && nd.card.top && nd.card.top.length ? "↑" + JSON.stringify(nd.card.top[0]) : "");
    }
    if (nd.kind === "embedding") return `Emb: “${(this.cfg.prompt[nd.pos] ?? "").replace(/\n/g, "↵")}”`;
    if (nd.kind === "error") return `Err: mlp “${(this.cfg.prompt[nd.pos] ?? "").replace(/\n/g, "↵")}” L${nd.layer}`;
    if (nd.diff) return nd.clerp;
    return `“${nd.clerp}” p=${fmt(nd.prob)}`;
  }

  groupLabelOf(nd) {
    const g = this.state.supernodes.find((s) => s.slice(1).includes(nd.id));
    const own = this.labelOf(nd);
    return g ? `[${g[0]}] ${own}` : own;
  }

  keepSet() {
    const keep = new Set(this.state.pinned);
    if (this.state.clickedId) keep.add(this.state.clickedId);
    this.state.supernodes.forEach((g) => g.slice(1).forEach((id) => keep.add(id)));
    keep.add(DIFF_ID);
    return keep;
  }

  // Filters, layout, glyphs, links, panels, ledger, URL: the whole redraw after any change.
  render() {
    const t0 = performance.now();
    const m = this.model;
    if (this.state.clickedId && !m.byId.has(this.state.clickedId)) this.state.clickedId = null;
    const f = filterNodes(m, this.state, { keep: this.keepSet() });
    this.filtered = f;
    this.graph.layout(m, f.visible);
    this.graph.drawAxes();
    const clicked = this.state.clickedId ? m.byId.get(this.state.clickedId) : undefined;
    const neighbourColour = new Map();
    let links;
    if (clicked !== undefined) {  // circuit-tracer: only the clicked node's links, neighbours coloured
      links = [...m.inL[clicked], ...m.outL[clicked]].filter((k) => f.visible[m.src[k]] && f.visible[m.tgt[k]]);
      links.forEach((k) => neighbourColour.set(m.src[k] === clicked ? m.tgt[k] : m.src[k], linkColour(m.pct[k])));
    } else if ($("[data-all-links]")?.checked) {
      links = [];
      for (let k = 0; k < m.nLinks; k++) if (f.visible[m.src[k]] && f.visible[m.tgt[k]]) links.push(k);
    } else {  // linkType "both": links among pinned nodes
      const pins = this.keepSet();
      links = [];
      for (let k = 0; k < m.nLinks; k++) if (pins.has(m.nodes[m.src[k]].id) && pins.has(m.nodes[m.tgt[k]].id)) links.push(k);
    }
    const grouped = new Set();
    this.state.supernodes.forEach((g) => g.slice(1).forEach((id) => grouped.add(id)));
    this.graph.drawNodes({ pinned: this.state.pinned, clicked: this.state.clickedId, grouped, neighbourColour,
      labelOf: (nd) => this.labelOf(nd) });
    const drawn = this.graph.drawLinks(m, links, clicked !== undefined);
    this.renderLedger(f, links.length, drawn);
    this.renderPanels();
    this.syncControls();
    this.url = writeState(this.state, this.defaults);
    this.stats.lastRenderMs = performance.now() - t0;
    this.pane.dataset.renderMs = this.stats.lastRenderMs.toFixed(1);
    this.pane.dataset.renders = String(Number(this.pane.dataset.renders || 0) + 1);
  }

  renderLedger(f, selected, drawn) {
    const m = this.model;
    $("[data-live-counts]").textContent = `${f.nodes} of ${m.nodes.length} nodes · ${f.links} of ${m.nLinks} links shown`;
    $("[data-live-counts]").dataset.nodes = String(f.nodes);
    $("[data-live-counts]").dataset.links = String(f.links);
    const ledger = $("[data-ledger]");
    ledger.replaceChildren();
    const item = (key, n, text) => { if (n) ledger.append(el("li", { "data-ledger-item": key, "data-count": n, text: `${n} ${text}` })); };
    item("pruning", f.ledger.pruning, `nodes hidden by the pruning threshold (influence > ${this.state.pruning})` +
      (f.ledger.pruningErrors ? `, ${f.ledger.pruningErrors} of them error nodes` : ""));
    item("density", f.ledger.density, `features hidden by the density threshold (fire on > ${fmt(100 * this.state.density, 2)}% of tokens)`);
    item("server", m.meta.nNotSent, `nodes not loaded (pruned on the server${m.meta.cutAt !== null ? `, influence ≥ ${fmt(m.meta.cutAt)}` : ""})`);
    item("links", f.ledger.linksHidden, "links hidden with their nodes");
    if (selected < f.links) item("links-drawn", f.links - selected, "links not drawn (only the clicked node's, or pinned ones)");
    if (drawn < selected) item("links-weak", selected - drawn, `weaker links not drawn (the strongest ${drawn} are; click a node for all of its links)`);
    const kinds = {};
    for (const nd of m.nodes) if (f.visible[nd.i]) kinds[nd.diff ? "diff" : nd.kind] = (kinds[nd.diff ? "diff" : nd.kind] || 0) + 1;
    this.pane.dataset.kinds = JSON.stringify(kinds);
  }

  // circuit-tracer fetches feature data lazily on click (and caches it): so does the mini card
  async fetchCard(nd) {
    if (!nd || nd.kind !== "feature" || (nd.card && nd.card.top) || this.cardsPending.has(nd.fkey)) return;
    this.cardsPending.add(nd.fkey);
    try {
      const resp = await fetch(`${this.cfg.cards_url}?features=${encodeURIComponent(nd.fkey)}`);
      if (!resp.ok) return;
      const cards = await resp.json();
      const card = cards[nd.fkey];
      if (!card) return;
      for (const i of this.model.byFeature.get(nd.fkey) || []) this.model.nodes[i].card = { ...(this.model.nodes[i].card || {}), ...card };
      if (this.state.clickedId && this.model.nodes[this.model.byId.get(this.state.clickedId)]?.fkey === nd.fkey) this.renderPanels();
    } finally {
      this.cardsPending.delete(nd.fkey);
    }
  }

  renderPanels() {
    const m = this.model;
    const clicked = this.state.clickedId ? m.nodes[m.byId.get(this.state.clickedId)] : null;
    this.fetchCard(clicked);
    renderNodePanel($("[data-node-panel]"), clicked, {
      model: m, labelOf: (nd) => this.groupLabelOf(nd), visible: this.filtered.visible,
      featureUrl: this.cfg.feature_url, pinned: this.state.pinned,
    });
    const units = subgraphUnits(this.state, m);
    renderSubgraph($("[data-subgraph-body]"), units, {
      model: m, labelOf: (nd) => this.labelOf(nd), selected: this.selected, groupMode: this.groupMode,
    });
    $("[data-pin-count]").textContent = String(this.state.pinned.size);
    $("[data-make-group]").disabled = this.selected.size < 2;
    const apRoot = $("[data-ap-features]");
    if (apRoot) {
      const feats = pinnedFeatures(this.state, m);
      renderAblateFeatures(apRoot, feats);
      const btn = $("[data-ablate-pinned-submit]");
      btn.disabled = feats.size === 0;
      btn.textContent = feats.size ? `Ablate pinned (${feats.size} feature${feats.size > 1 ? "s" : ""})` : "Ablate pinned";
    }
  }

  syncControls() {
    const p = $("[data-pruning]");
    p.value = String(this.state.pruning);
    $("[data-pruning-out]").textContent = Number(this.state.pruning).toFixed(2);
    const d = $("[data-density]");
    d.value = String(sliderFromDensity(this.state.density));
    $("[data-density-out]").textContent = this.state.density >= 1 ? "all" : fmt(100 * this.state.density, 2) + "%";
    const sel = $("[data-logit-diff]");
    sel.value = this.state.logitDiff ? this.state.logitDiff.join("__vs__") : "";
  }

  fillLogitDiff() {
    const sel = $("[data-logit-diff]");
    const logits = this.model.nodes.filter((nd) => nd.kind === "logit" && !nd.diff).sort((a, b) => b.prob - a.prob);
    sel.replaceChildren(el("option", { value: "", text: "none" }));
    for (const a of logits) {
      for (const b of logits) {
        if (a === b) continue;
        sel.append(el("option", { value: `${a.clerp}__vs__${b.clerp}`, text: `${JSON.stringify(a.clerp)} − ${JSON.stringify(b.clerp)}` }));
      }
    }
  }

  // Where a visible node is on the page, scrolled into view (tests and benchmarks point the mouse there).
  nodePoint(id) {
    const i = this.model.byId.get(id);
    if (i === undefined || !this.filtered.visible[i]) return null;
    const nd = this.model.nodes[i];
    const pane = this.pane;
    if (nd.x < pane.scrollLeft + 20 || nd.x > pane.scrollLeft + pane.clientWidth - 20) pane.scrollLeft = nd.x - pane.clientWidth / 2;
    if (nd.y < pane.scrollTop + 20 || nd.y > pane.scrollTop + pane.clientHeight - 20) pane.scrollTop = nd.y - pane.clientHeight / 2;
    return this.graph.clientPoint(nd);
  }

  hover(nd, ev) {
    const tip = document.getElementById("tip");
    if (!nd) {
      this.hovered = null;
      this.graph.drawRings(null, []);
      if (tip) tip.hidden = true;
      return;
    }
    this.hovered = nd;
    const same = nd.fkey ? (this.model.byFeature.get(nd.fkey) || []).filter((i) => i !== nd.i && this.filtered.visible[i])
      .map((i) => this.model.nodes[i]) : [];
    this.graph.drawRings(nd, same);
    if (tip && ev) {
      const lines = [nodeTitle(nd), this.groupLabelOf(nd)];
      if (same.length) lines.push(`also at position${same.length > 1 ? "s" : ""} ${same.map((o) => o.pos).join(", ")} (ringed)`);
      if (nd.activation !== null) lines.push(`activation ${fmt(nd.activation)}`);
      tip.textContent = lines.filter(Boolean).join("\n");
      tip.hidden = false;
      tip.style.left = Math.min(ev.clientX + 12, window.innerWidth - tip.offsetWidth - 8) + "px";
      tip.style.top = ev.clientY + 16 + "px";
    }
  }

  click(nd, ev) {
    if (nd && (ev.ctrlKey || ev.metaKey)) { this.togglePin(nd.id); return; }
    this.state.clickedId = nd && this.state.clickedId !== nd.id ? nd.id : null;
    this.render();
  }

  togglePin(id) {
    if (this.state.pinned.has(id)) {
      this.state.pinned.delete(id);
      // Neuronpedia: unpinning drops the node from its group; a group left with one member vanishes
      this.state.supernodes = this.state.supernodes.map((g) => g.filter((x, k) => k === 0 || x !== id)).filter((g) => g.length >= 3);
      this.selected.delete(id);
    } else {
      this.state.pinned.add(id);
    }
    this.render();
  }

  makeGroup() {
    const ids = [...this.selected].filter((id) => this.state.pinned.has(id));
    if (ids.length < 2) return;
    const input = $("[data-group-label]");
    const members = new Set(ids);
    let label = input.value.trim();
    // selecting a member of a group merges that group, keeping its label
    const keep = [];
    for (const g of this.state.supernodes) {
      if (g.slice(1).some((id) => members.has(id))) {
        g.slice(1).forEach((id) => members.add(id));
        if (!label) label = g[0];
      } else keep.push(g);
    }
    if (!label) {
      const first = this.model.nodes[this.model.byId.get(ids[0])];
      label = (first && this.labelOf(first)) || "supernode";
    }
    this.state.supernodes = [...keep, [label.slice(0, 200), ...members]];
    this.selected.clear();
    input.value = "";
    this.render();
  }

  bind() {
    const onPruning = debounce(() => this.maybeReload(), 300);
    $("[data-pruning]").addEventListener("input", (ev) => {
      this.state.pruning = Number(ev.target.value);
      this.render();
      onPruning();
    });
    $("[data-density]").addEventListener("input", (ev) => {
      this.state.density = Number(densityFromSlider(Number(ev.target.value)).toPrecision(3));
      this.render();
    });
    $("[data-all-links]").addEventListener("change", () => this.render());
    $("[data-expand]").addEventListener("change", (ev) => { if (this.graph) { this.graph.expand = Number(ev.target.value); this.render(); } });
    $("[data-logit-diff]").addEventListener("change", (ev) => {
      const v = ev.target.value;
      this.state.logitDiff = v ? v.split("__vs__") : null;
      if (!setLogitDiff(this.model, this.state.logitDiff)) this.state.logitDiff = null;
      this.render();
    });
    $("[data-copy-link]").addEventListener("click", async (ev) => {
      const url = window.location.origin + this.url;
      ev.target.dataset.copied = url;
      try { await navigator.clipboard.writeText(url); ev.target.textContent = "Copied"; } catch (e) { ev.target.textContent = "Link in the address bar"; }
    });
    $("[data-clear]").addEventListener("click", () => {
      Object.assign(this.state, { pinned: new Set(), supernodes: [], clerps: new Map(), clickedId: null });
      this.selected.clear();
      this.render();
    });
    $("[data-node-panel]").addEventListener("click", (ev) => {
      const pin = ev.target.closest("[data-pin-toggle]");
      if (pin) { this.togglePin(pin.dataset.pinToggle); return; }
      const edit = ev.target.closest("[data-edit-label]");
      if (edit) { this.editLabel(edit.dataset.editLabel); return; }
      const row = ev.target.closest("li.conn");
      if (row) {
        if (ev.ctrlKey || ev.metaKey) this.togglePin(row.dataset.nodeId);
        else { this.state.clickedId = row.dataset.nodeId; this.render(); }
      }
    });
    const sub = $("[data-subgraph-body]");
    sub.addEventListener("click", (ev) => {
      const x = ev.target.closest("[data-ungroup]");
      if (x) {
        this.state.supernodes.splice(Number(x.dataset.ungroup), 1);
        this.render();
        return;
      }
      const labelEl = ev.target.closest("[data-group-label]");
      if (labelEl && !this.groupMode && !this.gHeld) { this.renameGroup(Number(labelEl.dataset.groupLabel)); return; }
      const unit = ev.target.closest("[data-unit]");
      if (!unit) return;
      const members = unit.dataset.members.split(",");
      if (this.groupMode || this.gHeld) {
        const on = members.some((id) => this.selected.has(id));
        members.forEach((id) => (on ? this.selected.delete(id) : this.selected.add(id)));
        this.render();
      } else if (ev.ctrlKey || ev.metaKey) {
        members.forEach((id) => this.togglePin(id));
      } else {
        this.state.clickedId = members[0];
        this.render();
      }
    });
    $("[data-group-mode]").addEventListener("click", (ev) => {
      this.groupMode = !this.groupMode;
      ev.target.classList.toggle("on", this.groupMode);
      if (!this.groupMode) this.selected.clear();
      this.render();
    });
    $("[data-make-group]").addEventListener("click", () => this.makeGroup());
    document.addEventListener("keydown", (ev) => {
      if (ev.key === "g" && !/INPUT|TEXTAREA|SELECT/.test(ev.target.tagName)) this.gHeld = true;
      if (ev.key === "Escape" && this.state.clickedId) { this.state.clickedId = null; this.render(); }
    });
    document.addEventListener("keyup", (ev) => {
      if (ev.key === "g" && this.gHeld) { this.gHeld = false; if (this.selected.size >= 2) this.makeGroup(); }
    });
    window.addEventListener("resize", debounce(() => this.render(), 200));
    this.bindAblate();
  }

  async maybeReload() {  // a graph loaded pruned on the server: fetch more when the slider asks for it
    if (this.loadedCut !== null && this.state.pruning > this.loadedCut) await this.load(this.state.pruning);
  }

  editLabel(id) {
    const nd = this.model.nodes[this.model.byId.get(id)];
    const span = $("[data-np-label]");
    if (!nd || !span) return;
    const input = el("input", { type: "text", maxlength: "200", "data-label-input": true });
    input.value = this.labelOf(nd);
    span.replaceChildren(input);
    input.focus();
    const save = () => {
      const v = input.value.trim();
      if (v) this.state.clerps.set(id, v); else this.state.clerps.delete(id);
      this.render();
    };
    input.addEventListener("keydown", (ev) => { if (ev.key === "Enter") save(); if (ev.key === "Escape") this.render(); });
    input.addEventListener("blur", save, { once: true });
  }

  renameGroup(gi) {
    const g = this.state.supernodes[gi];
    const label = document.querySelector(`[data-group-label="${gi}"]`);
    if (!g || !label) return;
    const input = el("input", { type: "text", maxlength: "200", "data-rename-group": gi });
    input.value = g[0];
    $("[data-subgraph] .sub-tools").append(input);
    input.focus();
    const save = () => { const v = input.value.trim(); if (v) g[0] = v; input.remove(); this.render(); };
    input.addEventListener("keydown", (ev) => { if (ev.key === "Enter") input.blur(); });
    input.addEventListener("blur", save, { once: true });
  }

  bindAblate() {
    const btn = $("[data-ablate-pinned-submit]");
    if (!btn || !this.cfg.ablate) return;
    const mode = $("[data-ap-mode]"), value = $("[data-ap-value]");
    mode.addEventListener("change", () => { value.disabled = mode.value === "zero"; });
    btn.addEventListener("click", async () => {
      const feats = pinnedFeatures(this.state, this.model);
      if (!feats.size) return;
      const a = this.cfg.ablate;
      const body = {
        source: a.source, ...(a.source === "prompt_id" ? { prompt_id: a.prompt_id } : { token_ids: a.token_ids.join(" ") }),
        prompt_tokens: a.prompt_tokens,
        features: [...feats.keys()].join(" "), mode: mode.value,
        value: mode.value === "zero" ? null : Number(value.value), positions: $("[data-ap-positions]").value,
        max_new_tokens: Number($("[data-ap-tokens]").value) || 64, target_token_id: this.cfg.ablate.target_token_id,
      };
      const out = $("[data-ap-result]");
      btn.disabled = true;
      try {
        const resp = await fetch(this.cfg.ablate_url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
        const data = await resp.json();
        if (!resp.ok) {
          out.replaceChildren(el("div", { class: "error-box", "data-error": true, text: typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail) }));
          return;
        }
        out.dataset.ablationId = String(data.id);
        this.pollAblation(`${this.cfg.ablate_url}/${data.id}`, data.url, out);
      } finally {
        btn.disabled = false;
      }
    });
  }

  async pollAblation(api, url, out) {
    for (let i = 0; i < 600; i++) {
      const resp = await fetch(api);
      if (!resp.ok) return;
      const data = await resp.json();
      renderAblationStatus(out, data, url);
      if (data.done) return;
      await new Promise((r) => setTimeout(r, POLL_MS));
    }
  }
}

function cantor(layer, index) {
  return ((layer + index) * (layer + index + 1)) / 2 + index;
}

function bindNewGraph(cfg) {
  const form = $("[data-new-graph-form]");
  if (!form) return;
  const status = $("[data-new-graph-status]");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(form);
    const kind = f.get("contrast_kind");
    const body = {
      prompt: f.get("prompt"), chat: f.get("chat") === "on", target_token: f.get("target_token") || null,
      contrast_token: kind === "auto" ? "auto" : kind === "token" ? (f.get("contrast_token") || null) : null,
      mode: f.get("mode"), max_feature_nodes: Number(f.get("max_feature_nodes")) || 10000,
      node_threshold: Number(f.get("node_threshold")),
    };
    status.textContent = "queueing…";
    const resp = await fetch(cfg.new_graph_url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    const data = await resp.json();
    if (!resp.ok) {
      status.textContent = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
      status.dataset.state = "error";
      return;
    }
    status.dataset.jobId = String(data.job_id);
    for (;;) {
      const r = await fetch(data.status_url);
      const job = await r.json();
      status.dataset.state = job.status;
      const prog = job.progress && job.progress.message ? ` · ${job.progress.message}` : "";
      status.textContent = `job ${job.job_id}: ${job.status}${prog}`;
      if (job.graph_url) {
        status.replaceChildren(el("a", { href: job.graph_url, "data-new-graph-link": true, text: "the new graph" }),
          job.message ? ` · ${job.message}` : "");
        window.location.assign(job.graph_url);
        return;
      }
      if (["failed", "cancelled"].includes(job.status)) {
        status.textContent = `job ${job.job_id} ${job.status}: ${job.error || ""}`;
        return;
      }
      await new Promise((res) => setTimeout(res, 1500));
    }
  });
}

function main() {
  const cfgEl = document.getElementById("graph-config");
  const cfg = cfgEl ? JSON.parse(cfgEl.textContent) : null;
  if (cfg) {
    const page = new GraphPage(cfg);
    window.adapterlensGraph = page;  // for tests and benchmarks
    page.bind();
    const start = () => page.load(cfg.large ? page.state.pruning : null).catch((e) => {
      const box = $("[data-loading]");
      if (box) box.textContent = String(e.message || e);
      console.warn(e);
    });
    const loadBtn = $("[data-load]");
    if (loadBtn) loadBtn.addEventListener("click", start); else start();
  }
  bindNewGraph(cfg || { new_graph_url: $("[data-new-graph-form]")?.getAttribute("action") });
}

main();
