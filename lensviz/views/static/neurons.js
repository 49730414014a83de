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
        h("button", { class: "lv-chip", text: `L${r.layer}${ex(r)} #${r.dim}`, onclick: () => ctx.select({ layer: r.layer }) }),
        ` rank ${r.rank + 1} · `, h("span", { class: "lv-tok", text: r.tokens.map(show).join(" ") }))));
      if (!meta.hits.length) hits.textContent = "no value vector has it in its top tokens";
    } catch (err) { hits.textContent = String(err.message || err); }
  });
  box.append(h("div", { class: "lv-title" }, h("b", { text: "FFN sub-updates " }), q), hits, body);

  // Mixture-of-experts models: a neuron is (expert, neuron); `expert` is absent on dense MLPs.
  const ex = (s) => (s.expert === undefined ? "" : `E${s.expert}`);
  const same = (p, layer, n, e) => p.type === "neuron" && p.layer === layer && p.neuron === n && p.expert === e;
  const patched = (layer, n, e) => (m.get("patches") || []).find((p) => same(p, layer, n, e));
  function toggle(layer, n, e, mode) {
    const ps = (m.get("patches") || []).filter((p) => !same(p, layer, n, e));
    const at = e === undefined ? { type: "neuron", layer, neuron: n } : { type: "neuron", layer, neuron: n, expert: e };
    if (mode) ps.push(mode === "off" ? { ...at, value: 0, mode: "set" } : { ...at, mode: "on" });
    ctx.setPatches(ps);
  }
  const preds = (title, list) => h("div", { class: "lv-preds" }, h("i", { text: title + ": " }),
    ...list.slice(0, 5).map((t) => h("span", { class: "lv-chip", text: `${show(t.token)} ${pct(t.prob)}` })));
  async function draw() {
    const sel = m.get("selection") || {}, my = ++token;
    try {
      const include = (m.get("patches") || []).filter((p) => p.type === "neuron" && p.layer === sel.layer && p.expert === undefined).map((p) => p.neuron);
      const { meta } = await ctx.request("neurons", { layer: sel.layer, position: sel.position, include });
      if (!alive() || my !== token) return;
      const rows = meta.subupdates.map((s) => {
        const p = patched(meta.layer, s.neuron, s.expert), name = `L${meta.layer}${ex(s)} #${s.neuron}`;
        return h("tr", { class: "lv-neuron", "data-neuron": s.neuron, ...(s.expert === undefined ? {} : { "data-expert": s.expert }) },
          h("td", { text: name }),
          h("td", { class: "lv-num", text: s.coef.toFixed(3) }), h("td", { class: "lv-num", text: s.score.toFixed(3) }),
          h("td", { class: "lv-tok", text: s.tokens.map(show).join(" ") }),
          h("td", {}, h("button", { type: "button", "aria-pressed": String(!!(p && p.mode !== "on")), "aria-label": `switch ${name} off`, class: "lv-toggle" + (p && p.mode !== "on" ? " lv-active" : ""), "data-neuron": s.neuron,
            text: p && p.mode !== "on" ? "off ✓" : "off", onclick: () => toggle(meta.layer, s.neuron, s.expert, p && p.mode !== "on" ? null : "off") }),
            h("button", { type: "button", "aria-pressed": String(!!(p && p.mode === "on")), "aria-label": `switch ${name} on`, class: "lv-toggle-on" + (p && p.mode === "on" ? " lv-active" : ""), text: p && p.mode === "on" ? "on ✓" : "on",
              onclick: () => toggle(meta.layer, s.neuron, s.expert, p && p.mode === "on" ? null : "on") })));
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
