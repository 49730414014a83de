// Generation step-through: a Generate button (token count; greedy, or sampled with a seed) and, once
// the model has generated, a step scrubber. Step k shows the prompt plus k generated tokens with token
// k as the target; the kernel traces a step when it is shown.
export function mount(ctx, box) {
  const { h, show } = ctx.util;
  const m = ctx.model;
  const count = h("input", { type: "number", class: "lv-gen-n", min: 1, max: 512, value: 20, style: { width: "4.5em" }, "aria-label": "tokens to generate" });
  const sample = h("input", { type: "checkbox", class: "lv-gen-sample", "aria-label": "sample instead of greedy" });
  const seed = h("input", { type: "number", class: "lv-gen-seed", min: 0, value: 0, style: { width: "4.5em" }, "aria-label": "seed" });
  const gen = h("button", { class: "lv-generate", text: "Generate", onclick: () => ctx.job({ type: "generate",
    n: Number.parseInt(count.value, 10), sample: sample.checked, seed: Number.parseInt(seed.value, 10) }) });
  const scrub = h("input", { type: "range", class: "lv-step", min: 0, max: 0, step: 1, value: 0, "aria-label": "generation step" });
  const out = h("output", { class: "lv-step-value" });
  const prev = h("button", { class: "lv-step-prev", text: "◀", "aria-label": "previous step", onclick: () => go(m.get("step") - 1) });
  const next = h("button", { class: "lv-step-next", text: "▶", "aria-label": "next step", onclick: () => go(m.get("step") + 1) });
  const chips = h("div", { class: "lv-gen-tokens", role: "list", "aria-label": "generated tokens" });
  const stepper = h("div", { class: "lv-stepper", style: { display: "none" } }, "step ", prev, scrub, next, " ", out, chips);
  box.append(h("div", { class: "lv-title" }, h("b", { text: "Generate " }), count, " tokens ",
    h("label", {}, sample, " sample, seed "), seed, " ", gen), stepper);
  const go = (k) => {
    const n = (m.get("generated") || []).length;
    if (!Number.isInteger(k) || k < 0 || k >= n) return;
    scrub.value = k; label(k);
    ctx.job({ type: "step", step: k });
  };
  scrub.addEventListener("input", () => go(Number.parseInt(scrub.value, 10)));
  // While the pointer drags the scrubber its value is the user's; otherwise it follows ex.step (Python
  // may set it, or a stopped step goes back), focused or not.
  let dragging = false;
  scrub.addEventListener("pointerdown", () => { dragging = true; });
  const settle = () => { dragging = false; if (!ctx.el.classList.contains("lv-busy")) scrub.value = Math.max(0, m.get("step")); };
  for (const ev of ["pointerup", "pointercancel", "blur"]) scrub.addEventListener(ev, settle);
  const label = (k) => {
    const toks = m.get("generated") || [];
    out.textContent = `${k} of ${toks.length} · target ${JSON.stringify(toks[k] ?? "")}`;
  };
  const sync = () => {
    const toks = m.get("generated") || [], k = m.get("step");
    stepper.style.display = toks.length ? "" : "none";
    scrub.max = Math.max(0, toks.length - 1);
    if (!dragging) scrub.value = Math.max(0, k);
    label(Math.max(0, k));
    box.dataset.step = String(k);
    chips.replaceChildren(...toks.map((t, i) => h("button", { role: "listitem", class: "lv-chip lv-gen-token" + (i === k ? " lv-selected" : "") + (i < k ? " lv-gen-done" : ""),
      "data-step": i, text: show(t), title: `step ${i}: ${JSON.stringify(t)}`, onclick: () => go(i) })));
  };
  ctx.on("change:generated", sync); ctx.on("change:step", sync); ctx.on("lv:restore", sync);
  sync();
}
