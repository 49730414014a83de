// Activation patching heatmap of a prompt pair: effect = metric(corrupt run with the clean activation
// at (layer, position) or (layer, head) patched in) − metric(corrupt run). The attribution estimate
// (gradient × activation difference, from the captured backward pass) comes at once; the exact sweep
// is a background job (progress, Stop). Clicking a cell (or Enter / Space on it) applies that patch, so
// every view follows; clicking it again removes it. Arrow keys / Home / End move in the grid. Long
// prompts (vgrid.js): only the position columns in view are drawn, spacer cells stand for the rest.
export function mount(ctx, box) {
  const { h, show, clip, f32, diverging, gridKeys } = ctx.util;
  const { visibleColumns, spacer, onScroll, scrollToColumn, COL_PX, WINDOW_FROM } = ctx.vgrid;
  const m = ctx.model;
  const alive = ctx.alive;
  let site = "post", method = "attribution", normalized = false, token = 0;
  let cur = null;                                   // {l, c}: the focused cell
  const cache = new Map();                          // `${method}:${site}` -> {meta, vals}
  let pairKey = "";

  const siteSel = h("select", { class: "lv-sweep-site", "aria-label": "patched site" },
    ...[["pre", "resid pre"], ["mid", "resid mid"], ["post", "resid post"], ["head", "head outputs"]]
      .map(([v, label]) => h("option", { value: v, text: "site: " + label })));
  siteSel.value = site;
  const methodSel = h("select", { class: "lv-sweep-method", "aria-label": "method" },
    h("option", { value: "attribution", text: "attribution (grad × Δact)" }), h("option", { value: "exact", text: "exact" }));
  const exactBtn = h("button", { class: "lv-sweep-exact", text: "compute exact",
    title: "re-run the corrupt prompt once per cell (batched) with the clean activation patched in" });
  const norm = h("input", { type: "checkbox", class: "lv-sweep-normalized", "aria-label": "normalized" });
  const bar = h("progress", { class: "lv-sweep-bar", max: 1, value: 0 });
  const progText = h("span", { class: "lv-sweep-progress-text", role: "status", "aria-live": "polite" });
  const stop = h("button", { class: "lv-sweep-stop", text: "Stop", onclick: () => { ctx.send({ type: "stop" }); progText.textContent = "stopping…"; } });
  const prog = h("span", { class: "lv-sweep-progress", style: { display: "none" } }, bar, " ", progText, " ", stop);
  const readout = h("div", { class: "lv-sweep-readout", role: "status", "aria-live": "polite" });
  const legendBox = h("div", { class: "lv-sweep-legend" });
  const gridBox = h("div", { class: "lv-sweep-wrap" });
  const note = h("div", { class: "lv-note lv-sweep-note" });
  box.append(h("div", { class: "lv-title" }, h("b", { text: "Activation patching " }), "clean → corrupt · ",
    siteSel, " ", methodSel, " ", exactBtn, " ", h("label", {}, norm, " normalized"), " ", prog),
    note, legendBox, readout, gridBox);

  const key = () => `${method}:${site}`;
  const value = (d, i) => { const v = d.vals[i]; return normalized ? (Math.abs(d.meta.denom) > 1e-12 ? v / d.meta.denom : NaN) : v; };
  const colLabel = (c) => site === "head" ? "H" + c : `${c} ${show((m.get("tokens") || [])[c] ?? "")}`;
  const specOf = (l, c) => site === "head" ? { type: "head", layer: l, heads: [c] } : { type: "activation", layer: l, site, position: c };
  const same = (p, s) => p.type === s.type && p.layer === s.layer &&
    (s.type === "head" ? Array.isArray(p.heads) && p.heads.length === 1 && p.heads[0] === s.heads[0] : p.site === s.site && p.position === s.position);
  const isPatched = (l, c) => (m.get("patches") || []).some((p) => same(p, specOf(l, c)));
  const describe = (d, l, c) => {
    const e = d.vals[l * d.meta.shape[1] + c], n = Math.abs(d.meta.denom) > 1e-12 ? e / d.meta.denom : NaN;
    return `layer ${l} ${site === "head" ? "head " + c : "position " + colLabel(c)}: effect ${e.toPrecision(3)}` +
      (Number.isFinite(n) ? ` (normalized ${n.toPrecision(3)})` : "") + (isPatched(l, c) ? " · patched" : "");
  };

  function toggle(l, c) {
    const s = specOf(l, c), ps = (m.get("patches") || []).map((p) => ({ ...p }));
    const rest = ps.filter((p) => !same(p, s));
    ctx.setPatches(rest.length === ps.length ? [...ps, s] : rest);
  }

  const columns = () => { const d = cache.get(key()); return d && !d.meta.missing ? d.meta.shape[1] : 0; };
  const windowed = () => site !== "head" && columns() >= WINDOW_FROM;
  ctx.onDispose(onScroll(gridBox, () => { if (windowed()) draw(); }));

  function focusCell(l, c, focus = true) {
    const old = gridBox.querySelector('td[tabindex="0"]');
    let cell = gridBox.querySelector(`td[data-layer="${l}"][data-col="${c}"]`);
    if (!cell && windowed()) {             // a column outside the drawn window: bring it into view first
      cur = { l, c }; scrollToColumn(gridBox, columns(), c); draw();
      cell = gridBox.querySelector(`td[data-layer="${l}"][data-col="${c}"]`);
    }
    if (!cell) return;
    if (old && old !== cell) { old.tabIndex = -1; old.setAttribute("aria-selected", "false"); }
    cell.tabIndex = 0; cell.setAttribute("aria-selected", "true");
    cur = { l, c };
    if (focus) cell.focus();
    const d = cache.get(key()); if (d) readout.textContent = describe(d, l, c);
  }

  function draw() {
    const d = cache.get(key());
    if (!d) { gridBox.replaceChildren(); legendBox.replaceChildren(); return; }
    if (d.meta.missing) {
      gridBox.replaceChildren(h("div", { class: "lv-note", text: "exact sweep not computed yet: press “compute exact”." }));
      legendBox.replaceChildren(); return;
    }
    const [L, N] = d.meta.shape;
    let max = 0; for (let i = 0; i < L * N; i++) { const v = value(d, i); if (Number.isFinite(v)) max = Math.max(max, Math.abs(v)); }
    if (!cur || cur.l >= L || cur.c >= N) cur = { l: L - 1, c: N - 1 };
    const refocus = gridBox.contains(document.activeElement), scroll = [gridBox.scrollLeft, gridBox.scrollTop];
    const wide = windowed(), [c0, c1] = wide ? visibleColumns(gridBox, N) : [0, N];
    const fixed = wide ? { minWidth: COL_PX + "px", maxWidth: COL_PX + "px", width: COL_PX + "px" } : {};
    const head = [h("th", { role: "columnheader", text: "" }), spacer(h, "th", c0),
      ...Array.from({ length: c1 - c0 }, (_, i) => c0 + i).map((c) => h("th", { role: "columnheader", class: "lv-sweep-col",
        title: colLabel(c), style: wide ? fixed : undefined, text: site === "head" ? "H" + c : clip(show((m.get("tokens") || [])[c] ?? ""), 6) })),
      spacer(h, "th", N - c1)];
    const rows = [h("tr", {}, ...head.filter(Boolean))];
    for (let l = L - 1; l >= 0; l--) {
      const cells = [h("th", { role: "rowheader", text: "L" + l }), spacer(h, "td", c0)];
      for (let c = c0; c < c1; c++) {
        const i = l * N + c, v = value(d, i), on = cur.l === l && cur.c === c, patched = isPatched(l, c);
        cells.push(h("td", { class: "lv-sweep-cell" + (patched ? " lv-patched" : ""), role: "gridcell",
          tabindex: on ? "0" : "-1", "aria-selected": String(on), "data-layer": l, "data-col": c,
          "data-value": Number.isFinite(v) ? v.toPrecision(6) : "NaN",
          "aria-label": describe(d, l, c) + (patched ? " (Enter removes the patch)" : " (Enter patches it)"),
          title: describe(d, l, c), style: { ...fixed, background: Number.isFinite(v) && max > 0 ? diverging(v / max) : ctx.util.maskedColour() },
          onclick: () => { focusCell(l, c, false); toggle(l, c); },
          onmouseenter: () => { readout.textContent = describe(d, l, c); } }));
      }
      cells.push(spacer(h, "td", N - c1));
      rows.push(h("tr", {}, ...cells.filter(Boolean)));
    }
    const what = site === "head" ? "heads (columns)" : "positions (columns)";
    gridBox.replaceChildren(h("table", { class: "lv-sweep-grid" + (wide ? " lv-windowed" : ""), role: "grid",
      "data-site": site, "data-method": method, "data-columns": `${c0}-${c1}`,
      "aria-label": `patching effect (${method}) per layer (rows) and ${what}; Enter applies the patch` }, ...rows));
    legendBox.replaceChildren(ctx.scales.legend(h, diverging, { scale_mode: "linear", scale: max }));
    note.textContent = `${method === "exact" ? "exact" : "attribution estimate"} of metric(patched corrupt) − metric(corrupt)` +
      (normalized ? ", ÷ (metric clean − metric corrupt): 1 = fully restored" : "") +
      ` · clean ${d.meta.metric_clean.toFixed(3)}, corrupt ${d.meta.metric_corrupt.toFixed(3)} · blue > 0 pushes toward the clean run`;
    gridBox.scrollLeft = scroll[0]; gridBox.scrollTop = scroll[1];
    if (refocus) { const f = gridBox.querySelector('td[tabindex="0"]'); if (f) f.focus({ preventScroll: true }); }
  }

  async function load() {
    const k = key(), my = ++token;
    if (!cache.has(k) || cache.get(k).meta.missing) {
      try {
        const { meta, buffers } = await ctx.request("sweep", { site, method });
        if (!alive() || my !== token) return;
        cache.set(k, { meta, vals: f32(buffers[0]) });
      } catch (e) { if (alive() && my === token) { gridBox.replaceChildren(); note.textContent = String(e.message || e); } return; }
    }
    if (alive() && my === token) draw();
  }

  gridBox.addEventListener("keydown", (e) => {
    const d = cache.get(key()); if (!d || d.meta.missing || !cur) return;
    const [L, N] = d.meta.shape;
    gridKeys(e, (dr, dc) => {
      const l = Math.max(0, Math.min(L - 1, cur.l - dr));
      const c = dc === Infinity ? N - 1 : dc === -Infinity ? 0 : Math.max(0, Math.min(N - 1, cur.c + dc));
      focusCell(l, c);
    }, () => toggle(cur.l, cur.c));
  });
  siteSel.addEventListener("change", () => { site = siteSel.value; load(); });
  methodSel.addEventListener("change", () => { method = methodSel.value; load(); });
  norm.addEventListener("change", () => { normalized = norm.checked; draw(); });
  exactBtn.addEventListener("click", () => {
    prog.style.display = ""; bar.max = 1; bar.value = 0; progText.textContent = `exact sweep (${site}) queued…`;
    ctx.job({ type: "sweep", site });
  });
  ctx.on("msg:custom", (msg) => {
    if (!msg) return;
    if (msg.type === "sweep_progress") {
      prog.style.display = ""; bar.max = msg.total; bar.value = msg.done;
      progText.textContent = `exact ${msg.site}: ${msg.done} of ${msg.total} cells · ${Number(msg.seconds).toFixed(1)} s`;
    } else if (msg.type === "sweep_done") {
      prog.style.display = "none";
      cache.delete(`exact:${msg.site}`);
      if (msg.site === site) { method = "exact"; methodSel.value = "exact"; }
      load();
    }
  });
  ctx.on("change:done_seq", () => { if (progText.textContent.startsWith("stopping")) prog.style.display = "none"; });
  ctx.on("change:error", () => { if (m.get("error")) prog.style.display = "none"; });
  ctx.on("change:pair", () => {
    const p = m.get("pair") || {}, k = JSON.stringify([p.clean_prompt, p.clean_tokens, p.target, p.distractor, p.metric_corrupt]);
    if (k !== pairKey) { pairKey = k; cache.clear(); load(); }
  });
  ctx.on("change:patches", draw);
  ctx.on("lv:theme", draw);
  const p0 = m.get("pair") || {};
  pairKey = JSON.stringify([p0.clean_prompt, p0.clean_tokens, p0.target, p0.distractor, p0.metric_corrupt]);
  load();
}
