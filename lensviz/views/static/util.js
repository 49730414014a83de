// Shared helpers for every view: safe DOM building (text only, never innerHTML), buffer decoding,
// colour scales. Token text is untrusted: it only ever reaches the page through textContent / title.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  if (tag === "button") el.type = "button";         // never a form submit inside a host page
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = String(v);
    else if (k === "style") Object.assign(el.style, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, String(v));  // attribute values are escaped by the DOM
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// Visible form of a token: spaces and newlines shown, control characters as escapes.
export function show(tok) {
  return String(tok).replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/ /g, "·")
    .replace(/[\u0000-\u001f\u007f]/g, (c) => "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"));
}

export function clip(s, n = 8) { s = String(s); return s.length > n ? s.slice(0, n - 1) + "…" : s; }

function bytesOf(b) {
  if (!b) return new Uint8Array(0);
  if (b instanceof DataView) return new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
  if (b instanceof ArrayBuffer) return new Uint8Array(b);
  if (ArrayBuffer.isView(b)) return new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
  return new Uint8Array(0);
}
// Copies so typed arrays are aligned whatever the buffer offset.
export const i32 = (b) => new Int32Array(bytesOf(b).slice().buffer);
export const u8 = (b) => bytesOf(b).slice();
export const i8 = (b) => new Int8Array(bytesOf(b).slice().buffer);
export const f32 = (b) => new Float32Array(bytesOf(b).slice().buffer);

const lerp = (a, b, t) => Math.round(a + (b - a) * t);
const mix = (c0, c1, t) => `rgb(${lerp(c0[0], c1[0], t)},${lerp(c0[1], c1[1], t)},${lerp(c0[2], c1[2], t)})`;
const clamp01 = (t) => Math.max(0, Math.min(1, t));

// Colour scales, colour-blind safe (lightness carries the value; hues from ColorBrewer's CVD-safe
// single-hue and RdBu schemes). Each has a light-theme and a dark-theme form: on dark the low end
// sits near the background and the high end is bright, so a grid never turns into black on black.
const SCALES = {
  light: { green: [[247, 252, 245], [0, 90, 50]], purple: [[252, 251, 253], [63, 0, 125]],
           blue: [[247, 251, 255], [8, 48, 107]], neg: [202, 0, 32], pos: [5, 48, 97], mid: [255, 255, 255],
           masked: "#d9d9d9", marker: "#d6008f" },
  dark: { green: [[28, 38, 32], [161, 217, 155]], purple: [[34, 30, 44], [203, 180, 255]],
          blue: [[26, 32, 44], [158, 202, 225]], neg: [244, 165, 130], pos: [146, 197, 222], mid: [32, 32, 36],
          masked: "#3a3a3a", marker: "#ff7ac6" },
};
let theme = "light";
export function setTheme(dark) { theme = dark ? "dark" : "light"; }
export const isDark = () => theme === "dark";
const S = () => SCALES[theme];
// Sequential (greens) for probabilities / attention, 0..1.
export function green(t) { const [a, b] = S().green; return mix(a, b, clamp01(t)); }
// Sequential purples for Reversed Attention norms, 0..1.
export function purple(t) { const [a, b] = S().purple; return mix(a, b, clamp01(t)); }
// Sequential blues (FF1 inputs in the Backward Lens), 0..1.
export function blue(t) { const [a, b] = S().blue; return mix(a, b, clamp01(t)); }
// Diverging red-white-blue centred on 0, -1..1 (Reversed Attention, as in the paper).
export function diverging(t) {
  t = Math.max(-1, Math.min(1, t));
  const s = S();
  return t < 0 ? mix(s.mid, s.neg, -t) : mix(s.mid, s.pos, t);
}
// Rank of the target: 0 (best) -> strong blue, large -> pale (log scale).
export function rankColour(rank, vocab) {
  return blue(1 - Math.log1p(rank) / Math.log1p(Math.max(vocab, 2)));
}
export const maskedColour = () => S().masked;
export const markerColour = () => S().marker;

// WCAG relative luminance / contrast of "rgb(r,g,b)" or "#rrggbb" colours.
function rgbOf(c) {
  const m = /^#([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})$/i.exec(c);
  if (m) return [1, 2, 3].map((i) => parseInt(m[i], 16));
  return (String(c).match(/[\d.]+/g) || [0, 0, 0]).slice(0, 3).map(Number);
}
export function luminance(c) {
  const [r, g, b] = rgbOf(c).map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
}
export function contrast(a, b) {
  const [x, y] = [luminance(a), luminance(b)].sort((p, q) => q - p);
  return (x + 0.05) / (y + 0.05);
}
// Text colour for a cell background: whichever of near-black / white contrasts more.
export const ink = (bg) => (contrast(bg, "#111111") >= contrast(bg, "#ffffff") ? "#111111" : "#ffffff");
export const pct = (p) => (p >= 0.1 ? (100 * p).toFixed(1) : (100 * p).toPrecision(2)) + " %";

export function debounce(fn, ms) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

// Draw a T x T map into a canvas: values via colour(v), masked above the diagonal.
export function drawMap(canvas, n, value, colour, px) {
  canvas.width = n * px; canvas.height = n * px;
  const g = canvas.getContext("2d");
  g.fillStyle = maskedColour(); g.fillRect(0, 0, n * px, n * px);
  for (let i = 0; i < n; i++) for (let j = 0; j <= i; j++) {
    g.fillStyle = colour(value(i, j)); g.fillRect(j * px, i * px, px, px);
  }
}

// Roving focus in a 2-D grid of cells: arrow keys / Home / End call move(dr, dc) (or to an edge);
// Enter / Space call activate(). The caller keeps one cell at tabindex 0 (the selected one).
export function gridKeys(e, move, activate) {
  const k = e.key, d = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] }[k];
  if (d) { e.preventDefault(); move(d[0], d[1]); return true; }
  if (k === "Home") { e.preventDefault(); move(0, -Infinity); return true; }
  if (k === "End") { e.preventDefault(); move(0, Infinity); return true; }
  if ((k === "Enter" || k === " ") && activate) { e.preventDefault(); activate(); return true; }
  return false;
}
