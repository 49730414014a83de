// Shared helpers for every view: safe DOM building (text only, never innerHTML), buffer decoding,
// colour scales. Token text is untrusted: it only ever reaches the page through textContent / title.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
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
// Sequential (greens) for probabilities / attention, 0..1.
export function green(t) {
  t = Math.max(0, Math.min(1, t));
  return `rgb(${lerp(247, 0, t)},${lerp(252, 109, t)},${lerp(245, 44, t)})`;
}
// Diverging red-white-blue centred on 0, -1..1 (Reversed Attention, as in the paper).
export function diverging(t) {
  t = Math.max(-1, Math.min(1, t));
  return t < 0 ? `rgb(${lerp(255, 202, -t)},${lerp(255, 0, -t)},${lerp(255, 32, -t)})`
               : `rgb(${lerp(255, 5, t)},${lerp(255, 48, t)},${lerp(255, 97, t)})`;
}
// Rank of the target: 0 (best) -> dark blue, large -> pale (log scale); colour-blind safe.
export function rankColour(rank, vocab) {
  const t = 1 - Math.log1p(rank) / Math.log1p(Math.max(vocab, 2));
  return `rgb(${lerp(255, 8, t)},${lerp(255, 69, t)},${lerp(255, 148, t)})`;
}
export const ink = (t) => (t > 0.55 ? "#fff" : "#111");
export const pct = (p) => (p >= 0.1 ? (100 * p).toFixed(1) : (100 * p).toPrecision(2)) + " %";

export function debounce(fn, ms) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

// Draw a T x T map into a canvas: values via colour(v), masked above the diagonal.
export function drawMap(canvas, n, value, colour, px) {
  canvas.width = n * px; canvas.height = n * px;
  const g = canvas.getContext("2d");
  g.fillStyle = "#d9d9d9"; g.fillRect(0, 0, n * px, n * px);
  for (let i = 0; i < n; i++) for (let j = 0; j <= i; j++) {
    g.fillStyle = colour(value(i, j)); g.fillRect(j * px, i * px, px, px);
  }
}
