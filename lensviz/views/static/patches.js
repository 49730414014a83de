// Patch panel: attention patching (eta slider, layers/heads), head ablation, neuron toggles, segment
// mask and top-k attention. Every change re-runs the model in the kernel (slider moves debounced).
export function mount(ctx, box) {
  const { h, debounce } = ctx.util;
  const m = ctx.model;
  const list = () => (m.get("patches") || []).map((p) => ({ ...p }));
  const without = (type) => list().filter((p) => p.type !== type);
  const parseList = (s) => {
    s = s.trim(); if (!s || s === "all") return null;
    return s.split(/[ ,]+/).filter(Boolean).map((x) => Number.parseInt(x, 10)).filter((x) => Number.isInteger(x));
  };

  const eta = h("input", { type: "range", class: "lv-eta", min: -20, max: 20, step: 0.5, value: 0, "aria-label": "eta" });
  const etaOut = h("output", { class: "lv-eta-value", text: "0" });
  const layers = h("input", { type: "text", class: "lv-eta-layers", value: "all", size: 8, "aria-label": "patched layers" });
  const heads = h("input", { type: "text", class: "lv-eta-heads", value: "all", size: 8, "aria-label": "patched heads" });
  const sendEta = debounce(() => {
    const v = Number(eta.value), rest = without("attention");
    if (v !== 0) rest.push({ type: "attention", eta: v, layers: parseList(layers.value), heads: parseList(heads.value) });
    ctx.setPatches(rest);
  }, 200);
  eta.addEventListener("input", () => { etaOut.textContent = eta.value; sendEta(); });
  layers.addEventListener("change", sendEta); heads.addEventListener("change", sendEta);

  const ablate = h("button", { class: "lv-ablate", text: "ablate selected head", onclick: () => {
    const sel = m.get("selection"), ps = list();
    const found = ps.find((p) => p.type === "ablate" && p.layer === sel.layer);
    if (found) { if (!found.heads.includes(sel.head)) found.heads.push(sel.head); } else ps.push({ type: "ablate", layer: sel.layer, heads: [sel.head] });
    ctx.setPatches(ps);
  } });
  const seg = h("input", { type: "checkbox", class: "lv-segments", onchange: (e) => {
    const rest = without("segments"); if (e.target.checked) rest.push({ type: "segments", auto: true }); ctx.setPatches(rest);
  } });
  const topk = h("input", { type: "checkbox", class: "lv-topk" });
  const k = h("input", { type: "number", class: "lv-topk-k", min: 1, value: 8, style: { width: "4em" } });
  const sendTopk = () => { const rest = without("topk"); if (topk.checked) rest.push({ type: "topk", k: Number.parseInt(k.value, 10) || 1 }); ctx.setPatches(rest); };
  topk.addEventListener("change", sendTopk); k.addEventListener("change", () => topk.checked && sendTopk());
  const reset = h("button", { class: "lv-reset", text: "Reset", onclick: () => { eta.value = 0; etaOut.textContent = "0"; ctx.setPatches([]); } });
  const chips = h("div", { class: "lv-patch-list" });
  const code = h("code", { class: "lv-code" });
  const copy = h("button", { class: "lv-copy", text: "copy as code", onclick: () => {
    const pair = m.get("pair") || {}, tgt = pair.clean_prompt !== undefined ? `, target=${JSON.stringify(m.get("target"))}` +
      (pair.distractor ? `, distractor=${JSON.stringify(pair.distractor)}` : "") : "";
    const text = (pair.clean_prompt !== undefined ? `clean = lens.trace(${JSON.stringify(pair.clean_prompt)}${tgt})\n` : "") +
      `tr = lens.trace(${JSON.stringify(m.get("prompt"))}${tgt}, patches=${m.get("code") || "()"})`;
    if (navigator.clipboard) navigator.clipboard.writeText(text).catch(() => {});
    code.textContent = text;
  } });
  box.append(h("div", { class: "lv-title" }, h("b", { text: "Patch " }),
    h("label", {}, "η ", eta, " ", etaOut), " layers ", layers, " heads ", heads, " ", ablate, " ",
    h("label", {}, seg, " segment mask"), " ", h("label", {}, topk, " top-k attention k=", k), " ", reset, " ", copy),
    chips, code);

  const sync = () => {
    const ps = m.get("patches") || [];
    const att = ps.find((p) => p.type === "attention");
    if (document.activeElement !== eta || !m.get("patches")) { eta.value = att ? att.eta : 0; etaOut.textContent = String(eta.value); }
    seg.checked = ps.some((p) => p.type === "segments");
    const tk = ps.find((p) => p.type === "topk"); topk.checked = !!tk; if (tk) k.value = tk.k;
    chips.replaceChildren(...ps.map((p, i) => h("span", { class: "lv-chip lv-patch-chip", "data-type": p.type },
      describe(p), h("button", { class: "lv-x", title: "remove", text: "×", onclick: () => ctx.setPatches(list().filter((_, j) => j !== i)) }))));
  };
  const describe = (p) => p.type === "attention" ? `η=${p.eta} on ${p.layers ? "L" + p.layers.join(",") : "all layers"}${p.heads ? " H" + p.heads.join(",") : ""}`
    : p.type === "ablate" ? `ablate L${p.layer}H${p.heads.join(",")}`
    : p.type === "neuron" ? `L${p.layer}${p.expert === undefined ? "" : "E" + p.expert} #${p.neuron} ${p.mode === "on" ? "on" : "= " + p.value}`
    : p.type === "topk" ? `top-${p.k} attention`
    : p.type === "activation" ? `clean ${p.site} L${p.layer} @${p.position}`
    : p.type === "head" ? `clean head L${p.layer}H${p.heads.join(",")}` : "segment mask";
  ctx.on("change:patches", sync);
  ctx.on("lv:restore", () => { eta.blur(); sync(); });
  sync();
}
