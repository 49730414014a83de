// Masks: which keys each query may attend to in this run (causal triangle, segment masks, padding),
// one T x T map (rows = queries, allowed = filled) and the segments of the prompt.
export function mount(ctx, box) {
  const { h, show, clip, green, drawMap } = ctx.util;
  const m = ctx.model;
  let token = 0;
  const body = h("div", { class: "lv-masks-body" });
  box.append(h("div", { class: "lv-title" }, h("b", { text: "Attention mask" }),
    " rows are queries, filled cells are the keys each query may attend to"), body);
  async function draw() {
    const my = ++token;
    body.textContent = "computing…";
    try {
      const { meta } = await ctx.request("masks", {});
      if (!ctx.alive() || my !== token) return;
      const n = meta.mask.length, px = Math.max(2, Math.min(20, Math.floor(360 / Math.max(n, 1))));
      let allowed = 0; for (const row of meta.mask) for (const v of row) allowed += v;
      const canvas = h("canvas", { class: "lv-map lv-mask-map", role: "img",
        "aria-label": `attention mask, ${n} by ${n}: ${allowed} allowed query-key pairs` });
      drawMap(canvas, n, (i, j) => meta.mask[i][j], (v) => green(v ? 0.75 : 0), px);
      const segs = (meta.segments || []).map((s, i) => h("span", { class: "lv-chip lv-segment" },
        `segment ${i}: positions ${s[0]}–${s[1] - 1}`));
      const toks = meta.tokens.map((t, i) => h("span", { class: "lv-chip", title: `position ${i}`, text: clip(show(t), 10) }));
      body.replaceChildren(h("figure", { class: "lv-fig" }, canvas,
        h("figcaption", { class: "lv-mask-caption", text: `${allowed} of ${n * n} pairs allowed · ${(meta.segments || []).length} segment(s)` })),
        h("div", { class: "lv-note" }, ...segs), h("div", { class: "lv-note" }, ...toks));
    } catch (e) { if (ctx.alive()) body.textContent = String(e.message || e); }
  }
  ctx.on("change:summary", draw); ctx.on("lv:theme", draw);
  draw();
}
