// Attention and Reversed Attention: per-head norm grid (click selects layer and head), the selected
// layer's head thumbnails, and one large T x T map (triangle masked; RA on a diverging scale).
export function mount(ctx, box, kind) {
  const { h, show, clip, f32, u8, i8, green, purple, diverging, markerColour, gridKeys } = ctx.util;
  const m = ctx.model;
  let both = false, token = 0, scaleMode = "symlog", sumAxis = "rows";
  // The forward tab's head grid shows a head-importance measure (lv.head_importance, asked of the kernel
  // per trace): the direct logit attribution by default; ||A|| per head is nearly constant (rows of A sum to 1).
  let measure = "dla", imp = null, impToken = 0;
  const MEASURES = [["dla", "direct logit attribution"], ["ablation", "zero-ablation effect"], ["ra", "‖RA‖ (Reversed Attention)"], ["norm", "‖A‖"]];
  const measureSel = kind === "forward" ? h("select", { class: "lv-head-measure", "aria-label": "head importance measure",
    onchange: (e) => { measure = e.target.value; loadImportance(); } }, ...MEASURES.map(([v, label]) => h("option", { value: v, text: label }))) : null;
  async function loadImportance() {
    const my = ++impToken;
    imp = null; drawNorms();
    try {
      const { meta, buffers } = await ctx.request("importance", { measure });
      if (!alive() || my !== impToken) return;
      if (meta.missing) {        // the exact ablation: a background job (progress below, Stop in the header)
        norms.replaceChildren(h("div", { class: "lv-note lv-head-progress", role: "status", text: `computing the ${measure} of every head…` }));
        ctx.job({ type: "importance", measure });
        return;
      }
      imp = { meta, vals: f32(buffers[0]) };
    } catch (e) { if (alive() && my === impToken) { normsOnly(); note.append(h("span", { text: " (" + String(e.message || e) + ")" })); } return; }
    drawNorms();
  }
  // Head norms [2, L, H] (||A||, ||RA||) of the run shown: in the synced state, or for long prompts
  // (norms_meta.lazy) asked of the kernel once per run ("norms") when a grid first shows them.
  let normsGot = null, normsAsked = -1;
  function normsNow() {
    const meta = m.get("norms_meta"); if (!meta || !meta.shape) return null;
    if (!meta.lazy) return f32(m.get("norms"));
    if (normsGot && normsGot.gen === meta.gen) return normsGot.vals;
    if (normsAsked !== meta.gen) fetchNorms(meta.gen);
    return null;
  }
  async function fetchNorms(gen) {
    normsAsked = gen;
    try {
      const { buffers } = await ctx.request("norms", {});
      if (!alive() || (m.get("norms_meta") || {}).gen !== gen) return;
      normsGot = { gen, vals: f32(buffers[0]) };
      if (kind === "reversed") drawNorms(); else if (!imp) normsOnly();
    } catch (e) { if (alive()) { normsAsked = -1; note.textContent = String(e.message || e); } }
  }
  // Without a kernel (a saved page) the grid falls back to ||A|| per head, which the synced state holds.
  function normsOnly() {
    const meta = m.get("norms_meta"); if (!meta || !meta.shape) return;
    const [, L, H] = meta.shape, all = normsNow();
    if (!all) return;                // a long prompt's norms: drawn when they arrive
    impToken++; measure = "norm"; if (measureSel) measureSel.value = "norm";
    imp = { meta: { measure: "norm", signed: false, of: "shown" }, vals: all.slice(0, L * H) };
    drawNorms();
  }
  ctx.on("lv:restore", () => { if (kind === "forward" && !imp) normsOnly(); });
  ctx.on("msg:custom", (msg) => {
    if (kind !== "forward" || !msg) return;
    if (msg.type === "importance_done" && msg.measure === measure) loadImportance();
    else if (msg.type === "importance_progress" && msg.measure === measure) {
      const p = norms.querySelector(".lv-head-progress");
      if (p) p.textContent = `computing the ${measure} of every head: layer ${msg.done} of ${msg.total} · ${Number(msg.seconds).toFixed(1)} s`;
    }
  });
  ctx.on("change:error", () => { const p = norms.querySelector(".lv-head-progress"); if (p && m.get("error")) p.textContent = m.get("error"); });
  const { paintMap } = ctx.vgrid;
  const paint = (canvas, n, value, colour, px) => paintMap(canvas, n, value, colour, px, ctx.util.maskedColour());
  const alive = ctx.alive;
  const norms = h("div", { class: "lv-norms" });
  norms.addEventListener("keydown", (e) => {
    const meta = m.get("norms_meta"), sel = m.get("selection") || {};
    if (!meta || !meta.shape) return;
    const [, L, H] = meta.shape;
    gridKeys(e, (dr, dc) => ctx.select({ layer: Math.max(0, Math.min(L - 1, sel.layer - dr)),
      head: Math.max(0, Math.min(H - 1, sel.head + dc)) }));
  });
  const thumbs = h("div", { class: "lv-thumbs" });
  const bigs = h("div", { class: "lv-bigs" });
  const note = h("div", { class: "lv-note" });
  const side = kind === "reversed" ? h("label", { class: "lv-side" },
    h("input", { type: "checkbox", class: "lv-side-by-side", onchange: (e) => { both = e.target.checked; drawBig(); } }),
    " side by side with forward") : null;
  const scaleSel = kind === "reversed" ? h("select", { class: "lv-ra-scale", "aria-label": "Reversed Attention colour scale",
    onchange: (e) => { scaleMode = e.target.value; drawBig(); } }, ...ctx.scales.MODES.map(([v, label]) => h("option", { value: v, text: "scale: " + label }))) : null;
  const axisSel = h("select", { class: "lv-sum-axis", "aria-label": "sum the selected positions over",
    onchange: (e) => { sumAxis = e.target.value; drawBig(); } },
    h("option", { value: "rows", text: "set: sum of query rows" }), h("option", { value: "cols", text: "set: sum of key columns" }));
  box.append(h("div", { class: "lv-title" }, h("b", { text: kind === "reversed" ? "Reversed Attention ‖RA‖" : "Head importance " }),
    measureSel, " per head (click to select) ", side, " ", scaleSel, " ", axisSel), norms, thumbs, note, bigs);

  function drawNorms() {
    const meta = m.get("norms_meta"); if (!meta || !meta.shape) return;
    const [, L, H] = meta.shape, sel = m.get("selection") || {};
    if (kind === "forward" && !imp) { norms.replaceChildren(h("div", { class: "lv-note", text: "computing head importance…" })); return; }
    const all = kind === "forward" ? imp.vals : normsNow(), off = kind === "reversed" ? L * H : 0;
    if (!all) { norms.replaceChildren(h("div", { class: "lv-note lv-norms-loading", text: "computing ‖RA‖ of every head…" })); return; }
    const signed = kind === "forward" && imp.meta.signed;
    const what = kind === "forward" ? (MEASURES.find(([v]) => v === imp.meta.measure) || [, "value"])[1] : "norm";
    let max = 0; for (let i = 0; i < L * H; i++) max = Math.max(max, Math.abs(all[off + i]));
    const refocus = norms.contains(document.activeElement);
    const rows = [h("tr", {}, h("th", { text: "", role: "columnheader" }), ...Array.from({ length: H }, (_, k) => h("th", { role: "columnheader", text: "H" + k })))];
    for (let l = L - 1; l >= 0; l--) {
      const cells = [h("th", { role: "rowheader", text: "L" + l })];
      for (let k = 0; k < H; k++) {
        const v = all[off + l * H + k], t = max > 0 ? v / max : 0;
        const on = l === sel.layer && k === sel.head;
        cells.push(h("td", { class: "lv-norm-cell" + (on ? " lv-selected" : ""), role: "gridcell",
          tabindex: on ? "0" : "-1", "aria-selected": String(on), "aria-label": `layer ${l} head ${k}: ${what} ${v.toPrecision(3)}`,
          "data-layer": l, "data-head": k, "data-value": v.toPrecision(6), title: `L${l}H${k}: ${what} ${v.toPrecision(3)}`,
          style: { background: kind === "reversed" ? purple(t) : signed ? diverging(t) : green(t) },
          onclick: () => ctx.select({ layer: l, head: k }) }));
      }
      rows.push(h("tr", {}, ...cells));
    }
    norms.replaceChildren(h("table", { class: "lv-norm-grid", role: "grid",
      "aria-label": `${kind === "reversed" ? "Reversed Attention norm" : what} per layer (rows) and head (columns)`,
      "data-measure": kind === "forward" ? imp.meta.measure : "ra" }, ...rows),
      signed ? h("div", { class: "lv-head-legend" }, ctx.scales.legend(h, diverging, { scale_mode: "linear", scale: max }, 160)) : null);
    if (refocus) { const f = norms.querySelector('td[tabindex="0"]'); if (f) f.focus(); }
    const ranked = [];
    for (let l = 0; l < L; l++) for (let k = 0; k < H; k++) ranked.push([all[off + l * H + k], l, k]);
    ranked.sort((a, b) => Math.abs(b[0]) - Math.abs(a[0]));
    note.replaceChildren(h("span", { text: "top heads: " }), ...ranked.slice(0, 6).map(([v, l, k]) =>
      h("button", { class: "lv-chip lv-top-head", text: `L${l}H${k} ${v.toPrecision(2)}`, onclick: () => ctx.select({ layer: l, head: k }) })));
    if (kind === "reversed" && !meta.has_reversed) note.append(h("span", { text: " (no backward pass yet)" }));
    if (kind === "forward" && imp.meta.of === "unpatched") note.append(h("span", { text: " (of the unpatched run)" }));
  }

  async function drawThumbs() {
    const sel = m.get("selection") || {}, my = ++token;
    try {
      const { meta, buffers } = await ctx.request("thumbs", { layer: sel.layer, kind });
      if (!alive() || my !== token) return;
      const vals = meta.dtype === "u8" ? u8(buffers[0]) : i8(buffers[0]), n = meta.n, px = Math.max(1, Math.floor(48 / n));
      thumbs.replaceChildren(...Array.from({ length: meta.heads }, (_, k) => {
        const c = h("canvas", { class: "lv-thumb" + (k === sel.head ? " lv-selected" : ""), title: `L${sel.layer}H${k}`, "data-head": k,
          role: "img", "aria-label": `head ${k} of layer ${sel.layer} (thumbnail)` });
        paint(c, n, (i, j) => vals[k * n * n + i * n + j] / (meta.dtype === "u8" ? 255 : 127),
          meta.dtype === "u8" ? green : diverging, px);
        c.addEventListener("click", () => ctx.select({ head: k }));
        return c;
      }));
    } catch (e) { thumbs.textContent = String(e.message || e); }
  }

  async function oneMap(k, sel) {
    const { meta, buffers } = await ctx.request("attention", { layer: sel.layer, head: sel.head, kind: k,
      ...(k === "reversed" ? { scale: scaleMode } : {}) });
    const n = meta.n, vals = meta.dtype === "u8" ? u8(buffers[0]) : i8(buffers[0]);
    const px = n > 210 ? 1 : Math.max(2, Math.min(24, Math.floor(420 / n)));
    const canvas = h("canvas", { class: "lv-map lv-map-" + k, "data-layer": sel.layer, "data-head": sel.head, role: "img",
      "aria-label": `${k === "forward" ? "attention" : "Reversed Attention"} map of layer ${sel.layer} head ${sel.head}, ${n} by ${n}, rows are queries` });
    paint(canvas, n, (i, j) => vals[i * n + j] / (meta.dtype === "u8" ? 255 : 127), k === "forward" ? green : diverging, px);
    const g = canvas.getContext("2d");
    if (sel.position !== undefined) { g.strokeStyle = markerColour(); g.lineWidth = 2; g.strokeRect(0, sel.position * px, (sel.position + 1) * px, px); }
    for (const p of (sel.positions && sel.positions.length > 1 ? sel.positions : [])) {   // the selected set's rows / columns
      g.strokeStyle = markerColour(); g.lineWidth = 1;
      if (sumAxis === "rows") g.strokeRect(0, p * px, (p + 1) * px, px); else g.strokeRect(p * px, p * px, px, (n - p) * px);
    }
    canvas.addEventListener("click", (e) => {
      const r = canvas.getBoundingClientRect(), i = Math.floor((e.clientY - r.top) / px);
      if (i >= 0 && i < n) ctx.select({ position: i });
    });
    const toks = m.get("tokens");
    const label = `${k === "forward" ? "A" : "RA"} L${sel.layer}H${sel.head}` +
      (k === "reversed" ? ` (max |RA| ${meta.scale.toPrecision(3)})` : "") +
      ` · row = query ${sel.position} ${clip(show(toks[sel.position] || ""), 12)}`;
    const positions = sel.positions && sel.positions.length > 1 ? sel.positions : null;
    const sum = positions ? await setSum(k, sel, positions) : null;
    return h("figure", { class: "lv-fig" }, canvas, h("figcaption", { text: label }),
      k === "reversed" ? ctx.scales.legend(h, diverging, meta) : null, sum);
  }

  // Several selected positions: the sum of their query rows (where the set looks) or key columns (who
  // looks at the set), as one strip of T cells under the map, with the numbers on hover.
  async function setSum(k, sel, positions) {
    const { meta, buffers } = await ctx.request("attention_sum", { layer: sel.layer, head: sel.head, kind: k, positions, axis: sumAxis });
    const v = f32(buffers[0]), n = meta.n, px = n > 210 ? 1 : Math.max(2, Math.min(24, Math.floor(420 / n)));
    const c = h("canvas", { class: "lv-sum-strip lv-sum-" + k, width: n * px, height: 18, role: "img", "data-axis": meta.axis,
      "data-positions": meta.positions.join(","), "aria-label": `sum over ${meta.axis === "rows" ? "query rows" : "key columns"} ${meta.positions.join(", ")}` });
    const g = c.getContext("2d"), M = meta.max || 1;
    for (let j = 0; j < n; j++) { g.fillStyle = k === "forward" ? green(v[j] / M) : diverging(v[j] / M); g.fillRect(j * px, 0, px, 18); }
    c.addEventListener("mousemove", (e) => { const j = Math.floor((e.clientX - c.getBoundingClientRect().left) / px);
      if (j >= 0 && j < n) c.title = `${meta.axis === "rows" ? "key" : "query"} ${j}: ${v[j].toPrecision(4)}`; });
    c.dataset.values = Array.from(v, (x) => x.toPrecision(6)).join(",");
    return h("div", { class: "lv-sum" }, h("div", { class: "lv-subtitle", text:
      `set {${meta.positions.join(", ")}}: sum of ${meta.axis === "rows" ? "their query rows (where they look)" : "their key columns (who looks at them)"} · max ${M.toPrecision(3)}` }), c);
  }

  async function drawBig() {
    const sel = m.get("selection") || {}, my = ++token;
    try {
      const kinds = kind === "reversed" && both ? ["forward", "reversed"] : [kind];
      const figs = [];
      for (const k of kinds) figs.push(await oneMap(k, sel));
      if (alive() && my === token) bigs.replaceChildren(...figs);
    } catch (e) { if (alive()) bigs.textContent = String(e.message || e); }
  }
  const redraw = () => { drawNorms(); drawThumbs().then(drawBig); };
  ctx.on("change:selection", redraw); ctx.on("lv:theme", redraw);
  ctx.on("change:norms_meta", () => { if (kind === "forward") loadImportance(); redraw(); });   // a new run
  if (kind === "forward") loadImportance();
  redraw();
}
