// Live feel: at most one run in flight and at most one waiting (the latest; earlier waiting ones are
// dropped), sent when the run in flight ends; a run that takes over a second shows its progress (the
// kernel reports layers done) and a Stop button that ends it at the next layer.
export function install(ctx, el, box) {
  const { h } = ctx.util;
  const m = ctx.model;
  let inflight = 0, queued = null, seq = 0, sent = 0, stopping = false;
  const text = h("span", { class: "lv-progress-text", role: "status", "aria-live": "polite" });
  const bar = h("progress", { class: "lv-progress-bar", max: 1, value: 0 });
  const stop = h("button", { class: "lv-stop", text: "Stop", title: "end this run at the next layer",
    onclick: () => { stopping = true; queued = null; mark(); ctx.send({ type: "stop" }); text.textContent = "stopping…"; } });
  const wrap = h("div", { class: "lv-progress", style: { display: "none" } }, bar, " ", text, " ", stop);
  box.append(wrap);
  const hide = () => { wrap.style.display = "none"; };
  const mark = () => { el.dataset.lvSent = String(sent); el.dataset.lvQueued = queued ? "1" : "0"; };
  function send(msg) {
    seq = Math.max(seq + 1, (m.get("done_seq") || 0) + 1);
    inflight = seq; ctx.pending = seq; sent += 1;
    el.classList.add("lv-busy");
    mark();
    ctx.send({ ...msg, seq });
    return seq;
  }
  // Every message that makes the kernel run the model goes through here.
  ctx.job = (msg) => {
    if (inflight) { queued = msg; mark(); return 0; }
    return send(msg);
  };
  ctx.run = (change = {}) => ctx.job({ type: "run", prompt: m.get("prompt"), target: m.get("target"),
    patches: m.get("patches"), ...change });
  ctx.setPatches = (list) => ctx.run({ patches: list });
  ctx.on("change:done_seq", () => {
    if (!inflight || m.get("done_seq") < inflight) return;
    inflight = 0; hide();
    // A stopped run changed nothing in the kernel: the controls go back to the state shown.
    if (stopping) { stopping = false; el.classList.remove("lv-busy"); mark(); ctx.emit("lv:restore"); return; }
    if (queued) { const q = queued; queued = null; send(q); } else { el.classList.remove("lv-busy"); mark(); }
  });
  ctx.on("msg:custom", (msg) => {
    if (!msg || msg.type !== "progress") return;
    if (!inflight || msg.stage === "idle") { hide(); return; }
    const L = msg.n_layers || 1, done = msg.done || 0;
    wrap.style.display = "";
    bar.max = L; bar.value = done % L || (done ? L : 0);
    text.textContent = `running ${Number(msg.seconds).toFixed(1)} s · ${done} layer${done === 1 ? "" : "s"} done (${msg.stage}, ${L} per pass)`;
  });
  ctx.on("lv:restore", () => { inflight = 0; queued = null; stopping = false; hide(); mark(); });
  const runs = () => { el.dataset.lvRuns = String(m.get("runs") || 0); };
  ctx.on("change:runs", runs); runs();
  mark();
}
