// The lensviz Explorer: loads one ES module per view (sources shipped in the package and synced as
// `_modules`, imported from blob URLs: no CDN, no network, no globals) and links them through a shared
// context. Talks to the kernel only with model.send / "msg:custom" (anywidget, marimo, Voilà, VS Code).

async function loadViews(model) {
  const sources = model.get("_modules");
  const mods = {};
  for (const [name, src] of Object.entries(sources)) {
    const url = URL.createObjectURL(new Blob([src], { type: "text/javascript" }));
    try { mods[name] = await import(url); } finally { URL.revokeObjectURL(url); }
  }
  return mods;
}

// How long a request may go without any word from the kernel before the widget says so.
const KERNEL_WAIT_MS = 800;

// A scope owns listeners: ctx.on(event, f) registers on the model (or, for "lv:*" names, on the
// widget's own bus) and dispose() removes every one. Each tab's view gets a child scope, disposed
// (with the view's own destroy) when the tab changes or the widget is removed / re-displayed.
function makeScope(parent, model, bus) {
  const offs = [];
  let alive = true;
  const scope = Object.create(parent);
  scope.on = (event, f) => {
    if (event.startsWith("lv:")) { (bus[event] = bus[event] || new Set()).add(f); offs.push(() => bus[event].delete(f)); }
    else { model.on(event, f); offs.push(() => model.off(event, f)); }
  };
  scope.onDispose = (f) => offs.push(f);
  scope.alive = () => alive;
  scope.child = () => { const c = makeScope(scope, model, bus); offs.push(() => c.dispose()); return c; };
  scope.dispose = () => { alive = false; offs.splice(0).reverse().forEach((f) => f()); };
  return scope;
}

function makeContext(model, el, util) {
  let reqId = 0, seq = 0, waitTimer = null;
  const pending = new Map();
  const bus = {};
  const emit = (event, ...args) => { for (const f of [...(bus[event] || [])]) f(...args); };
  const base = {
    model, el, util,
    get: (key) => model.get(key),
    emit,
    pending: 0,
    // Ask the kernel for one view's data; resolves to {meta, buffers}.
    request(what, params = {}) {
      const id = ++reqId;
      return new Promise((resolve, reject) => {
        pending.set(id, { resolve, reject });
        sendOrSay({ type: "get", id, what, ...params });
      });
    },
    // Re-run the model; the latest request wins (results carry the sequence number).
    run(change = {}) {
      seq += 1;
      const msg = { type: "run", seq, prompt: model.get("prompt"), target: model.get("target"),
                    patches: model.get("patches"), ...change };
      ctx.pending = seq;
      el.classList.add("lv-busy");
      sendOrSay(msg);
      return seq;
    },
    select(change) {
      model.set("selection", { ...model.get("selection"), ...change });
      model.save_changes();
    },
    setPatches(list) { ctx.run({ patches: list }); },
    send(msg) { sendOrSay(msg); },
  };
  const ctx = makeScope(base, model, bus);
  const note = util.h("div", { class: "lv-kernel-note", role: "status", "aria-live": "polite" });
  ctx.kernelNote = note;
  // Any message from the kernel shows it is there: clear the "no kernel" note.
  const heard = () => { clearTimeout(waitTimer); waitTimer = null; note.textContent = ""; el.classList.remove("lv-no-kernel"); };
  const noKernel = () => {
    waitTimer = null;
    el.classList.remove("lv-busy");
    el.classList.add("lv-no-kernel");
    note.textContent = model.get("_static")
      ? "This is a static export: re-running the model needs a Python kernel (open the notebook with one). " +
        "The view shows the exported state."
      : "No Python kernel answered within a second: this needs a running kernel " +
        "(a saved or exported page has none). The view shows the last computed state.";
    emit("lv:restore");                       // controls go back to the state shown
  };
  function sendOrSay(msg) {
    try { model.send(msg); } catch (e) { noKernel(); return; }
    if (!waitTimer) waitTimer = setTimeout(noKernel, KERNEL_WAIT_MS);
  }
  ctx.on("msg:custom", (msg, buffers) => {
    heard();
    if (!msg || msg.type !== "reply" || !pending.has(msg.id)) return;
    const { resolve, reject } = pending.get(msg.id); pending.delete(msg.id);
    if (msg.error) reject(new Error(msg.error)); else resolve({ meta: msg.meta, buffers: buffers || [] });
  });
  ctx.on("change:done_seq", () => {
    heard();
    if (model.get("done_seq") >= ctx.pending) el.classList.remove("lv-busy");
  });
  ctx.onDispose(() => { clearTimeout(waitTimer); pending.clear(); });
  return ctx;
}

// The host's theme: JupyterLab (body[data-jp-theme-light]), VS Code (body.vscode-dark /
// vscode-high-contrast), marimo and others (.dark / [data-theme=dark] on <html> or <body>).
function hostIsDark(el) {
  const b = document.body, d = document.documentElement;
  if (b && b.dataset.jpThemeLight !== undefined) return b.dataset.jpThemeLight === "false";
  if (b && (b.classList.contains("vscode-dark") || b.classList.contains("vscode-high-contrast"))) return true;
  if (b && b.classList.contains("vscode-light")) return false;
  for (const n of [d, b]) {
    if (!n) continue;
    if (n.classList.contains("dark") || n.dataset.theme === "dark" || n.classList.contains("dark-theme")) return true;
  }
  return !!(el.closest && el.closest(".dark, [data-theme='dark']"));
}

function followTheme(ctx, el, util) {
  const apply = () => {
    const dark = hostIsDark(el);
    if (dark === el.classList.contains("lv-dark") && el.dataset.lvTheme) return;
    el.classList.toggle("lv-dark", dark);
    el.dataset.lvTheme = dark ? "dark" : "light";
    util.setTheme(dark);
    ctx.emit("lv:theme");
  };
  apply();
  const obs = new MutationObserver(apply);
  for (const n of [document.documentElement, document.body]) {
    if (n) obs.observe(n, { attributes: true, attributeFilter: ["class", "data-jp-theme-light", "data-theme"] });
  }
  ctx.onDispose(() => obs.disconnect());
}

async function render({ model, el }) {
  el.classList.add("lv-explorer");
  // Keys pressed inside the widget are the widget's: the host's notebook shortcuts (arrow keys move
  // cells, Enter edits, Shift+Enter runs) must not fire as well. Escape still reaches the host.
  el.setAttribute("data-lm-suppress-shortcuts", "true");
  const keep = (e) => { if (e.key !== "Escape") e.stopPropagation(); };
  el.addEventListener("keydown", keep);
  let mods;
  try { mods = await loadViews(model); } catch (e) {
    el.textContent = "lensviz: could not load the views: " + e; return;
  }
  const util = mods.util;
  const ctx = makeContext(model, el, util);
  ctx.vgrid = mods.vgrid;            // long-prompt helpers (windowed grids, one-pass maps)
  ctx.scales = mods.scales;          // signed-map colour scales and their drawn legend
  const { h } = util;
  followTheme(ctx, el, util);
  const header = h("div", { class: "lv-header" });
  const strip = h("div", { class: "lv-strip" });
  const main = h("div", { class: "lv-main" });
  const left = h("div", { class: "lv-left" });
  const right = h("div", { class: "lv-right" });
  const tabs = h("div", { class: "lv-tabs", role: "tablist", "aria-label": "views" });
  const panel = h("div", { class: "lv-panel", role: "tabpanel" });
  const patchBox = h("div", { class: "lv-patchbox", role: "group", "aria-label": "patches" });
  const stepBox = h("div", { class: "lv-stepbox", role: "group", "aria-label": "generation" });
  main.append(left, right);
  right.append(tabs, panel);
  el.replaceChildren(header, stepBox, strip, main, patchBox, ctx.kernelNote);   // the note sticks to the bottom of the view

  mods.livefeel.install(ctx, el, header);
  mods.steps.mount(ctx, stepBox);
  mods.tokens.mount(ctx, header, strip);
  mods.pairs.mount(ctx, header, strip);   // prompt pairs and metrics (marks the strip drawn just above)
  mods.logitlens.mount(ctx, left);
  const views = {
    attention: ["Attention", (c, box) => mods.attention.mount(c, box, "forward")],
    reversed: ["Reversed", (c, box) => mods.attention.mount(c, box, "reversed")],
    neurons: ["Neurons", (c, box) => mods.neurons.mount(c, box)],
    backward: ["Backward Lens", (c, box) => mods.backward.mount(c, box)],
    flow: ["Flow graph", (c, box) => mods.flow.mount(c, box)],
    masks: ["Masks", (c, box) => mods.masks.mount(c, box)],
  };
  if ((model.get("pair") || {}).clean_prompt !== undefined) views.patching = ["Patching", (c, box) => mods.patching.mount(c, box)];
  let current = null;
  const show = (name, focus = false) => {
    if (current) current.dispose();           // the old view's listeners and its destroy()
    current = ctx.child();
    panel.replaceChildren();
    for (const b of tabs.children) {
      const on = b.dataset.tab === name;
      b.setAttribute("aria-selected", String(on));
      b.tabIndex = on ? 0 : -1;
      if (on) { panel.setAttribute("aria-labelledby", b.id); if (focus) b.focus(); }
    }
    const box = h("div", { class: "lv-view lv-view-" + name });
    panel.append(box);
    const view = views[name][1](current, box);
    if (view && view.destroy) current.onDispose(() => view.destroy());
    if (model.get("tab") !== name) { model.set("tab", name); model.save_changes(); }
  };
  const uid = Math.random().toString(36).slice(2);
  const names = Object.keys(views);
  for (const [name, [label]] of Object.entries(views)) {
    tabs.append(h("button", { class: "lv-tab", role: "tab", id: `lv-tab-${name}-${uid}`, "data-tab": name,
      text: label, onclick: () => show(name) }));
  }
  // Arrow keys move between tabs (ARIA tabs pattern); Tab leaves the tab list.
  tabs.addEventListener("keydown", (e) => {
    const i = names.indexOf(model.get("tab")), n = names.length;
    const j = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: n - 1 }[e.key];
    if (j === undefined) return;
    e.preventDefault();
    show(names[(j + n) % n], true);
  });
  mods.patches.mount(ctx, patchBox);
  show(views[model.get("tab")] ? model.get("tab") : "attention");
  return () => { ctx.dispose(); el.removeEventListener("keydown", keep); };
}

export default { render };
