// The view's state and its URL form, with circuit-tracer's / Neuronpedia's parameter names:
//   pinnedIds=a,b  supernodes=[["label","id",…],…]  clerps=[["node id or feature number","label"],…]
//   clickedId=id  pruningThreshold=0.6  densityThreshold=0.99  logitDiff=A__vs__B (token texts)
// Written with history.replaceState (no history entries); malformed values are ignored, never thrown.

const KEYS = ["pinnedIds", "supernodes", "clerps", "clickedId", "pruningThreshold", "densityThreshold", "logitDiff"];

function parseJSONList(text) {
  if (!text) return [];
  try {
    const v = JSON.parse(text);
    return Array.isArray(v) ? v : [];
  } catch (e) {
    console.warn("ignoring a malformed URL parameter", e.message);  // a warning, not an error: the view still opens
    return [];
  }
}

function parseFloatIn(text, lo, hi) {
  if (text === null || text === "") return null;
  const v = Number(text);
  return Number.isFinite(v) && v >= lo && v <= hi ? v : null;
}

export function readState(search) {
  const q = new URLSearchParams(search);
  const pinned = (q.get("pinnedIds") || "").split(",").map((s) => s.trim()).filter(Boolean);
  const supernodes = parseJSONList(q.get("supernodes"))
    .filter((g) => Array.isArray(g) && g.length >= 3 && g.every((x) => typeof x === "string"))
    .map((g) => [g[0].slice(0, 200), ...g.slice(1)]);
  const clerps = new Map();
  parseJSONList(q.get("clerps")).forEach((e) => {
    if (Array.isArray(e) && e.length === 2 && (typeof e[0] === "string" || typeof e[0] === "number") && typeof e[1] === "string") {
      clerps.set(String(e[0]), e[1].slice(0, 500));
    }
  });
  let logitDiff = null;
  const ld = q.get("logitDiff");
  if (ld && ld.includes("__vs__")) {
    const [a, b] = ld.split("__vs__");
    if (a !== undefined && b !== undefined && a !== b) logitDiff = [a, b];
  }
  return {
    pinned: new Set(pinned),
    supernodes,
    clerps,
    clickedId: q.get("clickedId") || null,
    pruning: parseFloatIn(q.get("pruningThreshold"), 0, 1),
    density: parseFloatIn(q.get("densityThreshold"), 0, 1),
    logitDiff,
  };
}

export function writeState(state, defaults) {
  const q = new URLSearchParams(window.location.search);
  KEYS.forEach((k) => q.delete(k));
  if (state.pinned.size) q.set("pinnedIds", [...state.pinned].join(","));
  if (state.supernodes.length) q.set("supernodes", JSON.stringify(state.supernodes));
  if (state.clerps.size) q.set("clerps", JSON.stringify([...state.clerps.entries()]));
  if (state.clickedId) q.set("clickedId", state.clickedId);
  if (state.pruning !== null && state.pruning !== defaults.pruning) q.set("pruningThreshold", String(state.pruning));
  if (state.density !== null && state.density !== 1) q.set("densityThreshold", String(state.density));
  if (state.logitDiff) q.set("logitDiff", state.logitDiff.join("__vs__"));
  const s = q.toString();
  const url = window.location.pathname + (s ? "?" + s : "") + window.location.hash;
  window.history.replaceState(null, "", url);
  return url;
}
