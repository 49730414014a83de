// Colour scales for signed maps (Reversed Attention): linear (one |max| for the whole map), symmetric
// log (the kernel sends sign(x) log10(1 + |x|/c) / log10(1 + max/c)) or per-row (each row divided by its
// own max |x|), and the drawn scale: a colour bar with the values its ticks stand for.
export const MODES = [["symlog", "symmetric log"], ["row", "per-row max"], ["linear", "linear"]];

// The value a displayed t in [-1, 1] stands for, under the map's meta {scale_mode, scale, c}.
export function valueOf(t, meta) {
  const M = meta.scale || 0, s = Math.sign(t), a = Math.abs(t);
  if (meta.scale_mode === "symlog") { const c = meta.c || M; return s * c * (Math.pow(10, a * Math.log10(1 + M / c)) - 1); }
  return t * M;
}

// The ticks of the bar: [t, label] pairs.
export function ticks(meta) {
  const fmt = (v) => (v === 0 ? "0" : Number(v).toPrecision(2));
  if (meta.scale_mode === "row") return [[-1, "−row max"], [-0.5, "−½"], [0, "0"], [0.5, "+½"], [1, "+row max"]];
  if (meta.scale_mode === "symlog") {
    const M = meta.scale || 0, c = meta.c || M, out = [[0, "0"]];
    const denom = Math.log10(1 + M / c);
    for (let v = M, i = 0; v >= c * 0.999 && i < 4; v /= 10, i++) {
      const t = Math.log10(1 + v / c) / denom;
      out.push([t, fmt(v)], [-t, fmt(-v)]);
    }
    return out.sort((a, b) => a[0] - b[0]);
  }
  const M = meta.scale || 0;
  return [-1, -0.5, 0, 0.5, 1].map((t) => [t, fmt(t * M)]);
}

// A horizontal colour bar (canvas) with tick labels under it.
export function legend(h, colour, meta, width = 260) {
  const bar = h("canvas", { class: "lv-scale-bar", width, height: 12, role: "img",
    "aria-label": "colour scale: " + ticks(meta).map(([, l]) => l).join(", ") });
  const g = bar.getContext("2d");
  for (let x = 0; x < width; x++) { g.fillStyle = colour(2 * x / (width - 1) - 1); g.fillRect(x, 0, 1, 12); }
  const labels = h("div", { class: "lv-scale-ticks", style: { position: "relative", width: width + "px", height: "1.3em" } },
    ...ticks(meta).map(([t, label]) => h("span", { class: "lv-scale-tick", "data-t": t.toFixed(3), text: label,
      style: { position: "absolute", left: ((t + 1) / 2 * width) + "px", transform: "translateX(-50%)" } })));
  const name = { symlog: "symmetric log", row: "per-row max", linear: "linear" }[meta.scale_mode] || "linear";
  return h("div", { class: "lv-scale", "data-mode": meta.scale_mode || "linear" },
    h("div", { class: "lv-scale-title", text: `scale: ${name}` + (meta.scale_mode === "symlog" ? ` (linear below ${Number(meta.c).toPrecision(2)})` : "") + " · red < 0 < blue" }), bar, labels);
}
