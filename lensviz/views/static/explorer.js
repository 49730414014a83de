// The lensviz Explorer: loads one ES module per view (sources shipped in the package and synced as
// `_modules`, imported from blob URLs: no CDN, no network) and links them through a shared context.

async function loadViews(model) {
  const sources = model.get("_modules");
  const mods = {};
  for (const [name, src] of Object.entries(sources)) {
    const url = URL.createObjectURL(new Blob([src], { type: "text/javascript" }));
    try { mods[name] = await import(url); } finally { URL.revokeObjectURL(url); }
  }
  return mods;
}

function makeContext(model, el, util) {
  let reqId = 0, seq = 0;
  const pending = new Map();
  const listeners = new Set();
  const onMsg = (msg, buffers) => {
    if (!msg || msg.type !== "reply" || !pending.has(msg.id)) return;
    const { resolve, reject } = pending.get(msg.id); pending.delete(msg.id);
    if (msg.error) reject(new Error(msg.error)); else resolve({ meta: msg.meta, buffers: buffers || [] });
  };
  model.on("msg:custom", onMsg);
  const ctx = {
    model, el, util,
    get: (key) => model.get(key),
    // Ask the kernel for one view's data; resolves to {meta, buffers}.
    request(what, params = {}) {
      const id = ++reqId;
      return new Promise((resolve, reject) => {
        pending.set(id, { resolve, reject });
        model.send({ type: "get", id, what, ...params });
      });
    },
    // Re-run the model; the latest request wins (results carry the sequence number).
    run(change = {}) {
      seq += 1;
      const msg = { type: "run", seq, prompt: model.get("prompt"), target: model.get("target"),
                    patches: model.get("patches"), ...change };
      ctx.pending = seq;
      el.classList.add("lv-busy");
      model.send(msg);
      return seq;
    },
    pending: 0,
    select(change) {
      model.set("selection", { ...model.get("selection"), ...change });
      model.save_changes();
    },
    setPatches(list) { ctx.run({ patches: list }); },
    destroy() { model.off("msg:custom", onMsg); listeners.forEach((f) => f()); },
    onDestroy(f) { listeners.add(f); },
  };
  model.on("change:done_seq", () => {
    if (model.get("done_seq") >= ctx.pending) el.classList.remove("lv-busy");
  });
  return ctx;
}

async function render({ model, el }) {
  el.classList.add("lv-explorer");
  let mods;
  try { mods = await loadViews(model); } catch (e) {
    el.textContent = "lensviz: could not load the views: " + e; return;
  }
  const util = mods.util;
  const ctx = makeContext(model, el, util);
  const { h } = util;
  const header = h("div", { class: "lv-header" });
  const strip = h("div", { class: "lv-strip" });
  const main = h("div", { class: "lv-main" });
  const left = h("div", { class: "lv-left" });
  const right = h("div", { class: "lv-right" });
  const tabs = h("div", { class: "lv-tabs", role: "tablist" });
  const panel = h("div", { class: "lv-panel" });
  const patchBox = h("div", { class: "lv-patchbox" });
  main.append(left, right);
  right.append(tabs, panel);
  el.append(header, strip, main, patchBox);

  mods.tokens.mount(ctx, header, strip);
  mods.logitlens.mount(ctx, left);
  const views = {
    attention: ["Attention", (c) => mods.attention.mount(ctx, c, "forward")],
    reversed: ["Reversed", (c) => mods.attention.mount(ctx, c, "reversed")],
    neurons: ["Neurons", (c) => mods.neurons && mods.neurons.mount(ctx, c)],
    backward: ["Backward Lens", (c) => mods.backward && mods.backward.mount(ctx, c)],
    flow: ["Flow graph", (c) => mods.flow && mods.flow.mount(ctx, c)],
  };
  let current = null;
  const show = (name) => {
    if (current && current.destroy) current.destroy();
    panel.replaceChildren();
    for (const b of tabs.children) b.setAttribute("aria-selected", String(b.dataset.tab === name));
    const box = h("div", { class: "lv-view lv-view-" + name });
    panel.append(box);
    current = views[name][1](box) || null;
    if (model.get("tab") !== name) { model.set("tab", name); model.save_changes(); }
  };
  for (const [name, [label]] of Object.entries(views)) {
    tabs.append(h("button", { class: "lv-tab", role: "tab", "data-tab": name, text: label, onclick: () => show(name) }));
  }
  mods.patches.mount(ctx, patchBox);
  show(views[model.get("tab")] ? model.get("tab") : "attention");
  return () => ctx.destroy();
}

export default { render };
