"""Issue 14 in JupyterLab, driven like a user: generation step-through (the step scrubber and `ex.step`
both ways, each step's view checked against Python), the selected set of tokens (Shift-click and the
keyboard; attention / Reversed Attention show the sum over the set, the logit lens highlights it), the
eta slider dragged over 20 values (the kernel runs the model a handful of times and shows the last
value), Stop during a long run (ends within about a layer, leaves nothing behind), and a T=2048 prompt
(small initial state, first render in under 2 s, the grid stays responsive, and the logit-lens cells
of a window scrolled to far right arrive from the kernel and equal Python's; past the model's limit a
clear error). Every view is screenshotted (tests/browser/artifacts/view-*.png)."""
from __future__ import annotations

import json
import re
import time

import pytest
import torch
from playwright.sync_api import expect

import lensviz as lv
from harness.browser import RENDER_TIMES_JS, open_notebook, run_all, write_notebook
from lensviz.views import stepping
from tests import models
from tests.browser.test_explorer import CELLS, expected_prob
from tests.conftest import PROMPT

N_GEN = 5
LAYER_S = 1.1          # the slow model sleeps this long in each block (progress shows at a block's end)
HOOKS = ("def n_hooks(m):\n    return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) + len(x._backward_hooks)"
         " + len(x._backward_pre_hooks) for x in m.modules())")
RUN_IN_KERNEL_JS = """async (code) => {
  const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  const reply = await k.requestExecute({code, silent: false, store_history: false}).done;
  return {status: reply.content.status, ename: reply.content.ename, evalue: reply.content.evalue};
}"""


def kernel(page, code: str) -> None:
    """Run `code` in the notebook's kernel (asserts in it are the checks); fails with its error."""
    r = page.evaluate(RUN_IN_KERNEL_JS, code)
    assert r["status"] == "ok", f"kernel code failed: {r['ename']}: {r['evalue']}\n{code}"


def values(locator) -> list[float]:
    return [float(x) for x in locator.get_attribute("data-values").split(",")]


def py_lens():
    return lv.Lens(models.build("llama"), models.tokenizer())


# 1. step-through, the selected set, screenshots of every view --------------------------------------
def test_step_through_and_selected_set(tmp_path, lab, page, artifacts):
    write_notebook(tmp_path / "steps.ipynb", [CELLS[0], f"gen = lv.Explorer(lens, {PROMPT!r}, generate={N_GEN})\ngen"])
    open_notebook(page, lab(tmp_path), "steps.ipynb")
    run_all(page)
    ex = page.locator(".lv-explorer").first
    expect(ex.locator(".lv-map-forward")).to_be_visible()

    lens = py_lens()
    st = stepping.generate(lens, PROMPT, N_GEN)
    n_prompt = len(lens.encode(PROMPT)[0])
    L = lens.n_layers

    def check_step(k):
        """The DOM shows step k: prefix of n_prompt + k tokens, target = generated token k, Python's numbers."""
        tr = lens.trace(st.prefix(k), st.target(k))
        expect(ex.locator(".lv-stepbox")).to_have_attribute("data-step", str(k))
        expect(ex.locator(".lv-token")).to_have_count(n_prompt + k)
        expect(ex.locator(".lv-step")).to_have_value(str(k))
        expect(ex.locator(".lv-gen-token.lv-selected")).to_have_attribute("data-step", str(k))
        expect(ex.locator(".lv-status")).to_contain_text(f"step {k} of {N_GEN}")
        prob = float(torch.softmax(tr.logits[-1].double(), -1)[tr.target_id])
        assert float(ex.locator(".lv-target-prob").get_attribute("data-prob")) == pytest.approx(prob, rel=1e-9)
        top1 = tr.logit_lens(k=1).tokens[-1][-1][0]
        expect(ex.locator(f'.lv-cell[data-layer="{L - 1}"][data-pos="{n_prompt + k - 1}"]')).to_have_attribute("data-token", top1)
        return tr

    expect(ex.locator(".lv-gen-token")).to_have_count(N_GEN)
    check_step(0)
    # the scrubber (JS) -> ex.step (Python)
    ex.locator(".lv-step").fill("3")
    check_step(3)
    kernel(page, "assert gen.step == 3, gen.step")
    # ex.step (Python) -> the scrubber and every view (JS)
    kernel(page, "gen.step = 1")
    tr = check_step(1)
    ex.locator(".lv-gen-token").nth(4).click()       # a generated token's chip is a step too
    check_step(4)
    kernel(page, "gen.step = 1")
    tr = check_step(1)
    page.screenshot(path=str(artifacts / "view-step-through.png"), full_page=True)

    # Shift-click builds the selected set; attention shows the sum of the set's query rows
    A = tr.attention(L - 1)[0].double()
    ex.locator(".lv-token").nth(2).click()
    ex.locator(".lv-token").nth(4).click(modifiers=["Shift"])
    strip = ex.locator(".lv-sum-forward")
    expect(strip).to_have_attribute("data-positions", "2,4")
    expect(strip).to_have_attribute("data-axis", "rows")
    assert values(strip) == pytest.approx((A[2] + A[4]).tolist(), rel=1e-5, abs=1e-7)
    # the logit lens highlights the set (every layer's cell, and the column header)
    expect(ex.locator(".lv-cell.lv-in-set")).to_have_count(2 * L)
    assert sorted({c.get_attribute("data-pos") for c in ex.locator(".lv-cell.lv-in-set").all()}) == ["2", "4"]
    expect(ex.locator(".lv-token.lv-in-set")).to_have_count(2)
    # the key-column toggle: who looks at the set
    ex.locator(".lv-sum-axis").select_option("cols")
    expect(strip).to_have_attribute("data-axis", "cols")
    assert values(strip) == pytest.approx((A[:, 2] + A[:, 4]).tolist(), rel=1e-5, abs=1e-7)
    page.screenshot(path=str(artifacts / "view-attention-set.png"), full_page=True)
    # Reversed Attention: the same set, RA's rows
    ex.locator('.lv-tab[data-tab="reversed"]').click()
    ra = ex.locator(".lv-sum-reversed")
    expect(ra).to_have_attribute("data-positions", "2,4")
    RA = tr.reversed_attention(L - 1)[0].double()
    assert values(ra) == pytest.approx((RA[2] + RA[4]).tolist(), rel=1e-4, abs=1e-9 * float(RA.abs().max()))

    # the keyboard: Enter selects one token alone, arrows move (the set stays), Shift+Enter adds the
    # focused token to the set (again: removes it), Shift+arrow moves and adds
    ex.locator('.lv-tab[data-tab="attention"]').click()
    ex.locator(".lv-token").nth(1).focus()
    page.keyboard.press("Enter")
    expect(ex.locator(".lv-token.lv-in-set")).to_have_count(0)
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Shift+Enter")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Shift+Enter")
    expect(ex.locator(".lv-sum-forward")).to_have_attribute("data-positions", "2,4")
    page.keyboard.press("Shift+ArrowRight")
    expect(ex.locator(".lv-sum-forward")).to_have_attribute("data-positions", "2,4,5")
    assert values(ex.locator(".lv-sum-forward")) == pytest.approx((A[2] + A[4] + A[5]).tolist(), rel=1e-5, abs=1e-7)
    page.keyboard.press("Shift+Enter")             # 5 is focused: out of the set again
    expect(ex.locator(".lv-sum-forward")).to_have_attribute("data-positions", "2,4")
    expect(ex.locator(".lv-token.lv-in-set")).to_have_count(2)
    kernel(page, "assert gen.selection['positions'] == [2, 4], gen.selection")

    # one screenshot per view (tests/browser/artifacts/view-*.png; the chosen ones go to docs/images)
    ex.locator(".lv-token").nth(n_prompt - 1).click()
    ex.scroll_into_view_if_needed()
    ex.locator(".lv-grid-wrap").screenshot(path=str(artifacts / "view-logit-lens.png"))
    for tab, ready in (("attention", ".lv-map-forward"), ("reversed", ".lv-map-reversed"),
                       ("neurons", ".lv-neuron-table .lv-toggle"), ("backward", ".lv-bl-ff2 .lv-bl-cell"),
                       ("flow", "svg.lv-flow .lv-node")):
        ex.locator(f'.lv-tab[data-tab="{tab}"]').click()
        expect(ex.locator(ready).first).to_be_visible()
        page.wait_for_timeout(300)
        ex.locator(".lv-panel").screenshot(path=str(artifacts / f"view-{tab}.png"))
    ex.screenshot(path=str(artifacts / "view-explorer.png"))
    # the RA legend's tick labels do not overlap
    ex.locator('.lv-tab[data-tab="reversed"]').click()
    expect(ex.locator(".lv-scale-tick").first).to_be_visible()
    for mode in ("symlog", "row", "linear"):
        ex.locator(".lv-ra-scale").select_option(mode)
        expect(ex.locator(".lv-scale")).to_have_attribute("data-mode", mode)
        boxes = [t.bounding_box() for t in ex.locator(".lv-scale-tick").all()]
        bar = ex.locator(".lv-scale-bar").bounding_box()
        assert len(boxes) >= 3, mode
        for a, b in zip(boxes, boxes[1:]):
            assert a["x"] + a["width"] <= b["x"], f"{mode}: tick labels overlap: {boxes}"
        assert boxes[0]["x"] >= bar["x"] - 1 and boxes[-1]["x"] + boxes[-1]["width"] <= bar["x"] + bar["width"] + 1
    ex.locator(".lv-ra-scale").select_option("symlog")
    ex.locator(".lv-panel").screenshot(path=str(artifacts / "view-reversed-legend.png"))
    assert page.offsite == []


# 2. the slider dragged over 20 values, and Stop ----------------------------------------------------
SLOW_CELL = f"""import time, torch
{HOOKS}
slow_lens = lv.Lens(models.build('llama'), models.tokenizer())
sleepers = [b.register_forward_pre_hook(lambda m, a: time.sleep({LAYER_S})) for b in slow_lens.model.model.layers]
slow = lv.Explorer(slow_lens, {PROMPT!r}, target=' Paris')
slow"""

DRAG_JS = """async ([vals, gapMs]) => {
  const slider = document.querySelector('.lv-explorer .lv-eta');
  for (const v of vals) {
    slider.value = String(v);
    slider.dispatchEvent(new Event('input', {bubbles: true}));
    await new Promise((r) => setTimeout(r, gapMs));
  }
  slider.dispatchEvent(new Event('change', {bubbles: true}));
}"""


def test_slider_drag_runs_a_handful_and_stop_leaves_nothing(tmp_path, lab, page, artifacts):
    write_notebook(tmp_path / "slow.ipynb", [CELLS[0], SLOW_CELL])
    open_notebook(page, lab(tmp_path), "slow.ipynb")
    run_all(page)
    ex = page.locator(".lv-explorer").first
    expect(ex.locator(".lv-map-forward")).to_be_visible()
    expect(ex).not_to_have_class("lv-busy")
    runs0 = int(ex.get_attribute("data-lv-runs"))

    # 20 values, 300 ms apart (longer than the 200 ms debounce): each is sent unless a run is in flight
    vals = [-0.5 * i for i in range(1, 21)]
    t0 = time.perf_counter()
    page.evaluate(DRAG_JS, [vals, 300])
    expect(ex.locator('.lv-patch-chip[data-type="attention"]')).to_contain_text("η=-10 ", timeout=120_000)
    page.wait_for_function("""() => { const e = document.querySelector('.lv-explorer');
        return !e.classList.contains('lv-busy') && e.dataset.lvQueued === '0'; }""", timeout=120_000)
    drag_s = time.perf_counter() - t0
    runs = int(ex.get_attribute("data-lv-runs")) - runs0
    sent = int(ex.get_attribute("data-lv-sent"))
    print(f"\nslider dragged over 20 values in {drag_s:.1f} s: {runs} kernel runs, {sent} requests sent "
          f"(runs take about {3 * LAYER_S:.1f} s)")
    assert 1 <= runs <= 6 and runs == sent, (runs, sent)
    kernel(page, f"assert slow.runs - {runs0} == {runs}, slow.runs")
    patched = ex.locator(".lv-patched-prob")
    assert float(patched.get_attribute("data-prob")) == pytest.approx(expected_prob(-10.0), rel=1e-6)
    expect(ex.locator(".lv-eta")).to_have_value("-10")

    # Stop during a long run: progress shows after 1 s, Stop ends it within about one block
    kernel(page, "ref = slow.trace.logits.clone(); hooks0 = n_hooks(slow_lens.model)\n"
                 "weights0 = {k: v.clone() for k, v in slow_lens.model.state_dict().items()}")
    page.evaluate(DRAG_JS, [[-3], 0])
    progress = ex.locator(".lv-progress")
    expect(progress).to_be_visible(timeout=20_000)
    expect(progress).to_contain_text(re.compile(r"\d+ layers? done \(forward, 3 per pass\)"))
    page.screenshot(path=str(artifacts / "view-progress-stop.png"), full_page=True)
    t0 = time.perf_counter()
    ex.locator(".lv-stop").click()
    page.wait_for_function("() => !document.querySelector('.lv-explorer').classList.contains('lv-busy')",
                           timeout=30_000, polling=20)
    stop_s = time.perf_counter() - t0
    print(f"Stop ended the run {stop_s:.2f} s after the click (a block takes {LAYER_S} s)")
    assert stop_s < LAYER_S + 1.0
    expect(progress).to_be_hidden()
    expect(ex.locator(".lv-status")).to_contain_text("stopped by the user")
    expect(ex.locator(".lv-error")).to_have_text("")
    # the controls show the state shown: eta -10 (the stopped -3 never happened)
    expect(ex.locator(".lv-eta")).to_have_value("-10")
    expect(ex.locator('.lv-patch-chip[data-type="attention"]')).to_contain_text("η=-10 ")
    # nothing left behind: hooks, weights, gradients, the view; a new run gives the same bits
    kernel(page, "assert n_hooks(slow_lens.model) == hooks0, (n_hooks(slow_lens.model), hooks0)\n"
                 "assert all(torch.equal(v, weights0[k]) for k, v in slow_lens.model.state_dict().items())\n"
                 "assert all(p.grad is None for p in slow_lens.model.parameters())\n"
                 "assert torch.equal(slow.trace.logits, ref) and slow.patches[0]['eta'] == -10\n"
                 "again = slow_lens.trace(slow.base.prompt, slow.base.target_id, patches=slow.trace.patches,"
                 " base=slow.base, backward=False)\n"
                 "assert torch.equal(again.logits, ref)")
    # and the widget still works: the next value runs
    page.evaluate(DRAG_JS, [[-4], 0])
    expect(ex.locator('.lv-patch-chip[data-type="attention"]')).to_contain_text("η=-4 ", timeout=60_000)
    assert float(patched.get_attribute("data-prob")) == pytest.approx(expected_prob(-4.0), rel=1e-6)
    assert page.offsite == []


# 3. a long prompt ----------------------------------------------------------------------------------
T_LONG = 2048

RESPONSIVE_JS = """async () => {
  const ex = [...document.querySelectorAll('.lv-explorer')].find((e) => e.querySelectorAll('.lv-token').length > 1000);
  const wrap = ex.querySelector('.lv-grid-wrap'), table = ex.querySelector('.lv-grid');
  const frame = () => new Promise((r) => requestAnimationFrame(() => r()));
  const until = async (f) => { const t0 = performance.now(); while (!f()) { await frame(); if (performance.now() - t0 > 10000) return -1; } return performance.now() - t0; };
  const out = {};
  const before = table.dataset.columns;
  wrap.scrollLeft = wrap.scrollWidth / 2;
  out.scroll_ms = await until(() => table.dataset.columns !== before);
  out.columns = table.dataset.columns;
  out.cells = table.querySelectorAll('.lv-cell').length;
  const drawn = table.querySelectorAll('tr:nth-child(2) td.lv-cell');
  const cell = drawn[Math.floor(drawn.length / 2)], p = Number(cell.dataset.pos);
  out.position = p;
  cell.focus();
  cell.dispatchEvent(new MouseEvent('click', {bubbles: true}));
  out.click_ms = await until(() => { const f = table.querySelector('td[tabindex="0"]'); return f && f.dataset.pos === String(p); });
  table.querySelector('td[tabindex="0"]').dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowRight', bubbles: true}));
  out.key_ms = await until(() => { const f = table.querySelector('td[tabindex="0"]'); return f && f.dataset.pos === String(p + 1); });
  return out;
}"""


# Scroll far right (past the columns of the first state), then wait until the cells in view have
# arrived from the kernel ("grid" window requests). Every frame meanwhile records each drawn cell that
# is not a loading placeholder, so that a wrong cell shown even for one frame is caught.
FAR_RIGHT_JS = """async (fraction) => {
  const ex = [...document.querySelectorAll('.lv-explorer')].find((e) => e.querySelectorAll('.lv-token').length > 1000);
  const wrap = ex.querySelector('.lv-grid-wrap'), table = ex.querySelector('.lv-grid');
  const frame = () => new Promise((r) => requestAnimationFrame(() => r()));
  const seen = new Set(), out = {loading_frames: 0};
  const look = () => {
    for (const c of table.querySelectorAll('td.lv-cell')) {
      if (c.dataset.loading) continue;
      seen.add(JSON.stringify([+c.dataset.layer, +c.dataset.pos, c.dataset.token, +c.dataset.rank]));
    }
  };
  const before = table.dataset.columns, t0 = performance.now();
  wrap.scrollLeft = wrap.scrollWidth * fraction;
  while (table.dataset.columns === before && performance.now() - t0 < 10000) { look(); await frame(); }
  out.columns = table.dataset.columns;
  out.placeholders = table.querySelectorAll('td.lv-loading').length;
  while (table.dataset.loading !== 'false' && performance.now() - t0 < 60000) { out.loading_frames++; look(); await frame(); }
  look();
  out.arrive_ms = table.dataset.loading === 'false' ? performance.now() - t0 : -1;
  out.drawn = table.querySelectorAll('td.lv-cell').length;
  out.still_loading = table.querySelectorAll('td.lv-loading').length;
  out.seen = [...seen].map((x) => JSON.parse(x));
  return out;
}"""


def state_bytes(ex) -> dict:
    """The widget's initial state as sent: bytes of binary traits, JSON length of the rest; code = the
    front-end sources (_esm, _css, _modules), data = the rest (benchmarks/bench_widget.py counts alike)."""
    sizes = {k: len(v) if isinstance(v, (bytes, bytearray, memoryview)) else len(json.dumps(v))
             for k, v in ex.get_state().items()}
    code = sum(n for k, n in sizes.items() if k in ("_esm", "_css", "_modules"))
    return {"total": sum(sizes.values()), "code": code, "data": sum(sizes.values()) - code}


def long_prompt(lens, n: int) -> str:
    """Text that the tiny tokenizer turns into exactly n tokens."""
    text = " ".join(models.CORPUS) * (n // 400 + 1)
    ids = lens.tokenizer(text, return_tensors="pt")["input_ids"][0]
    cut = n
    for _ in range(40):
        prompt = lens.tokenizer.decode(ids[:cut].tolist())
        got = len(lens.encode(prompt)[0])
        if got == n:
            return prompt
        cut += n - got
    raise AssertionError(f"no prompt of exactly {n} tokens")


def test_long_prompt_renders_fast_and_past_the_limit_is_a_clear_error(tmp_path, lab, page, artifacts):
    long_lens = lv.Lens(models.build("llama", dtype=torch.float32), models.tokenizer(), max_tokens=4096)
    text = long_prompt(long_lens, T_LONG)
    long_ex = lv.Explorer(long_lens, text)
    size = state_bytes(long_ex)
    # the grid comes in windows: the first state holds only the first columns and the selection's window
    assert long_ex.grid_meta["lazy"] and sum(b - a for a, b in long_ex.grid_meta["columns"]) < T_LONG // 10
    print(f"\nT={T_LONG}: initial state {size['total']:,} B, of which data {size['data']:,} B, code {size['code']:,} B")
    assert size["data"] <= 1_000_000 and size["total"] <= 1_000_000 + size["code"]

    write_notebook(tmp_path / "long.ipynb", [
        CELLS[0],
        f"small = lv.Explorer(lens, {PROMPT!r})\nsmall",
        "import torch\nlong_lens = lv.Lens(models.build('llama', dtype=torch.float32), models.tokenizer(), max_tokens=4096)\n"
        f"big = lv.Explorer(long_lens, {text!r})\nbig"])
    open_notebook(page, lab(tmp_path), "long.ipynb")
    page.evaluate(RENDER_TIMES_JS)
    run_all(page)
    big = page.locator(".lv-explorer").nth(1)
    expect(big.locator(".lv-token")).to_have_count(T_LONG, timeout=120_000)
    expect(big.locator(".lv-map-forward")).to_be_visible(timeout=120_000)
    page.wait_for_function(f"window.__lvTimes.some((r) => r.tokens === {T_LONG} && r.map !== undefined)")
    rec = [r for r in page.evaluate("window.__lvTimes") if r.get("tokens") == T_LONG][0]
    first_s = (rec["first"] - rec["start"]) / 1000
    map_s = (rec["map"] - rec["start"]) / 1000
    print(f"T={T_LONG} in Chromium: first render (tokens, logit-lens grid, head norms) {first_s:.2f} s after the "
          f"widget's view started; attention map (a kernel round trip) at {map_s:.2f} s; "
          f"{rec['cells']} grid cells drawn of {3 * T_LONG}")
    assert first_s <= 2.0
    assert rec["cells"] < 3 * 100          # only the columns in view are drawn
    # it opens at the selected column (the last position): that cell is drawn and is the grid's tab stop
    expect(big.locator('.lv-grid td[tabindex="0"]')).to_have_attribute("data-pos", str(T_LONG - 1))
    r = page.evaluate(RESPONSIVE_JS)
    print(f"T={T_LONG} responsiveness: scroll -> redrawn columns {r['scroll_ms']:.0f} ms ({r['columns']}, "
          f"{r['cells']} cells), click -> selected {r['click_ms']:.0f} ms, arrow key -> moved {r['key_ms']:.0f} ms")
    assert 0 <= r["scroll_ms"] < 500 and 0 <= r["click_ms"] < 1000 and 0 <= r["key_ms"] < 1000
    assert r["cells"] < 3 * 100
    # far right, past the first state's columns: the cells in view arrive and are Python's logit lens
    far = page.evaluate(FAR_RIGHT_JS, 0.9)
    c0, c1 = map(int, far["columns"].split("-"))
    first = {j for a, b in long_ex.grid_meta["columns"] for j in range(a, b)}
    print(f"T={T_LONG} far right: columns {far['columns']}, {far['placeholders']} loading placeholders, cells arrived "
          f"{far['arrive_ms']:.0f} ms after the scroll; {len(far['seen'])} distinct cells seen while waiting")
    assert not set(range(c0, c1)) & first and far["placeholders"] > 0     # not in the first state: asked for
    assert 0 <= far["arrive_ms"] < 30_000 and far["still_loading"] == 0 and far["drawn"] == long_lens.n_layers * (c1 - c0)
    ll = long_ex.trace.logit_lens(k=1)
    strings = long_lens.token_strings
    want = {(la, j): (strings[int(ll.ids[la, j, 0])], int(ll.target_rank[la, j]) + 1)
            for la in range(long_lens.n_layers) for j in range(T_LONG)}
    shown = {(la, j) for la, j, _, _ in far["seen"]}
    assert {(la, j) for la in range(long_lens.n_layers) for j in range(c0, c1)} <= shown
    wrong = [c for c in far["seen"] if want[(c[0], c[1])] != (c[2], c[3])]
    assert wrong == []                                  # no cell was ever drawn with another cell's token
    big.screenshot(path=str(artifacts / "view-long-prompt.png"))
    (artifacts / "long-prompt.json").write_text(json.dumps({"T": T_LONG, "state": size, "first_s": first_s,
                                                            "map_s": map_s, **r, "far_arrive_ms": far["arrive_ms"],
                                                            "far_columns": far["columns"]}, indent=1))

    # past the model's limit (64 tokens for the tiny model): a clear error in the widget, no traceback
    small = page.locator(".lv-explorer").first
    small.locator(".lv-prompt").fill(text[:2000])
    small.locator(".lv-run").click()
    expect(small.locator(".lv-error")).to_contain_text("this model accepts at most 64")
    expect(small.locator(".lv-token")).to_have_count(len(py_lens().encode(PROMPT)[0]))   # the view stays
    assert page.offsite == []
