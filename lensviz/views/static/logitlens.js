// Logit lens grid: layers x positions, top-1 token per cell coloured by probability or target rank.
// Hover (or Enter / Space on the focused cell) asks the kernel for the cell's top-k; click or the arrow
// keys select layer and position everywhere. One tab stop: the selected cell (roving tabindex).
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

  function draw() {
    const meta = m.get("grid_meta"); if (!meta || !meta.shape) return;
    for (const r of siteSel.querySelectorAll("input")) r.checked = r.value === meta.site;
    const [L, T] = meta.shape, ids = i32(m.get("grid_ids")), probs = u8(m.get("grid_probs")), ranks = i32(m.get("grid_ranks"));
    const sel = m.get("selection") || {}, toks = m.get("tokens");
    const vocab = (m.get("summary") || {}).vocab_size || 2;
    const changed = (m.get("diff") || {}).changed;
    const refocus = table.contains(document.activeElement);
    const head = h("tr", {}, h("th", { text: "", role: "columnheader" }), ...toks.map((t, j) => h("th", {
      role: "columnheader", class: "lv-col" + (j === sel.position ? " lv-selected" : ""), title: JSON.stringify(t), text: clip(show(t), 6) })));
    const rows = [head];
    for (let l = L - 1; l >= 0; l--) {
      const cells = [h("th", { role: "rowheader", class: "lv-rowh" + (l === sel.layer ? " lv-selected" : ""), text: "L" + l })];
      for (let j = 0; j < T; j++) {
        const k = l * T + j, p = probs[k] / 255, tok = meta.strings[String(ids[k])];
        const bg = mode === "prob" ? green(p) : rankColour(ranks[k], vocab);
        const isSel = l === sel.layer && j === sel.position;
        const td = h("td", {
          role: "gridcell", tabindex: isSel ? "0" : "-1", "aria-selected": String(isSel),
          "aria-label": `layer ${l}, position ${j}: ${JSON.stringify(tok)}, p ${pct(p)}, target rank ${ranks[k]}`,
          class: "lv-cell" + (j === sel.position ? " lv-colsel" : "") + (isSel ? " lv-selected" : "")
            + (changed && changed[l] && changed[l][j] ? " lv-changed" : ""),
          "data-layer": l, "data-pos": j, "data-token": tok, "data-rank": ranks[k],
          style: { background: bg, color: ink(bg) }, text: clip(show(tok), 7),
          onclick: () => ctx.select({ layer: l, position: j }),
          onmouseenter: (e) => hover(l, j, e.target),
          onmouseleave: () => { tip.style.display = "none"; },
        });
        cells.push(td);
      }
      rows.push(h("tr", {}, ...cells));
    }
    table.replaceChildren(...rows);
    if (refocus) { const f = table.querySelector('td[tabindex="0"]'); if (f) f.focus(); }
  }
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
      tip.replaceChildren(h("div", { class: "lv-tip-title", text: `layer ${l}, position ${j} (${meta.site}) · target rank ${meta.target_rank} · ‖h‖ ${meta.norm.toFixed(2)}` }),
        ...meta.top.map((t) => h("div", { class: "lv-bar-row" }, h("span", { class: "lv-bar", style: { width: Math.max(2, 120 * t.prob) + "px" } }),
          h("span", { class: "lv-tok", text: show(t.token) }), " ", pct(t.prob))));
    } catch (err) { tip.textContent = String(err.message || err); }
  }
  for (const k of ["grid_meta", "grid_ids", "selection", "tokens", "diff", "summary"]) ctx.on("change:" + k, draw);
  ctx.on("lv:theme", draw);
  ctx.on("lv:restore", () => { tip.style.display = "none"; });
  draw();
}
