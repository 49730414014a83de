// Logit lens grid: layers x positions, top-1 token per cell coloured by probability or target rank.
// Hover (or Enter / Space on the focused cell) asks the kernel for the cell's top-k; click or the arrow
// keys select layer and position everywhere. One tab stop: the selected cell (roving tabindex).
// Long prompts (grid_meta.lazy): the state holds only the first columns; the columns scrolled into view
// are asked for window by window ("grid" requests), kept for the grid generation (grid_meta.gen) they
// belong to and drawn as calm "loading" cells until they arrive. A re-run or site change is a new
// generation: what was kept is dropped and the columns in view are asked for again.
const FETCH_SETTLE_MS = 60;   // ask for missing windows once scrolling has paused this long
export function mount(ctx, box) {
  const { h, show, clip, i32, u8, green, rankColour, ink, pct, gridKeys } = ctx.util;
  const m = ctx.model;
  let mode = "prob";
  const group = "lv-site-" + Math.random().toString(36).slice(2);
  const siteSel = h("span", { class: "lv-sites", role: "radiogroup", "aria-label": "site" }, ...["pre", "mid", "post"].map((s) => h("label", {},
    h("input", { type: "radio", name: group, value: s, class: "lv-site-" + s,
      onchange: () => { m.set("site", s); m.save_changes(); } }), " " + s)));
  const modeSel = h("select", { class: "lv-colour", "aria-label": "colour by",
    onchange: (e) => { mode = e.target.value; draw(); } },
    h("option", { value: "prob", text: "colour: probability" }), h("option", { value: "rank", text: "colour: target rank" }));
  const table = h("table", { class: "lv-grid", role: "grid", "aria-label": "logit lens: top-1 token per layer (rows) and position (columns)" });
  const tip = h("div", { class: "lv-tip", role: "tooltip" });
  box.append(h("div", { class: "lv-title" }, h("b", { text: "Logit lens " }), siteSel, " ", modeSel),
    h("div", { class: "lv-grid-wrap" }, table), tip);

  let lastPos = null;                 // the selected column last scrolled into view
  // Long prompts: only the columns in view are drawn (vgrid.js), the rest stand as spacer cells.
  const { visibleColumns, spacer, onScroll, scrollToColumn, COL_PX, WINDOW_FROM } = ctx.vgrid;
  const wrap = box.querySelector(".lv-grid-wrap");
  ctx.onDispose(onScroll(wrap, () => {
    const T = (m.get("tokens") || []).length;
    if (store) store.failed.clear();          // a window that could not be had is asked for again
    if (T >= WINDOW_FROM) draw();
  }));

  // The columns that have arrived, [L, T] row-major with a flag per column, for one grid generation.
  let store = null, fetchTimer = null;
  function ingest(s, meta, ids, probs, ranks, changed) {
    const cols = [];
    for (const [a, b] of meta.columns || [[0, s.T]]) for (let j = a; j < b; j++) cols.push(j);
    const n = cols.length;
    if (ids.length !== s.L * n || probs.length !== s.L * n || ranks.length !== s.L * n) return false;
    for (let l = 0; l < s.L; l++) for (let i = 0; i < n; i++) {
      const k = l * s.T + cols[i], q = l * n + i;
      s.ids[k] = ids[q]; s.probs[k] = probs[q]; s.ranks[k] = ranks[q];
      if (changed && changed.length === s.L * n) s.changed[k] = changed[q];
    }
    for (const j of cols) s.have[j] = 1;
    Object.assign(s.strings, meta.strings);
    return true;
  }
  function current() {        // the store of the generation in the state (rebuilt when that changes)
    const meta = m.get("grid_meta");
    if (!meta || !meta.shape) return null;
    const [L, T] = meta.shape;
    if (store && store.gen === meta.gen && store.meta === meta && store.L === L && store.T === T) return store;
    const s = { meta, gen: meta.gen, L, T, window: meta.window || T, ids: new Int32Array(L * T), probs: new Uint8Array(L * T),
      ranks: new Int32Array(L * T), changed: new Uint8Array(L * T), have: new Uint8Array(T), strings: {},
      asked: new Set(), failed: new Map() };
    const ch = m.get("grid_changed");
    if (!ingest(s, meta, i32(m.get("grid_ids")), u8(m.get("grid_probs")), i32(m.get("grid_ranks")), ch ? u8(ch) : null)) return store;
    store = s;
    return s;
  }
  function fetchVisible() {   // one "grid" request per missing window in view
    fetchTimer = null;
    const s = current();
    if (!s || !ctx.alive()) return;
    const [c0, c1] = visibleColumns(wrap, s.T);
    for (let w = Math.floor(c0 / s.window); w * s.window < c1; w++) {
      const a = w * s.window, b = Math.min(s.T, a + s.window);
      if (s.asked.has(w) || s.failed.has(w) || s.have.subarray(a, b).every((x) => x)) continue;
      s.asked.add(w);
      ctx.request("grid", { window: w }).then(({ meta, buffers }) => {
        if (store !== s || meta.gen !== s.gen || !ctx.alive()) return;    // an older generation's answer
        if (ingest(s, meta, i32(buffers[0]), u8(buffers[1]), i32(buffers[2]), buffers[3] ? u8(buffers[3]) : null)) draw();
      }, (err) => {
        if (store !== s || !ctx.alive()) return;
        s.asked.delete(w); s.failed.set(w, String((err && err.message) || err)); draw();
      });
    }
  }
  function draw() {
    const s = current(); if (!s) return;
    const meta = s.meta;
    for (const r of siteSel.querySelectorAll("input")) r.checked = r.value === meta.site;
    const [L, T] = meta.shape, { ids, probs, ranks, have } = s;
    const sel = m.get("selection") || {}, toks = m.get("tokens");
    const set = new Set(sel.positions || []);
    const vocab = (m.get("summary") || {}).vocab_size || 2;
    const changed = (m.get("diff") || {}).changed;
    const refocus = table.contains(document.activeElement);
    const windowed = T >= WINDOW_FROM;
    table.classList.toggle("lv-windowed", windowed);
    const [c0, c1] = visibleColumns(wrap, T);
    const fixed = windowed ? { minWidth: COL_PX + "px", maxWidth: COL_PX + "px", width: COL_PX + "px" } : undefined;
    const head = h("tr", {}, h("th", { text: "", role: "columnheader" }), spacer(h, "th", c0), ...toks.slice(c0, c1).map((t, jj) => {
      const j = c0 + jj;
      return h("th", { role: "columnheader", class: "lv-col" + (j === sel.position ? " lv-selected" : "") + (set.has(j) ? " lv-in-set" : ""),
        title: `position ${j}: ${JSON.stringify(t)}`, text: clip(show(t), 6), style: fixed });
    }), spacer(h, "th", T - c1));
    const rows = [head];
    for (let l = L - 1; l >= 0; l--) {
      const cells = [h("th", { role: "rowheader", class: "lv-rowh" + (l === sel.layer ? " lv-selected" : ""), text: "L" + l }), spacer(h, "td", c0)];
      for (let j = c0; j < c1; j++) {
        const isSel = l === sel.layer && j === sel.position;
        const cls = (j === sel.position ? " lv-colsel" : "") + (isSel ? " lv-selected" : "") + (set.has(j) ? " lv-in-set" : "");
        if (!have[j]) {       // not arrived yet: a quiet placeholder that can still be selected
          const why = s.failed.get(Math.floor(j / s.window));
          cells.push(h("td", {
            role: "gridcell", tabindex: isSel ? "0" : "-1", "aria-selected": String(isSel), "aria-busy": why ? "false" : "true",
            "aria-label": `layer ${l}, position ${j}: ${why ? "not available: " + why : "loading"}`,
            class: "lv-cell lv-loading" + cls, "data-layer": l, "data-pos": j, "data-loading": "1",
            title: why || "", style: fixed, text: "·",
            onclick: () => ctx.select({ layer: l, position: j }),
          }));
          continue;
        }
        const k = l * T + j, p = probs[k] / 255, tok = s.strings[String(ids[k])];
        const bg = mode === "prob" ? green(p) : rankColour(ranks[k], vocab);
        const td = h("td", {
          role: "gridcell", tabindex: isSel ? "0" : "-1", "aria-selected": String(isSel),
          "aria-label": `layer ${l}, position ${j}: ${JSON.stringify(tok)}, p ${pct(p)}, target rank ${ranks[k] + 1}`,
          class: "lv-cell" + cls + ((changed ? changed[l] && changed[l][j] : s.changed[k]) ? " lv-changed" : ""),
          "data-layer": l, "data-pos": j, "data-token": tok, "data-rank": ranks[k] + 1,
          style: fixed ? { background: bg, color: ink(bg), ...fixed } : { background: bg, color: ink(bg) }, text: clip(show(tok), 7),
          onclick: () => ctx.select({ layer: l, position: j }),
          onmouseenter: (e) => hover(l, j, e.target),
          onmouseleave: () => { tip.style.display = "none"; },
        });
        cells.push(td);
      }
      cells.push(spacer(h, "td", T - c1));
      rows.push(h("tr", {}, ...cells.filter(Boolean)));
    }
    table.replaceChildren(...rows.map((r) => r));
    table.dataset.columns = `${c0}-${c1}`;
    table.dataset.gen = String(s.gen);
    let missing = false;
    for (let j = c0; j < c1 && !missing; j++) missing = !have[j];
    table.dataset.loading = String(missing);
    if (missing) { clearTimeout(fetchTimer); fetchTimer = setTimeout(fetchVisible, FETCH_SETTLE_MS); }
    if (refocus) { const f = table.querySelector('td[tabindex="0"]'); if (f) f.focus(); }
  }
  ctx.onDispose(() => clearTimeout(fetchTimer));
  const follow = () => {      // keep the selected column in view on a windowed grid
    const sel = m.get("selection") || {}, T = (m.get("tokens") || []).length;
    if (sel.position !== lastPos) { lastPos = sel.position; scrollToColumn(wrap, T, sel.position); }
    draw();
  };
  // Up goes to a higher layer (rows are drawn from the last layer down).
  table.addEventListener("keydown", (e) => {
    const meta = m.get("grid_meta"), sel = m.get("selection") || {};
    if (!meta || !meta.shape) return;
    const [L, T] = meta.shape;
    gridKeys(e, (dr, dc) => {
      const layer = Math.max(0, Math.min(L - 1, sel.layer - dr));
      const position = Math.max(0, Math.min(T - 1, sel.position + dc));
      tip.style.display = "none";
      ctx.select({ layer, position, range: null });
    }, () => {
      const cell = table.querySelector('td[tabindex="0"]');
      if (cell) hover(sel.layer, sel.position, cell);
    });
  });
  table.addEventListener("focusout", () => { tip.style.display = "none"; });
  let hoverKey = null;
  async function hover(l, j, cell) {
    hoverKey = `${l}:${j}`;
    tip.style.display = "block";
    tip.style.left = (cell.offsetLeft + 20) + "px"; tip.style.top = (cell.offsetTop + 24) + "px";
    tip.replaceChildren(h("span", { text: "…" }));
    try {
      const { meta } = await ctx.request("cell", { layer: l, position: j, site: m.get("site") });
      if (hoverKey !== `${l}:${j}` || !ctx.alive()) return;
      tip.replaceChildren(h("div", { class: "lv-tip-title", text: `layer ${l}, position ${j} (${meta.site}) · target rank ${meta.target_rank + 1} (1 = top) · ‖h‖ ${meta.norm.toFixed(2)}` }),
        ...meta.top.map((t) => h("div", { class: "lv-bar-row" }, h("span", { class: "lv-bar", style: { width: Math.max(2, 120 * t.prob) + "px" } }),
          h("span", { class: "lv-tok", text: show(t.token) }), " ", pct(t.prob))));
    } catch (err) { tip.textContent = String(err.message || err); }
  }
  for (const k of ["grid_meta", "grid_ids", "grid_probs", "grid_ranks", "grid_changed", "tokens", "diff", "summary"]) ctx.on("change:" + k, draw);
  ctx.on("change:selection", follow);
  ctx.on("lv:theme", draw);
  ctx.on("lv:restore", () => { tip.style.display = "none"; });
  draw();
  // A windowed grid opens at the selected column (the last position, where the target is predicted),
  // once the grid has a width, so the selected cell is drawn and is the grid's tab stop.
  const opener = new ResizeObserver(() => {
    if (!wrap.clientWidth) return;
    opener.disconnect();
    const sel = m.get("selection") || {}, T = (m.get("tokens") || []).length;
    if (T >= WINDOW_FROM && sel.position !== undefined) { lastPos = sel.position; scrollToColumn(wrap, T, sel.position); draw(); }
  });
  opener.observe(wrap);
  ctx.onDispose(() => opener.disconnect());
}
