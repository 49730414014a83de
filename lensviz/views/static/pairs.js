// Prompt pairs and metrics in the header: the clean and corrupt prompts side by side as token strips
// (positions where they differ marked, the clean prompt editable), the metric of each run (the
// target's log-probability, or the logit difference against the distractor) and of the run shown; the
// appended positions of a multi-token target marked in every strip. Token text only via textContent.
export function mount(ctx, header, strip) {
  const { h, show } = ctx.util;
  const m = ctx.model;
  const metricLine = h("div", { class: "lv-metric", role: "status", "aria-live": "polite" });
  const box = h("div", { class: "lv-pair", role: "group", "aria-label": "prompt pair" });
  header.append(metricLine, box);
  const fmt = (v) => (v === undefined || v === null || !Number.isFinite(v) ? "–" : Number(v).toFixed(3));

  const tokenRow = (tokens, differ, appended, cls) => h("div", { class: "lv-pair-strip " + cls, role: "list" },
    ...tokens.map((t, i) => h("span", { role: "listitem",
      class: "lv-pair-token" + (differ.has(i) ? " lv-differ" : "") + (appended.has(i) ? " lv-appended" : ""),
      "data-pos": i, text: show(t),
      title: `position ${i}: ${JSON.stringify(t)}` + (differ.has(i) ? " (differs between the prompts)" : "") +
        (appended.has(i) ? " (target token, teacher-forced)" : "") })));

  const cleanInput = h("input", { type: "text", class: "lv-clean-prompt", "aria-label": "clean prompt" });
  cleanInput.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && cleanInput.value !== (m.get("pair") || {}).clean_prompt) ctx.job({ type: "clean", clean: cleanInput.value });
  });

  const metricName = (p) => p.kind === "logit_diff"
    ? `logit(${JSON.stringify(p.target)}) − logit(${JSON.stringify(p.distractor)})`
    : `log p(${JSON.stringify(p.target)})`;

  const sync = () => {
    const p = m.get("pair") || {};
    if (p.kind === undefined) { metricLine.replaceChildren(); box.replaceChildren(); return; }
    const patched = (m.get("patches") || []).length > 0;
    const parts = [h("span", { class: "lv-metric-name", text: "metric " + metricName(p) })];
    if (p.clean_prompt !== undefined) {
      parts.push(" · clean ", h("b", { class: "lv-metric-clean", "data-value": p.metric_clean, text: fmt(p.metric_clean) }),
        " · corrupt ", h("b", { class: "lv-metric-corrupt", "data-value": p.metric_corrupt, text: fmt(p.metric_corrupt) }));
      if (patched) {
        const d = p.metric_clean - p.metric_corrupt, r = Math.abs(d) > 1e-12 ? (p.metric - p.metric_corrupt) / d : NaN;
        parts.push(" · patched corrupt ", h("b", { class: "lv-metric-patched", "data-value": p.metric, text: fmt(p.metric) }),
          Number.isFinite(r) ? ` (${(100 * r).toFixed(0)} % of the way to clean)` : "");
      }
    } else {
      parts.push(" = ", h("b", { class: "lv-metric-shown", "data-value": p.metric, text: fmt(p.metric) }));
      if (patched) parts.push(` (unpatched ${fmt(p.metric_base)})`);
    }
    metricLine.replaceChildren(...parts);
    const appended = new Set(p.appended || []);
    if (p.clean_prompt === undefined) { box.replaceChildren(); return; }
    const differ = new Set(p.differ || []);
    if (document.activeElement !== cleanInput) cleanInput.value = p.clean_prompt;
    box.replaceChildren(
      h("div", { class: "lv-pair-side lv-pair-clean" },
        h("div", { class: "lv-pair-label" }, h("b", { text: "clean" }), " (patch source) ", cleanInput),
        tokenRow(p.clean_tokens || [], differ, appended, "lv-clean-strip")),
      h("div", { class: "lv-pair-side lv-pair-corrupt" },
        h("div", { class: "lv-pair-label" }, h("b", { text: "corrupt" }), " (the run the views show; patches go here)"),
        tokenRow(m.get("tokens") || [], differ, appended, "lv-corrupt-strip")));
  };
  // The main (selectable) strip is drawn by tokens.js; mark the appended target tokens in it after each draw.
  const markStrip = () => {
    const p = m.get("pair") || {}, appended = new Set(p.appended || []), differ = new Set(p.differ || []);
    for (const b of strip.querySelectorAll("[data-pos]")) {
      const i = Number(b.dataset.pos);
      b.classList.toggle("lv-appended", appended.has(i));
      b.classList.toggle("lv-differ", differ.has(i));
      if (appended.has(i) && !b.title.endsWith("teacher-forced)")) {
        b.title += " (target token, teacher-forced)";
        b.setAttribute("aria-label", b.getAttribute("aria-label") + " (target token, teacher-forced)");
      }
    }
  };
  for (const k of ["pair", "tokens", "patches"]) ctx.on("change:" + k, sync);
  for (const k of ["pair", "tokens", "selection"]) ctx.on("change:" + k, markStrip);
  ctx.on("lv:restore", sync);
  sync(); markStrip();
}
