// Backward Lens: FF1 inputs x and FF2 gradients delta projected per layer x position. Each cell shows one
// token (the top or the bottom one, selectable), shaded by the gradient norm; hovering a cell (or Enter on
// it) asks the kernel for its full top-k and bottom-k with the target's rank (1 = top).
export function mount(ctx, box) {
  const { h, show, clip, i32, f32, blue, purple, ink, pct } = ctx.util;
  const { visibleColumns, spacer, onScroll, COL_PX, WINDOW_FROM } = ctx.vgrid;
  const m = ctx.model;
  let token = 0, which = "top", data = null;
  const alive = ctx.alive;
  const body = h("div", { class: "lv-bl-body" });
  const tip = h("div", { class: "lv-tip lv-bl-tip", role: "tooltip" });
  const pick = h("select", { class: "lv-bl-which", "aria-label": "token shown in each cell",
    onchange: (e) => { which = e.target.value; render(); } },
    h("option", { value: "top", text: "cells: top token" }), h("option", { value: "bottom", text: "cells: bottom token" }));
  box.append(h("div", { class: "lv-title" }, h("b", { text: "Backward Lens" }),
    " FF1 forward inputs x and FF2 VJPs δ; shade ‖δ‖; hover a cell for its top and bottom tokens ", pick), body, tip);
  let hoverKey = null;
  async function hover(part, l, j, cell) {
    const key = hoverKey = `${part}:${l}:${j}`;
    tip.style.display = "block";
    tip.style.left = (cell.offsetLeft + 20) + "px"; tip.style.top = (cell.offsetTop + cell.offsetHeight + 4) + "px";
    tip.replaceChildren(h("span", { text: "…" }));
    try {
      const { meta } = await ctx.request("bl_cell", { layer: l, position: j, part });
      if (hoverKey !== key || !alive()) return;
      const list = (title, xs) => h("div", { class: "lv-bl-list" }, h("div", { class: "lv-subtitle", text: title }),
        ...xs.map((t) => h("div", { class: "lv-bar-row" }, h("span", { class: "lv-tok", text: show(t.token) }), " ", pct(t.prob))));
      tip.replaceChildren(h("div", { class: "lv-tip-title", text:
        `${part === "ff2" ? "FF2 gradient δ" : "FF1 input x"} · layer ${l}, position ${j} · target rank ${meta.target_rank + 1} (1 = top) · ‖·‖ ${meta.norm.toPrecision(3)}` }),
        h("div", { class: "lv-bl-lists" }, list(`top ${meta.top.length}`, meta.top), list(`bottom ${meta.bottom.length}`, meta.bottom)));
    } catch (e) { tip.textContent = String(e.message || e); }
  }
  function table(title, meta, top, bottom, norms, ranks, cls, wrap) {
    const [L, T] = meta.shape, toks = m.get("tokens"), sel = m.get("selection") || {};
    let max = 0; for (const v of norms) max = Math.max(max, v);
    const bg = (t) => (cls === "ff1" ? blue : purple)(0.85 * t);
    const [c0, c1] = wrap ? visibleColumns(wrap, T) : [0, Math.min(T, WINDOW_FROM)];
    const fixed = T >= WINDOW_FROM ? { minWidth: COL_PX + "px", maxWidth: COL_PX + "px" } : {};
    const shown = which === "top" ? top : bottom;
    const rows = [h("tr", {}, h("th", { text: "" }), spacer(h, "th", c0),
      ...toks.slice(c0, c1).map((t, jj) => h("th", { text: clip(show(t), 6), title: `position ${c0 + jj}`, style: fixed })), spacer(h, "th", T - c1))];
    for (let l = L - 1; l >= 0; l--) {
      const cells = [h("th", { text: "L" + l }), spacer(h, "td", c0)];
      for (let j = c0; j < c1; j++) {
        const k = l * T + j, t = max > 0 ? norms[k] / max : 0, tok = meta.strings[shown[k]];
        cells.push(h("td", { class: "lv-bl-cell" + (j === sel.position && l === sel.layer ? " lv-selected" : ""), tabindex: "-1",
          "data-layer": l, "data-pos": j, "data-token": tok, "data-rank": ranks[k] + 1,
          "aria-label": `layer ${l}, position ${j}: ${which} token ${JSON.stringify(tok)}, target rank ${ranks[k] + 1}`,
          style: { background: bg(t), color: ink(bg(t)), ...fixed }, role: "gridcell", text: clip(show(tok), 8),
          onclick: () => ctx.select({ layer: l, position: j }),
          onmouseenter: (e) => hover(cls, l, j, e.target), onfocus: (e) => hover(cls, l, j, e.target),
          onmouseleave: () => { tip.style.display = "none"; } }));
      }
      cells.push(spacer(h, "td", T - c1));
      rows.push(h("tr", {}, ...cells.filter(Boolean)));
    }
    return h("table", { class: "lv-grid lv-bl-" + cls, role: "grid", "aria-label": title }, ...rows);
  }
  const wraps = { ff2: h("div", { class: "lv-grid-wrap" }), ff1: h("div", { class: "lv-grid-wrap" }) };
  for (const w of Object.values(wraps)) ctx.onDispose(onScroll(w, () => { if (data && data.meta.shape[1] >= WINDOW_FROM) render(); }));
  function render() {
    if (!data) return;
    const { meta, t1, b1, t2, b2, n2, r2, r1 } = data;
    wraps.ff2.replaceChildren(table("FF2 gradients δ (what an update writes)", meta, t2, b2, n2, r2, "ff2", wraps.ff2));
    wraps.ff1.replaceChildren(table("FF1 forward inputs x", meta, t1, b1, n2, r1, "ff1", wraps.ff1));
  }
  async function draw() {
    const my = ++token;
    body.textContent = "computing…";
    try {
      const { meta, buffers } = await ctx.request("backward", {});
      if (!alive() || my !== token) return;
      const [t1, b1, t2, b2] = buffers.slice(0, 4).map(i32);
      data = { meta, t1, b1, t2, b2, n2: f32(buffers[4]), r2: i32(buffers[5]), r1: i32(buffers[6]) };
      body.replaceChildren(h("div", { class: "lv-subtitle", text: "FF2 gradients δ (what an update writes)" }), wraps.ff2,
        h("div", { class: "lv-subtitle", text: "FF1 forward inputs x" }), wraps.ff1);
      render();
    } catch (e) { if (alive()) body.textContent = String(e.message || e); }
  }
  ctx.on("change:summary", draw); ctx.on("lv:theme", render);
  ctx.on("change:selection", render);
  draw();
}
