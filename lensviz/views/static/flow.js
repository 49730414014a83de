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
      body.replaceChildren(drawGraph(meta));
    } catch (e) { if (alive()) body.textContent = String(e.message || e); }
  }
  function drawGraph(g) {
    // layout: rows by node "row" (layer-major, sublayer-minor), columns in order of appearance
    const rows = new Map();
    for (const n of g.nodes) { const r = n.row ?? 0; if (!rows.has(r)) rows.set(r, []); rows.get(r).push(n); }
    const order = [...rows.keys()].sort((a, b) => b - a);
    const W = 900, rowH = 70, pos = new Map();
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
      const grp = svg("g", { class: "lv-node lv-node-" + (n.kind || ""), transform: `translate(${x},${y})`, "data-id": n.id });
      const vocab = (m.get("summary") || {}).vocab_size || 2;
      const c = svg("circle", { r: 9, fill: n.target_rank === undefined ? maskedColour() : rankColour(n.target_rank, vocab) });
      const label = svg("text", { y: -12, "text-anchor": "middle", class: "lv-node-label" });
      label.textContent = clip(show(n.label ?? ""), 10);
      const t = svg("title");
      t.textContent = `${n.kind || "node"}${n.layer !== undefined ? " L" + n.layer : ""}${n.head !== undefined && n.head !== null ? " H" + n.head : ""}` +
        ` · target rank ${n.target_rank ?? "?"}\n` + (n.top || []).map((x) => `${show(x.token)} ${(100 * x.prob).toFixed(1)}%`).join("\n");
      grp.append(c, label, t); root.append(grp);
    }
    return root;
  }
  const redraw = () => draw();
  ctx.on("change:selection", redraw); ctx.on("change:summary", redraw); ctx.on("lv:theme", redraw);
  draw();
}
