// Header (prompt, target, run, status, prediction and patched diff) and the token strip.
export function mount(ctx, header, strip) {
  const { h, show, pct } = ctx.util;
  const m = ctx.model;
  const prompt = h("textarea", { class: "lv-prompt", rows: 2, "aria-label": "prompt" });
  const target = h("input", { class: "lv-target", type: "text", placeholder: "(model's top-1)", "aria-label": "target" });
  const runBtn = h("button", { class: "lv-run", type: "button", text: "Run" });
  const status = h("div", { class: "lv-status", role: "status" });
  const pred = h("div", { class: "lv-pred" });
  const error = h("div", { class: "lv-error", role: "alert" });
  const go = () => ctx.run({ prompt: prompt.value, target: target.value });
  runBtn.addEventListener("click", go);
  prompt.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey || e.shiftKey)) { e.preventDefault(); go(); } });
  target.addEventListener("keydown", (e) => { if (e.key === "Enter") go(); });
  header.append(h("div", { class: "lv-inputs" }, prompt,
    h("label", { class: "lv-target-label" }, "target ", target), runBtn, h("span", { class: "lv-model", text: m.get("model_name") })),
    h("div", { class: "lv-line" }, status, pred), error);

  const syncHeader = () => {
    if (document.activeElement !== prompt) prompt.value = m.get("prompt");
    if (document.activeElement !== target) target.value = m.get("target");
    const s = m.get("summary"), b = m.get("base_summary"), d = m.get("diff");
    status.textContent = m.get("status");
    pred.replaceChildren();
    if (!s || s.target === undefined) return;
    pred.append(h("span", { class: "lv-p" }, "p(", h("b", { class: "lv-tok", text: show(s.target) }), ") = ",
      h("span", { class: "lv-target-prob", "data-prob": b.target_prob, text: pct(b.target_prob) }),
      " rank ", h("span", { class: "lv-target-rank", title: "1 = top", text: String(b.target_rank + 1) })));
    if (d && d.prob_after !== undefined) {
      const up = d.prob_after >= d.prob_before;
      pred.append(h("span", { class: "lv-diff " + (up ? "lv-up" : "lv-down") }, up ? " ▲" : " ▼", " patched: ",
        h("span", { class: "lv-patched-prob", "data-prob": d.prob_after, text: pct(d.prob_after) }),
        " rank ", h("span", { class: "lv-patched-rank", title: "1 = top", text: String(d.rank_after + 1) }),
        ` · KL ${d.kl.toFixed(3)} · top-1 ${show(d.top1_after)}` +
          (d.changes ? ` · ${d.changes.length} cells changed` : " · changed cells underlined in the grid")));
    }
    pred.append(h("span", { class: "lv-next" }, " next: ",
      ...s.top.slice(0, 3).map((t) => h("span", { class: "lv-chip", text: `${show(t.token)} ${pct(t.prob)}` }))));
  };
  const syncError = () => { error.textContent = m.get("error"); };

  // Token strip: a toolbar of buttons with one tab stop (the selected token); arrow keys / Home /
  // End move the selection (the selected set stays), Enter / Space select the focused token alone (as a
  // click does). The selected set: Shift-click or Shift+Enter / Shift+Space adds the token to it (or
  // removes it), Shift+arrow moves and adds every token passed over.
  strip.setAttribute("role", "toolbar");
  strip.setAttribute("aria-label", "tokens (arrow keys move the selected position; Shift+Enter adds it to the selected set)");
  const setOf = (sel) => new Set(sel.positions && sel.positions.length ? sel.positions : [sel.position]);
  const toggle = (i) => {
    const sel = m.get("selection") || {}, s = setOf(sel);
    if (s.has(i) && s.size > 1) s.delete(i); else s.add(i);
    ctx.select({ positions: [...s].sort((x, y) => x - y), position: i, range: null });
  };
  const syncStrip = () => {
    const toks = m.get("tokens"), sel = m.get("selection") || {};
    const set = new Set(sel.positions || []);
    const refocus = strip.contains(document.activeElement);
    strip.replaceChildren(...toks.map((t, i) => h("button", {
      class: "lv-token" + (i === sel.position ? " lv-selected" : "") + (set.has(i) ? " lv-in-set" : ""),
      "data-pos": i, title: `position ${i}: ${JSON.stringify(t)}`, text: show(t),
      tabindex: i === sel.position ? "0" : "-1", "aria-pressed": String(i === sel.position || set.has(i)),
      "aria-label": `token ${i}: ${JSON.stringify(t)}` + (set.has(i) ? " (in the selected set)" : ""),
      // Shift-click adds a position to (or removes it from) the selected set; a plain click selects one.
      // (a click the keyboard made with Shift held is the keydown handler's: it has toggled already)
      onclick: (e) => { if (e.shiftKey && e.detail === 0) return; if (e.shiftKey) toggle(i); else ctx.select({ position: i, range: null, positions: null }); },
    })));
    if (refocus) { const f = strip.querySelector('[tabindex="0"]'); if (f) f.focus(); }
  };
  strip.addEventListener("keydown", (e) => {
    const sel = m.get("selection"), n = m.get("tokens").length;
    if ((e.key === "Enter" || e.key === " ") && e.shiftKey) { e.preventDefault(); toggle(sel.position); return; }
    const step = { ArrowLeft: -1, ArrowRight: 1, Home: -Infinity, End: Infinity }[e.key];
    if (step === undefined) return;
    e.preventDefault();
    const p = Math.max(0, Math.min(n - 1, sel.position + step));
    if (e.shiftKey) {
      const s = setOf(sel);
      for (let i = Math.min(p, sel.position); i <= Math.max(p, sel.position); i++) s.add(i);
      ctx.select({ position: p, range: null, positions: [...s].sort((x, y) => x - y) });
    } else ctx.select({ position: p, range: null });
  });
  for (const k of ["prompt", "target", "summary", "base_summary", "diff", "status"]) ctx.on("change:" + k, syncHeader);
  ctx.on("change:error", syncError);
  ctx.on("change:tokens", syncStrip);
  ctx.on("change:selection", syncStrip);
  ctx.on("lv:restore", syncHeader);
  syncHeader(); syncStrip(); syncError();
}
