// Backward Lens: FF1 inputs x and FF2 gradients delta projected per layer x position
// ("top \ bottom" token per cell, shaded by the gradient norm; the target's rank on hover).
export function mount(ctx, box) {
  const { h, show, clip, i32, f32, blue, purple, ink } = ctx.util;
  const m = ctx.model;
  let token = 0;
  const alive = ctx.alive;
  const body = h("div", { class: "lv-bl-body" });
  box.append(h("div", { class: "lv-title" }, h("b", { text: "Backward Lens" }),
    " FF1 forward inputs x and FF2 VJPs δ; cells: top \\ bottom token, shade ‖δ‖"), body);
  function table(title, meta, top, bottom, norms, ranks, cls) {
    const [L, T] = meta.shape, toks = m.get("tokens"), sel = m.get("selection") || {};
    let max = 0; for (const v of norms) max = Math.max(max, v);
    const bg = (t) => (cls === "ff1" ? blue : purple)(0.85 * t);
    const rows = [h("tr", {}, h("th", { text: "" }), ...toks.map((t) => h("th", { text: clip(show(t), 6) })))];
    for (let l = L - 1; l >= 0; l--) {
      rows.push(h("tr", {}, h("th", { text: "L" + l }), ...Array.from({ length: T }, (_, j) => {
        const k = l * T + j, t = max > 0 ? norms[k] / max : 0;
        return h("td", { class: "lv-bl-cell" + (j === sel.position && l === sel.layer ? " lv-selected" : ""),
          "data-layer": l, "data-pos": j, title: `L${l} pos ${j} · ‖δ‖ ${norms[k].toPrecision(3)} · target rank ${ranks[k]}`,
          style: { background: bg(t), color: ink(bg(t)) }, role: "gridcell",
          text: `${clip(show(meta.strings[top[k]]), 6)} \\ ${clip(show(meta.strings[bottom[k]]), 6)}`,
          onclick: () => ctx.select({ layer: l, position: j }) });
      })));
    }
    return h("div", {}, h("div", { class: "lv-subtitle", text: title }), h("div", { class: "lv-grid-wrap" }, h("table", { class: "lv-grid lv-bl-" + cls, role: "grid", "aria-label": title }, ...rows)));
  }
  async function draw() {
    const my = ++token;
    body.textContent = "computing…";
    try {
      const { meta, buffers } = await ctx.request("backward", {});
      if (!alive() || my !== token) return;
      const [t1, b1, t2, b2] = buffers.slice(0, 4).map(i32), n2 = f32(buffers[4]), r2 = i32(buffers[5]), r1 = i32(buffers[6]);
      body.replaceChildren(table("FF2 gradients δ (what an update writes: bottom tokens)", meta, t2, b2, n2, r2, "ff2"),
        table("FF1 forward inputs x", meta, t1, b1, n2, r1, "ff1"));
    } catch (e) { if (alive()) body.textContent = String(e.message || e); }
  }
  const redraw = () => draw();
  ctx.on("change:summary", redraw); ctx.on("lv:theme", redraw);
  draw();
}
