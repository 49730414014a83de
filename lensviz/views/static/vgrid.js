// Long prompts: a grid draws only the columns in view (plus a margin), with spacer cells standing in
// for the rest, and T x T maps are painted through one ImageData (one pixel per cell, scaled up)
// instead of one fillRect per cell. Below WINDOW_FROM columns everything is drawn as before.
export const WINDOW_FROM = 96;      // columns from which a grid is windowed
export const COL_PX = 56;           // a windowed column's width (px)
const MARGIN = 8;                   // columns drawn beyond each edge of the view

// The columns [c0, c1) to draw for T columns in a scrolled `wrap` (all of them when T is small).
export function visibleColumns(wrap, T, firstColPx = 40) {
  if (T < WINDOW_FROM) return [0, T];
  const left = Math.max(0, wrap.scrollLeft - firstColPx), width = wrap.clientWidth || 800;
  const c0 = Math.max(0, Math.floor(left / COL_PX) - MARGIN);
  const c1 = Math.min(T, Math.ceil((left + width) / COL_PX) + MARGIN);
  return [c0, Math.max(c1, Math.min(T, c0 + 1))];
}

// A spacer cell standing in for `n` undrawn columns.
export function spacer(h, tag, n) {
  return n > 0 ? h(tag, { class: "lv-spacer", "aria-hidden": "true", style: { minWidth: n * COL_PX + "px", width: n * COL_PX + "px", padding: "0" } }) : null;
}

// Re-draw when `wrap` scrolls (one draw per animation frame); returns a function that stops it.
export function onScroll(wrap, redraw) {
  let queued = false;
  const f = () => { if (queued) return; queued = true; requestAnimationFrame(() => { queued = false; redraw(); }); };
  wrap.addEventListener("scroll", f, { passive: true });
  return () => wrap.removeEventListener("scroll", f);
}

// Scroll `wrap` so that column j is in view (windowed grids only).
export function scrollToColumn(wrap, T, j, firstColPx = 40) {
  if (T < WINDOW_FROM || j === undefined) return;
  const x = firstColPx + j * COL_PX, w = wrap.clientWidth || 800;
  if (x < wrap.scrollLeft || x + COL_PX > wrap.scrollLeft + w) wrap.scrollLeft = Math.max(0, x - w / 2);
}

function rgbOf(c) {
  const m = /^#([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})$/i.exec(c);
  if (m) return [1, 2, 3].map((i) => parseInt(m[i], 16));
  return (String(c).match(/[\d.]+/g) || [0, 0, 0]).slice(0, 3).map(Number);
}

// Paint an n x n map: value(i, j) in [-1, 1] (or [0, 1]) through colour(v) (a CSS colour), masked above
// the diagonal. Colours are looked up in a 511-step table, so a 2048 x 2048 map costs one pass.
export function paintMap(canvas, n, value, colour, px, masked) {
  const lut = new Map();
  const rgb = (v) => {
    const q = Math.round(Math.max(-1, Math.min(1, v)) * 255);
    let c = lut.get(q);
    if (!c) { c = rgbOf(colour(q / 255)); lut.set(q, c); }
    return c;
  };
  const img = new ImageData(n, n), d = img.data, mk = rgbOf(masked);
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) {
    const c = j <= i ? rgb(value(i, j)) : mk, o = 4 * (i * n + j);
    d[o] = c[0]; d[o + 1] = c[1]; d[o + 2] = c[2]; d[o + 3] = 255;
  }
  const off = document.createElement("canvas");
  off.width = n; off.height = n; off.getContext("2d").putImageData(img, 0, 0);
  canvas.width = n * px; canvas.height = n * px;
  const g = canvas.getContext("2d");
  g.imageSmoothingEnabled = false;
  g.drawImage(off, 0, 0, n * px, n * px);
}
