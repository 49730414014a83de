// Flow graph (VISIT): a layered SVG of the selected position and layers. Nodes are labelled with their
// top token; hover shows top tokens, target rank and what an edge's weight means.
const NS = "http://www.w3.org/2000/svg";
const svg = (tag, attrs = {}) => {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
};
export function mount(ctx, box) {
  const { h, show, clip, rankColour, maskedColour } = ctx.util;
  const m = ctx.model;
  let token = 0;
  const alive = ctx.alive;
  const layersIn = h("input", { type: "text", class: "lv-flow-layers", size: 10, "aria-label": "layers",
    placeholder: "layers, e.g. 27 28 29" });
  const body = h("div", { class: "lv-flow-body" });
  const tip = h("div", { class: "lv-tip", role: "tooltip" });
  layersIn.addEventListener("change", () => draw());
  box.append(h("div", { class: "lv-title" }, h("b", { text: "Flow graph " }), "layers ", layersIn), body, tip);
  async function draw() {
    const sel = m.get("selection") || {}, my = ++token;
    const chosen = layersIn.value.trim() ? layersIn.value.split(/[ ,]+/).map((x) => Number.parseInt(x, 10)).filter(Number.isInteger) : [sel.layer];
    body.textContent = "computing…";
    try {
      const { meta } = await ctx.request("flow", { position: sel.position, layers: chosen });
      if (!alive() || my !== token) return;
      body.replaceChildren(zoomable(drawGraph(meta)));
    } catch (e) { if (alive()) body.textContent = String(e.message || e); }
  }
  function drawGraph(g) {
    // layout: rows by node "row" (layer-major, sublayer-minor), columns in order of appearance
    const rows = new Map();
    for (const n of g.nodes) { const r = n.row ?? 0; if (!rows.has(r)) rows.set(r, []); rows.get(r).push(n); }
    const order = [...rows.keys()].sort((a, b) => b - a);
    let widest = 1; for (const ns of rows.values()) widest = Math.max(widest, ns.length);
    const W = Math.max(900, 120 * widest), rowH = 80, pos = new Map();
    order.forEach((r, i) => { const ns = rows.get(r); ns.forEach((n, j) => pos.set(n.id, [40 + (j + 0.5) * (W - 80) / ns.length, 30 + i * rowH])); });
    const root = svg("svg", { class: "lv-flow", role: "img", "aria-label": `flow graph: ${g.nodes.length} nodes, ${g.edges.length} edges`, width: W, height: 40 + order.length * rowH, viewBox: `0 0 ${W} ${40 + order.length * rowH}` });
    let maxW = 0; for (const e of g.edges) maxW = Math.max(maxW, Math.abs(e.weight));
    for (const e of g.edges) {
      const a = pos.get(e.source), b = pos.get(e.target); if (!a || !b) continue;
      const line = svg("line", { x1: a[0], y1: a[1], x2: b[0], y2: b[1], class: "lv-edge lv-edge-" + (e.kind || ""),
        "stroke-width": 0.5 + 5 * Math.abs(e.weight) / (maxW || 1) });
      const t = svg("title"); t.textContent = `${e.kind || "edge"}: ${e.meaning || "weight"} = ${Number(e.weight).toPrecision(3)}`;
      line.append(t); root.append(line);
    }
    for (const n of g.nodes) {
      const [x, y] = pos.get(n.id);
      const grp = svg("g", { class: "lv-node lv-node-" + (n.kind || ""), transform: `translate(${x},${y})`, "data-id": n.id,
        ...(n.expert === undefined ? {} : { "data-expert": n.expert }) });
      const vocab = (m.get("summary") || {}).vocab_size || 2;
      const c = svg("circle", { r: 9, fill: n.target_rank === undefined ? maskedColour() : rankColour(n.target_rank, vocab) });
      const label = svg("text", { y: -14, "text-anchor": "middle", class: "lv-node-label" });
      label.textContent = clip(show(n.label ?? ""), 14);
      const t = svg("title");
      // MLP neurons carry their name ("L1 #5"; on mixture-of-experts models "L1E2 #5", expert 2's neuron 5)
      const where = n.name ? " " + n.name : `${n.layer !== undefined ? " L" + n.layer : ""}${n.head !== undefined && n.head !== null ? " H" + n.head : ""}`;
      t.textContent = `${n.kind || "node"}${where}` +
        ` · target rank ${n.target_rank === undefined || n.target_rank === null ? "?" : n.target_rank + 1} (1 = top)\n` + (n.top || []).map((x) => `${show(x.token)} ${(100 * x.prob).toFixed(1)}%`).join("\n");
      grp.append(c, label, t); root.append(grp);
    }
    return root;
  }
  // Zoom (wheel, or the + / − buttons) and pan (drag) by moving the SVG's viewBox; "fit" shows it all.
  // The drawing is shown at its own size (labels at 12 px) inside a scrolling-free frame.
  function zoomable(root) {
    const [x0, y0, W0, H0] = root.getAttribute("viewBox").split(" ").map(Number);
    let vb = [x0, y0, W0, H0];
    const frameH = Math.min(H0, 560);
    root.setAttribute("width", "100%"); root.setAttribute("height", String(frameH));
    root.setAttribute("preserveAspectRatio", "xMidYMin meet");
    const set = (v) => { vb = v; root.setAttribute("viewBox", v.map((x) => x.toFixed(1)).join(" ")); frame.dataset.zoom = (W0 / v[2]).toFixed(3); };
    const zoom = (f, cx = vb[0] + vb[2] / 2, cy = vb[1] + vb[3] / 2) => {
      const w = Math.min(W0 * 1.5, Math.max(W0 / 20, vb[2] / f)), k = w / vb[2], hgt = vb[3] * k;
      set([cx - (cx - vb[0]) * k, cy - (cy - vb[1]) * k, w, hgt]);
    };
    const fit = () => set([x0, y0, W0, H0]);
    const frame = h("div", { class: "lv-flow-frame", tabindex: "0", "aria-label": "flow graph: wheel or + / − to zoom, drag or arrow keys to pan, 0 to fit" });
    const tools = h("div", { class: "lv-flow-tools" },
      h("button", { class: "lv-zoom-in", text: "+", "aria-label": "zoom in", onclick: () => zoom(1.4) }),
      h("button", { class: "lv-zoom-out", text: "−", "aria-label": "zoom out", onclick: () => zoom(1 / 1.4) }),
      h("button", { class: "lv-zoom-fit", text: "fit", "aria-label": "show all", onclick: fit }));
    root.addEventListener("wheel", (e) => {
      e.preventDefault();
      const r = root.getBoundingClientRect(), sx = vb[2] / r.width;
      zoom(e.deltaY < 0 ? 1.2 : 1 / 1.2, vb[0] + (e.clientX - r.left) * sx, vb[1] + (e.clientY - r.top) * sx);
    }, { passive: false });
    let drag = null;
    root.addEventListener("pointerdown", (e) => { drag = [e.clientX, e.clientY, vb.slice()]; root.setPointerCapture(e.pointerId); });
    root.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const r = root.getBoundingClientRect(), sx = vb[2] / r.width;
      set([drag[2][0] - (e.clientX - drag[0]) * sx, drag[2][1] - (e.clientY - drag[1]) * sx, vb[2], vb[3]]);
    });
    root.addEventListener("pointerup", () => { drag = null; });
    frame.addEventListener("keydown", (e) => {
      const step = vb[2] / 10, d = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] }[e.key];
      if (d) { e.preventDefault(); set([vb[0] + d[0], vb[1] + d[1], vb[2], vb[3]]); }
      else if (e.key === "+" || e.key === "=") zoom(1.4); else if (e.key === "-") zoom(1 / 1.4); else if (e.key === "0") fit();
    });
    // start at a zoom where the labels read at their own size (12 px): the frame's width in drawing units
    frame.append(tools, root);
    requestAnimationFrame(() => { const w = frame.clientWidth || 900; if (w < W0) set([x0, y0, w, frameH * w / (frame.clientWidth || w)]); else fit(); });
    return frame;
  }
  const redraw = () => draw();
  ctx.on("change:selection", redraw); ctx.on("change:summary", redraw); ctx.on("lv:theme", redraw);
  draw();
}
