// Neurons (LM-Debugger): the top sub-updates m_i v_i at the selected layer and position, each value
// vector's tokens and an on/off toggle that re-runs the model; plus a value-vector search box.
export function mount(ctx, box) {
  const { h, show, pct } = ctx.util;
  const m = ctx.model;
  let token = 0;
  const alive = ctx.alive;
  const body = h("div", { class: "lv-neuron-body" });
  const q = h("input", { type: "search", class: "lv-search", placeholder: "which value vectors promote… (token)", "aria-label": "search value vectors" });
  const hits = h("div", { class: "lv-hits" });
  q.addEventListener("keydown", async (e) => {
    if (e.key !== "Enter" || !q.value) return;
    hits.textContent = "searching…";
    try {
      const { meta } = await ctx.request("search", { token: q.value });
      hits.replaceChildren(...meta.hits.map((r) => h("div", { class: "lv-hit" },
        h("button", { class: "lv-chip", text: `L${r.layer} #${r.dim}`, onclick: () => ctx.select({ layer: r.layer }) }),
        ` rank ${r.rank + 1} · `, h("span", { class: "lv-tok", text: r.tokens.map(show).join(" ") }))));
      if (!meta.hits.length) hits.textContent = "no value vector has it in its top tokens";
    } catch (err) { hits.textContent = String(err.message || err); }
  });
  box.append(h("div", { class: "lv-title" }, h("b", { text: "FFN sub-updates " }), q), hits, body);

  const patched = (layer, n) => (m.get("patches") || []).find((p) => p.type === "neuron" && p.layer === layer && p.neuron === n);
  function toggle(layer, n, mode) {
    const ps = (m.get("patches") || []).filter((p) => !(p.type === "neuron" && p.layer === layer && p.neuron === n));
    if (mode) ps.push(mode === "off" ? { type: "neuron", layer, neuron: n, value: 0, mode: "set" } : { type: "neuron", layer, neuron: n, mode: "on" });
    ctx.setPatches(ps);
  }
  const preds = (title, list) => h("div", { class: "lv-preds" }, h("i", { text: title + ": " }),
    ...list.slice(0, 5).map((t) => h("span", { class: "lv-chip", text: `${show(t.token)} ${pct(t.prob)}` })));
  async function draw() {
    const sel = m.get("selection") || {}, my = ++token;
    try {
      const include = (m.get("patches") || []).filter((p) => p.type === "neuron" && p.layer === sel.layer).map((p) => p.neuron);
      const { meta } = await ctx.request("neurons", { layer: sel.layer, position: sel.position, include });
      if (!alive() || my !== token) return;
      const rows = meta.subupdates.map((s) => {
        const p = patched(meta.layer, s.neuron);
        return h("tr", { class: "lv-neuron", "data-neuron": s.neuron },
          h("td", { text: `L${meta.layer} #${s.neuron}` }),
          h("td", { class: "lv-num", text: s.coef.toFixed(3) }), h("td", { class: "lv-num", text: s.score.toFixed(3) }),
          h("td", { class: "lv-tok", text: s.tokens.map(show).join(" ") }),
          h("td", {}, h("button", { type: "button", "aria-pressed": String(!!(p && p.mode !== "on")), "aria-label": `switch L${meta.layer} #${s.neuron} off`, class: "lv-toggle" + (p && p.mode !== "on" ? " lv-active" : ""), "data-neuron": s.neuron,
            text: p && p.mode !== "on" ? "off ✓" : "off", onclick: () => toggle(meta.layer, s.neuron, p && p.mode !== "on" ? null : "off") }),
            h("button", { type: "button", "aria-pressed": String(!!(p && p.mode === "on")), "aria-label": `switch L${meta.layer} #${s.neuron} on`, class: "lv-toggle-on" + (p && p.mode === "on" ? " lv-active" : ""), text: p && p.mode === "on" ? "on ✓" : "on",
              onclick: () => toggle(meta.layer, s.neuron, p && p.mode === "on" ? null : "on") })));
      });
      body.replaceChildren(h("div", { class: "lv-note", text: `layer ${meta.layer}, position ${meta.position}` }),
        preds("before the MLP", meta.before), preds("after", meta.after),
        h("table", { class: "lv-neuron-table" }, h("tr", {}, ...["value", "m", "|m|·‖v‖", "tokens of m·v", ""].map((t) => h("th", { text: t }))), ...rows));
    } catch (e) { if (alive()) body.textContent = String(e.message || e); }
  }
  const redraw = () => draw();
  for (const k of ["selection", "summary", "patches"]) ctx.on("change:" + k, redraw);
  draw();
}
