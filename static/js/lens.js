// The diff lens page: the KL toggle re-shades the strip in place (the links work without this script), and a
// clicked token is marked as selected (htmx swaps its panel in; the address keeps the position).
(function () {
  "use strict";
  document.addEventListener("click", (ev) => {
    const toggle = ev.target.closest && ev.target.closest("[data-kl-toggle]");
    if (toggle) {
      const strip = document.querySelector("[data-strip]");
      if (!strip) return;
      ev.preventDefault();
      const kl = toggle.dataset.klToggle;
      strip.classList.remove("kl-hybrid", "kl-adapted");
      strip.classList.add("kl-" + kl);
      strip.dataset.kl = kl;
      document.querySelectorAll("[data-kl-toggle]").forEach((b) => b.classList.toggle("on", b === toggle));
      history.replaceState(null, "", toggle.href);
      return;
    }
    const tok = ev.target.closest && ev.target.closest("[data-strip] .tok");
    if (tok) {
      document.querySelectorAll("[data-strip] .tok.sel").forEach((t) => t.classList.remove("sel"));
      tok.classList.add("sel");
      const url = new URL(tok.href);
      const strip = tok.closest("[data-strip]");
      url.searchParams.set("kl", strip.dataset.kl);
      history.replaceState(null, "", url);
    }
  });
})();
