// The trace viewer: the minimap and "next/previous firing" move the focused token (and the scroll position).
(() => {
  const strip = document.querySelector("[data-trace]");
  if (!strip) return;
  const at = document.querySelector("[data-firing-at]");
  let current = -1;
  let firing = null; // positions where the shaded feature is active, read once on first use

  const firingPositions = () => {
    if (firing === null) firing = Array.from(strip.querySelectorAll(".tok.fires"), (el) => Number(el.dataset.pos));
    return firing;
  };

  const jumpTo = (pos, smooth) => {
    const el = document.getElementById("t" + pos);
    if (!el) return;
    const old = current >= 0 ? document.getElementById("t" + current) : null;
    if (old) old.classList.remove("focus");
    el.classList.add("focus");
    current = pos;
    el.scrollIntoView({ block: "center", behavior: smooth ? "smooth" : "auto" });
    el.tabIndex = -1;
    el.focus({ preventScroll: true });
    history.replaceState(null, "", "#t" + pos);
    if (at) {
      const k = firingPositions().indexOf(pos);
      at.textContent = "token " + pos + (k >= 0 ? " (firing " + (k + 1) + " of " + firingPositions().length + ")" : "");
    }
    strip.dispatchEvent(new CustomEvent("trace:focus", { detail: { pos } }));
  };

  const step = (dir) => {
    const list = firingPositions();
    if (!list.length) return;
    let next;
    if (dir > 0) next = list.find((p) => p > current) ?? list[0];
    else next = [...list].reverse().find((p) => p < current) ?? list[list.length - 1];
    jumpTo(next, false);
  };

  // the minimap: one cell per token, COLS to a row, the rows squeezed to fit the window; drawn once on a canvas
  const COLS = 20, CELL_W = 6;
  const canvas = document.querySelector("[data-minimap-canvas]");
  const dataEl = document.querySelector("[data-minimap-data]");
  if (canvas && dataEl) {
    const data = JSON.parse(dataEl.textContent);
    const rows = Math.max(1, Math.ceil(data.n / COLS));
    const height = Math.max(12, Math.min(rows * CELL_W, Math.floor(window.innerHeight * 0.85)));
    const cellH = height / rows;
    const dpr = window.devicePixelRatio || 1;
    canvas.style.width = COLS * CELL_W + "px";
    canvas.style.height = height + "px";
    canvas.width = Math.round(COLS * CELL_W * dpr);
    canvas.height = Math.round(height * dpr);
    canvas.dataset.cols = String(COLS);
    canvas.dataset.cellH = String(cellH);
    const ctx = canvas.getContext("2d");
    ctx.scale(dpr, dpr);
    const css = getComputedStyle(document.documentElement);
    const act = (css.getPropertyValue("--act") || "232, 121, 58").trim();
    const accent = (css.getPropertyValue("--accent-ink") || "#6b3fa0").trim() || "#6b3fa0";
    const rgb = data.shade === "feature" ? act : "208, 71, 74";
    const gap = cellH >= 3 ? 1 : 0;
    const cell = (pos) => [(pos % COLS) * CELL_W, Math.floor(pos / COLS) * cellH];
    ctx.fillStyle = "#e6e8ec";
    for (let p = 0; p < data.n; p++) { const [x, y] = cell(p); ctx.fillRect(x, y, CELL_W - 1, cellH - gap); }
    data.v.forEach((v, p) => {
      if (!v) return;
      const [x, y] = cell(p);
      ctx.fillStyle = `rgba(${rgb}, ${v})`;
      ctx.fillRect(x, y, CELL_W - 1, cellH - gap);
    });
    ctx.fillStyle = accent;
    for (const p of data.hes) { const [x, y] = cell(p); ctx.fillRect(x, y, 2, Math.max(1, cellH - gap)); }
    ctx.fillStyle = `rgb(${act})`;
    for (const p of data.fires) { const [x, y] = cell(p); ctx.fillRect(x + 2, y, CELL_W - 3, Math.max(1, cellH - gap)); }
    const posAt = (ev) => {
      const r = canvas.getBoundingClientRect();
      const col = Math.min(COLS - 1, Math.max(0, Math.floor((ev.clientX - r.left) / CELL_W)));
      const row = Math.max(0, Math.floor((ev.clientY - r.top) / cellH));
      return Math.min(data.n - 1, row * COLS + col);
    };
    canvas.addEventListener("click", (ev) => jumpTo(posAt(ev), false));
    canvas.addEventListener("mousemove", (ev) => { canvas.title = "token " + posAt(ev) + " (click to jump)"; });
  }
  strip.addEventListener("click", (ev) => {
    const tok = ev.target.closest(".tok");
    if (tok) jumpTo(Number(tok.dataset.pos), false);
  });
  document.querySelector("[data-next-firing]")?.addEventListener("click", () => step(1));
  document.querySelector("[data-prev-firing]")?.addEventListener("click", () => step(-1));
  document.addEventListener("keydown", (ev) => {
    if (ev.target.closest("input, textarea, select")) return;
    if (ev.key === "n") step(1);
    else if (ev.key === "p") step(-1);
  });
  const fromHash = () => {
    const m = /^#t(\d+)$/.exec(location.hash);
    if (m) jumpTo(Number(m[1]), false);
  };
  window.addEventListener("hashchange", fromHash);
  fromHash();
  // A lens run from this page comes back here by a redirect with no fragment, which keeps the request's: the
  // token in focus (an example's "in its trace" link, a minimap jump) is in focus again when the page returns.
  document.querySelectorAll("[data-trace-lens]").forEach((form) => form.addEventListener("submit", () => {
    if (/^#t\d+$/.test(location.hash)) form.action = form.action.split("#")[0] + location.hash;
  }));
})();
