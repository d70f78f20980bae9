// AdapterLens pages: token tooltips, context expansion, Plotly figures. No framework; event delegation
// so htmx-swapped fragments work without re-binding. Token text is read from the DOM (already escaped
// by the server) and written back with textContent only.
(function () {
  "use strict";
  const tip = () => document.getElementById("tip");

  function showTip(el, ev) {
    const t = tip();
    if (!t) return;
    const parts = [];
    const text = el.textContent;
    if (el.dataset.act !== undefined) parts.push(JSON.stringify(text) + "  act " + el.dataset.act);
    if (el.dataset.next !== undefined) parts.push("next token " + JSON.stringify(el.dataset.next));
    if (el.classList.contains("hes")) parts.push("part of a hesitation word");
    if (el.classList.contains("special")) parts.push("special token");
    if (el.classList.contains("bytes")) parts.push("part of a UTF-8 character (its bytes)");
    if (el.dataset.kl !== undefined && el.dataset.kl !== "–") parts.push((parts.length ? "" : JSON.stringify(text) + "  ") + "KL " + el.dataset.kl);
    if (el.dataset.lp !== undefined) parts.push("logprob " + el.dataset.lp);
    if (el.dataset.tip) parts.push(el.dataset.tip);
    if (!parts.length) return;
    t.textContent = parts.join("\n");
    t.hidden = false;
    moveTip(ev);
  }
  function moveTip(ev) {
    const t = tip();
    if (!t || t.hidden) return;
    const x = Math.min(ev.clientX + 12, window.innerWidth - t.offsetWidth - 8);
    t.style.left = x + "px";
    t.style.top = (ev.clientY + 16) + "px";
  }
  document.addEventListener("mouseover", (ev) => {
    const el = ev.target.closest && ev.target.closest("[data-act], [data-kl], [data-lp], [data-tip]");
    if (el) showTip(el, ev);
  });
  document.addEventListener("mousemove", moveTip);
  document.addEventListener("mouseout", (ev) => {
    const el = ev.target.closest && ev.target.closest("[data-act], [data-kl], [data-lp], [data-tip]");
    if (el && tip()) tip().hidden = true;
  });
  document.addEventListener("click", (ev) => {
    const btn = ev.target.closest && ev.target.closest("[data-expand]");
    if (!btn) return;
    const ex = btn.closest(".example");
    ex.classList.toggle("expanded");
    btn.textContent = ex.classList.contains("expanded") ? "less" : "context";
  });

  // The run switch on a run page: choosing a run opens it (no inline handlers: the CSP forbids them).
  document.addEventListener("change", (ev) => {
    const form = ev.target.closest && ev.target.closest("form[data-run-switch]");
    if (form && ev.target.name === "run") location.href = form.dataset.runSwitch + encodeURIComponent(ev.target.value);
  });
  document.addEventListener("submit", (ev) => {
    const form = ev.target.closest && ev.target.closest("form[data-run-switch]");
    if (!form) return;
    ev.preventDefault();
    location.href = form.dataset.runSwitch + encodeURIComponent(form.elements.run.value);
  });

  // The feature index's default sort follows the token filters (strength with promotes / fires on, else layer):
  // htmx swaps only the results, so the select's "(default)" label is kept true here as the filters change.
  document.addEventListener("input", (ev) => {
    const form = ev.target.closest && ev.target.closest("form[data-filters]");
    const option = form && form.querySelector("option[data-default-sort]");
    if (!option) return;
    const tokens = ["promotes", "fires_on"].some((n) => form.elements[n] && form.elements[n].value.trim());
    option.textContent = (tokens ? "strength ↓" : "layer, index") + " (default)";
  });

  const baseLayout = {
    margin: { l: 48, r: 12, t: 10, b: 40 }, paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
    font: { size: 11 }, bargap: 0.05, legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom" },
  };
  const config = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"] };

  function readJSON(id) {
    const el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }
  function drawFigures() {
    if (!window.Plotly) return;
    document.querySelectorAll("[data-fig]:not([data-drawn])").forEach((div) => {
      const fig = div.dataset.figJson ? JSON.parse(div.dataset.figJson) : readJSON(div.dataset.fig);
      if (!fig) return;
      div.dataset.drawn = "1";
      window.Plotly.newPlot(div, fig.data, Object.assign({}, baseLayout, fig.layout || {}), config);
    });
    document.querySelectorAll("[data-curves]:not([data-drawn])").forEach((root) => {
      const curves = readJSON(root.dataset.curves);
      if (!curves) return;
      root.dataset.drawn = "1";
      // One small chart per metric; list-valued metrics (nmse[0], nmse[1], …) share a chart.
      const groups = {};
      Object.keys(curves.series).forEach((k) => { (groups[k.replace(/\[\d+\]$/, "")] ||= []).push(k); });
      const order = ["loss", "kl", "lm_loss", "nmse", "l0", "bridge_a2t", "bridge_t2a", "k", "lr"];
      const rank = (g) => (order.indexOf(g) < 0 ? order.length : order.indexOf(g));
      Object.keys(groups).sort((a, b) => rank(a) - rank(b) || a.localeCompare(b)).forEach((g) => {
        const box = document.createElement("div");
        box.className = "curve";
        const h = document.createElement("h4");
        h.textContent = g;
        const div = document.createElement("div");
        div.className = "plot small-plot";
        box.append(h, div);
        root.append(box);
        const traces = groups[g].map((k) => ({ type: "scatter", mode: "lines", name: k, x: curves.steps, y: curves.series[k], line: { width: 1.5 } }));
        const logy = g.startsWith("loss") || g.startsWith("kl") || g.startsWith("nmse") || g.startsWith("bridge");
        window.Plotly.newPlot(div, traces, Object.assign({}, baseLayout, {
          showlegend: traces.length > 1 && traces.length <= 8, xaxis: { title: { text: "step" } },
          margin: { l: 48, r: 12, t: traces.length > 1 ? 28 : 10, b: 40 },
          yaxis: { type: logy ? "log" : "linear" },
        }), config);
      });
    });
  }
  document.addEventListener("DOMContentLoaded", drawFigures);
  document.addEventListener("htmx:afterSettle", drawFigures);  // figures inside swapped content
  // an outerHTML swap settles on the element it replaced (detached, so that event never reaches the document);
  // htmx:load fires on the new content itself
  document.addEventListener("htmx:load", drawFigures);
})();
