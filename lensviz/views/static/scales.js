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

// The ticks that fit: [t, label] pairs kept in priority order (0 and the two ends first, then from the
// outside in) where a label's box stays GAP px clear of every box already kept, at `width` px. End
// labels are aligned to the bar's ends (the left one starts there, the right one ends there), the rest
// centred on their tick. textWidth(label) gives a label's width in px.
const GAP = 6;
export function fitTicks(meta, width, textWidth) {
  const box = ([t, label]) => {
    const x = (t + 1) / 2 * width, w = textWidth(label);
    return t <= -1 ? [x, x + w] : t >= 1 ? [x - w, x] : [x - w / 2, x + w / 2];
  };
  const order = [...ticks(meta)].sort((a, b) => (a[0] === 0 ? -1 : b[0] === 0 ? 1 : Math.abs(b[0]) - Math.abs(a[0])));
  const kept = [];
  for (const tk of order) {
    const [lo, hi] = box(tk);
    if (kept.every(([, [l, h]]) => hi + GAP <= l || lo >= h + GAP)) kept.push([tk, [lo, hi]]);
  }
  return kept.map(([tk]) => tk).sort((a, b) => a[0] - b[0]);
}

// A horizontal colour bar (canvas) with tick labels under it (only those that fit without overlap; the
// end labels are aligned to the bar's ends, so none spills past them). Every tick is in the aria-label.
export function legend(h, colour, meta, width = 320) {
  const bar = h("canvas", { class: "lv-scale-bar", width, height: 12, role: "img",
    "aria-label": "colour scale: " + ticks(meta).map(([, l]) => l).join(", ") });
  const g = bar.getContext("2d");
  for (let x = 0; x < width; x++) { g.fillStyle = colour(2 * x / (width - 1) - 1); g.fillRect(x, 0, 1, 12); }
  g.font = "11px sans-serif";
  const textWidth = (label) => 1.15 * g.measureText(String(label)).width + 2;   // a margin for the page's own font
  const shift = (t) => (t <= -1 ? "translateX(0)" : t >= 1 ? "translateX(-100%)" : "translateX(-50%)");
  const labels = h("div", { class: "lv-scale-ticks", style: { position: "relative", width: width + "px", height: "1.4em" } },
    ...fitTicks(meta, width, textWidth).map(([t, label]) => h("span", { class: "lv-scale-tick", "data-t": t.toFixed(3), text: label,
      style: { position: "absolute", left: ((t + 1) / 2 * width) + "px", transform: shift(t) } })));
  const name = { symlog: "symmetric log", row: "per-row max", linear: "linear" }[meta.scale_mode] || "linear";
  return h("div", { class: "lv-scale", "data-mode": meta.scale_mode || "linear" },
    h("div", { class: "lv-scale-title", text: `scale: ${name}` + (meta.scale_mode === "symlog" ? ` (linear below ${Number(meta.c).toPrecision(2)})` : "") + " · red < 0 < blue" }), bar, labels);
}
