// Logit lens grid: layers x positions, top-1 token per cell coloured by probability or target rank.
// Hover asks the kernel for the cell's top-k; click selects layer and position everywhere.
export function mount(ctx, box) {
  const { h, show, clip, i32, u8, green, rankColour, ink, pct } = ctx.util;
  const m = ctx.model;
  let mode = "prob";
  const siteSel = h("span", { class: "lv-sites" }, ...["pre", "mid", "post"].map((s) => h("label", {},
    h("input", { type: "radio", name: "lv-site-" + Math.random(), value: s, class: "lv-site-" + s,
      onchange: () => { m.set("site", s); m.save_changes(); } }), s)));
  const modeSel = h("select", { class: "lv-colour", "aria-label": "colour by",
    onchange: (e) => { mode = e.target.value; draw(); } },
    h("option", { value: "prob", text: "colour: probability" }), h("option", { value: "rank", text: "colour: target rank" }));
  const table = h("table", { class: "lv-grid" });
  const tip = h("div", { class: "lv-tip", role: "tooltip" });
  box.append(h("div", { class: "lv-title" }, h("b", { text: "Logit lens " }), siteSel, " ", modeSel),
    h("div", { class: "lv-grid-wrap" }, table), tip);

  function draw() {
    const meta = m.get("grid_meta"); if (!meta || !meta.shape) return;
    for (const r of siteSel.querySelectorAll("input")) r.checked = r.value === meta.site;
    const [L, T] = meta.shape, ids = i32(m.get("grid_ids")), probs = u8(m.get("grid_probs")), ranks = i32(m.get("grid_ranks"));
    const sel = m.get("selection") || {}, toks = m.get("tokens"), vocab = (m.get("summary") || {}).n_layers ? 50000 : 50000;
    const changed = (m.get("diff") || {}).changed;
    const head = h("tr", {}, h("th", { text: "" }), ...toks.map((t, j) => h("th", {
      class: "lv-col" + (j === sel.position ? " lv-selected" : ""), title: JSON.stringify(t), text: clip(show(t), 6) })));
    const rows = [head];
    for (let l = L - 1; l >= 0; l--) {
      const cells = [h("th", { class: "lv-rowh" + (l === sel.layer ? " lv-selected" : ""), text: "L" + l })];
      for (let j = 0; j < T; j++) {
        const k = l * T + j, p = probs[k] / 255, tok = meta.strings[String(ids[k])];
        const bg = mode === "prob" ? green(p) : rankColour(ranks[k], vocab);
        const dark = mode === "prob" ? p : 1 - Math.log1p(ranks[k]) / Math.log1p(vocab);
        const td = h("td", {
          class: "lv-cell" + (j === sel.position ? " lv-colsel" : "") + (l === sel.layer && j === sel.position ? " lv-selected" : "")
            + (changed && changed[l] && changed[l][j] ? " lv-changed" : ""),
          "data-layer": l, "data-pos": j, "data-token": tok, "data-rank": ranks[k],
          style: { background: bg, color: ink(dark) }, text: clip(show(tok), 7),
          onclick: () => ctx.select({ layer: l, position: j }),
          onmouseenter: (e) => hover(l, j, e),
          onmouseleave: () => { tip.style.display = "none"; },
        });
        cells.push(td);
      }
      rows.push(h("tr", {}, ...cells));
    }
    table.replaceChildren(...rows);
  }
  let hoverKey = null;
  async function hover(l, j, e) {
    hoverKey = `${l}:${j}`;
    tip.style.display = "block";
    tip.style.left = (e.target.offsetLeft + 20) + "px"; tip.style.top = (e.target.offsetTop + 24) + "px";
    tip.replaceChildren(h("span", { text: "…" }));
    try {
      const { meta } = await ctx.request("cell", { layer: l, position: j, site: m.get("site") });
      if (hoverKey !== `${l}:${j}`) return;
      tip.replaceChildren(h("div", { class: "lv-tip-title", text: `layer ${l}, position ${j} (${meta.site}) · target rank ${meta.target_rank} · ‖h‖ ${meta.norm.toFixed(2)}` }),
        ...meta.top.map((t) => h("div", { class: "lv-bar-row" }, h("span", { class: "lv-bar", style: { width: Math.max(2, 120 * t.prob) + "px" } }),
          h("span", { class: "lv-tok", text: show(t.token) }), " ", pct(t.prob))));
    } catch (err) { tip.textContent = String(err.message || err); }
  }
  for (const k of ["grid_meta", "grid_ids", "selection", "tokens", "diff"]) m.on("change:" + k, draw);
  draw();
}
