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

  const minimap = document.querySelector("[data-minimap]");
  if (minimap) {
    minimap.addEventListener("click", (ev) => {
      const a = ev.target.closest("a.mm");
      if (!a) return;
      ev.preventDefault();
      jumpTo(Number(a.getAttribute("href").slice(2)), false);
    });
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
})();
