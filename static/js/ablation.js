// The ablation page's live view: tokens stream in over server-sent events as the worker writes them; when the
// stream says "done" the server-rendered final view (divergence, KL strip, hesitation marks, target report)
// replaces it through htmx. Token text is set with textContent only.
(function () {
  "use strict";
  const visible = (s) => (s ? s.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍") : "∅");

  function column(live, name) {
    let col = live.querySelector(`[data-condition="${CSS.escape(name)}"] .gen`);
    if (col) return col;
    const wrap = document.createElement("div");
    wrap.className = "condition";
    wrap.dataset.condition = name;
    const h = document.createElement("h3");
    h.textContent = name;
    col = document.createElement("div");
    col.className = "gen toks";
    wrap.append(h, col);
    live.querySelector("[data-conditions]").append(wrap);
    const waiting = live.querySelector("[data-waiting]");
    if (waiting) waiting.remove();
    return col;
  }

  function start() {
    const live = document.getElementById("ablation-live");
    if (!live || !live.dataset.stream || !window.EventSource) return;
    const source = new EventSource(live.dataset.stream);
    const progress = live.querySelector("[data-progress]");
    let n = 0;
    source.addEventListener("token", (ev) => {
      const t = JSON.parse(ev.data);
      const span = document.createElement("span");
      span.className = "tok new";
      span.dataset.step = t.step;
      if (t.kl !== null && t.kl !== undefined) span.dataset.kl = t.kl.toPrecision(3);
      if (t.logprob !== null && t.logprob !== undefined) span.dataset.lp = t.logprob.toPrecision(3);
      span.textContent = visible(t.text);
      column(live, t.condition).append(span);
      n += 1;
      live.dataset.streamed = String(n);
      if (progress) progress.textContent = "generating · " + n + " tokens";
    });
    source.addEventListener("done", () => {
      source.close();
      if (window.htmx) {
        window.htmx.ajax("GET", live.dataset.live, { target: "#ablation-live", swap: "outerHTML" });
      } else {
        window.location.reload();
      }
    });
    source.onerror = () => { source.close(); setTimeout(() => window.location.reload(), 2000); };
  }
  document.addEventListener("DOMContentLoaded", start);
})();
