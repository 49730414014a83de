"""Where widget JavaScript cannot run: a notebook executed and converted with nbconvert to HTML
shows the Explorer's static snapshot from file:// with the network cut (and no script from token
text runs); and where the widget runs without a kernel, a request says so within a second and the
controls return to the state shown."""
from __future__ import annotations

import base64
import json
import time

import nbformat
from nbclient import NotebookClient
from nbconvert import HTMLExporter
from playwright.sync_api import expect

import lensviz as lv
from lensviz.views import snapshot
from lensviz.views.explorer import STATIC
from tests import models
from harness.browser import REPO, write_notebook
from tests.browser.pagecheck import contrast_report
from tests.conftest import PROMPT

XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> of'
CELLS = [
    f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport lensviz as lv\nfrom tests import models\n"
    "lens = lv.Lens(models.build('llama'), models.tokenizer())",
    f"lv.Explorer(lens, {PROMPT!r}, target=' Paris')",
    f"lv.Explorer(lens, {XSS!r}, target=' Paris')",
]


def offline_context(browser):
    """A browser context where every request but file:/data:/blob: is aborted (and recorded)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    ctx.blocked = []
    ctx.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:", "blob:"))
              else (ctx.blocked.append(route.request.url), route.abort()))
    return ctx


def execute(path, store_widget_state):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=300, store_widget_state=store_widget_state).execute()
    return nb


def test_nbconvert_html_shows_the_snapshot_offline(tmp_path, browser, artifacts):
    nb = execute(write_notebook(tmp_path / "explorer.ipynb", CELLS), store_widget_state=False)
    outputs = [o for c in nb.cells for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
    assert len(outputs) == 2 and all("application/vnd.jupyter.widget-view+json" in o["data"] for o in outputs)
    body, _ = HTMLExporter().from_notebook_node(nb)
    html_path = tmp_path / "explorer.html"
    html_path.write_text(body, encoding="utf-8")
    ctx = offline_context(browser)
    page = ctx.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(html_path.as_uri())
    snap = page.locator(".lv-snapshot")
    expect(snap).to_have_count(2)
    first = snap.first
    expect(first).to_be_visible()
    lens = lv.Lens(models.build("llama"), models.tokenizer())
    tr = lens.trace(PROMPT, target=" Paris")
    expect(first.locator(".s-tok")).to_have_count(len(tr))
    sel = first.locator(".s-tok.s-sel")                        # the selected token is filled with the accent
    assert sel.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(194, 0, 127)"
    expect(first.locator("table.s-grid td")).to_have_count(lens.n_layers * len(tr))
    expect(first.locator("img.s-map")).to_be_visible()
    assert first.locator("img.s-map").evaluate("img => img.complete && img.naturalWidth") == len(tr)
    p_true = float(tr.logits[-1].double().softmax(-1)[tr.target_id])
    expect(first.locator(".s-prob")).to_have_text(snapshot.percent(p_true))
    # the XSS prompt is text: no element from token text, no script ran
    xss = snap.nth(1)
    assert page.evaluate("window.__xss") is None
    assert xss.locator("img:not(.s-map)").count() == 0 and xss.locator("script").count() == 0
    assert "<img" in xss.locator(".s-prompt").text_content()
    first.scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "fallback-nbconvert.png"), full_page=True)
    assert errors == [] or all("require" in e or "define" in e for e in errors), errors
    assert all(not u.startswith("file:") for u in ctx.blocked)
    ctx.close()


def test_saved_widget_state_without_metadata_falls_back(tmp_path):
    """With widget state stored, nbconvert prefers the widget view (it needs the html-manager from a
    CDN); clearing the notebook metadata, as ClearMetadataPreprocessor does, brings the snapshot back."""
    nb = execute(write_notebook(tmp_path / "explorer.ipynb", CELLS[:2]), store_widget_state=True)
    assert "widgets" in nb.metadata
    with_state, _ = HTMLExporter().from_notebook_node(nb)
    assert "lv-snapshot" not in with_state and "application/vnd.jupyter.widget-view+json" in with_state
    exporter = HTMLExporter(config={"ClearMetadataPreprocessor": {"enabled": True}})
    cleared, _ = exporter.from_notebook_node(nb)
    assert cleared.count('class="lv-snapshot"') == 1


HOST_CONTROLS = ('<div id="host"><button>host</button><input type="text" value="x"><textarea>t</textarea>'
                 '<select><option>o</option></select><input type="checkbox"><table><tr><td>c</td></tr></table>'
                 '<label>l</label><canvas width="4" height="4"></canvas></div>')
HOST_STYLES_JS = """() => [...document.querySelectorAll('#host *')].map((e) => {
  const cs = getComputedStyle(e); return [e.tagName, cs.cssText || [...cs].map((p) => p + ':' + cs.getPropertyValue(p)).join(';')]; })"""


def mute_page(tmp_path, ex) -> str:
    """The Explorer's own JS on a model whose send() goes nowhere, as in a saved-state page."""
    state = {k: ({"$b64": base64.b64encode(bytes(v)).decode()} if isinstance(v, (bytes, memoryview)) else v)
             for k, v in ex.get_state().items() if not k.startswith("_") or k == "_modules"}
    css = (STATIC / "style.css").read_text()
    state_json = json.dumps(state).replace("</", "<\\/")
    esm_json = json.dumps((STATIC / "explorer.js").read_text()).replace("</", "<\\/")
    page = f"""<!DOCTYPE html><html><head><meta charset="utf-8"><style>{css}</style></head><body>
{HOST_CONTROLS}
<div id="root"></div>
<script type="application/json" id="state">{state_json}</script>
<script type="application/json" id="esm">{esm_json}</script>
<script type="module">
const raw = JSON.parse(document.getElementById("state").textContent);
const state = {{}};
for (const [k, v] of Object.entries(raw)) state[k] = v && v.$b64 !== undefined
  ? new DataView(Uint8Array.from(atob(v.$b64), (c) => c.charCodeAt(0)).buffer) : v;
const handlers = {{}};
window.__sent = [];
const model = {{
  get: (k) => state[k], set: (k, v) => {{ state[k] = v; (handlers["change:" + k] || []).forEach((f) => f()); }},
  save_changes() {{}}, send(msg) {{ window.__sent.push(msg); }},          // no kernel: nobody answers
  on(e, f) {{ (handlers[e] = handlers[e] || []).push(f); }},
  off(e, f) {{ handlers[e] = (handlers[e] || []).filter((g) => g !== f); }},
}};
const src = JSON.parse(document.getElementById("esm").textContent);
const mod = await import(URL.createObjectURL(new Blob([src], {{ type: "text/javascript" }})));
window.__cleanup = await mod.default.render({{ model, el: document.getElementById("root") }});
window.__handlers = handlers;
document.body.dataset.ready = "1";
</script></body></html>"""
    path = tmp_path / "mute.html"
    path.write_text(page, encoding="utf-8")
    return path.as_uri()


def test_without_a_kernel_requests_say_so_within_a_second(tmp_path, browser, artifacts):
    ex = lv.Explorer(lv.Lens(models.build("llama"), models.tokenizer()), PROMPT, target=" Paris")
    ctx = offline_context(browser)
    page = ctx.new_page()
    page.goto(mute_page(tmp_path, ex))
    expect(page.locator("body[data-ready='1']")).to_have_count(1)
    root = page.locator(".lv-explorer")
    expect(root.locator(".lv-token")).to_have_count(len(ex.tokens))
    note = root.locator(".lv-kernel-note")
    expect(note).to_contain_text("No Python kernel answered", timeout=1500)   # the first map request
    # move the eta slider by keyboard: a run is sent, nobody answers
    slider = root.locator(".lv-eta")
    slider.focus()
    page.evaluate("() => { const n = document.querySelector('.lv-kernel-note'); n.textContent = ''; }")
    t0 = time.monotonic()
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("() => window.__sent.some((m) => m.type === 'run')", timeout=3000)
    t_sent = time.monotonic()
    expect(note).to_contain_text("No Python kernel answered", timeout=1500)
    t_said = time.monotonic()
    expect(root).not_to_have_class("lv-busy", timeout=1000)
    expect(slider).to_have_value("0")                 # back to the state shown (no patches)
    expect(root.locator(".lv-eta-value")).to_have_text("0")
    assert t_said - t_sent < 1.0, (t_sent - t0, t_said - t_sent)
    # the controls still work on what is there
    root.locator(".lv-token").nth(2).click()
    expect(root.locator(".lv-cell.lv-colsel").first).to_have_attribute("data-pos", "2")
    page.screenshot(path=str(artifacts / "fallback-no-kernel.png"), full_page=True)
    # changing tabs disposes the old view: the number of model listeners stays the same
    count = "() => Object.values(window.__handlers).reduce((n, fs) => n + fs.length, 0)"
    before = page.evaluate(count)
    for tab in ["neurons", "reversed", "flow", "masks", "backward", "attention", "neurons", "attention"]:
        root.locator(f'.lv-tab[data-tab="{tab}"]').click()
        expect(root.locator(f".lv-view-{tab}")).to_have_count(1)
    assert page.evaluate(count) == before
    # VS Code's dark theme (body.vscode-dark, --vscode-editor-background) is followed at once
    page.evaluate("""() => { document.body.style.setProperty('--vscode-editor-background', '#1f1f1f');
                             document.body.classList.add('vscode-dark'); }""")
    expect(root).to_have_attribute("data-lv-theme", "dark")
    assert root.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(31, 31, 31)"
    low = [r for r in contrast_report(root) if r["ratio"] < 4.5]
    assert not low, low[:5]
    page.evaluate("""() => { document.body.classList.replace('vscode-dark', 'vscode-light');
                             document.body.style.removeProperty('--vscode-editor-background'); }""")
    expect(root).to_have_attribute("data-lv-theme", "light")
    # removing the view unregisters every model listener (ctx.on -> off)
    page.evaluate("() => window.__cleanup()")
    left = page.evaluate("() => Object.values(window.__handlers).reduce((n, fs) => n + fs.length, 0)")
    assert left == 0
    # nothing leaks into the host page: its own controls look exactly as on a page without lensviz
    with_lv = page.evaluate(HOST_STYLES_JS)
    bare = ctx.new_page()
    bare.set_content(f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{HOST_CONTROLS}</body></html>")
    assert bare.evaluate(HOST_STYLES_JS) == with_lv
    assert ctx.blocked == []
    ctx.close()


PALETTE_JS = """async (src) => {
  const u = await import(URL.createObjectURL(new Blob([src], { type: "text/javascript" })));
  const out = {};
  for (const dark of [false, true]) {
    u.setTheme(dark);
    const ts = Array.from({ length: 11 }, (_, i) => i / 10);
    const key = dark ? "dark" : "light";
    out[key] = {
      green: ts.map((t) => u.luminance(u.green(t))), purple: ts.map((t) => u.luminance(u.purple(t))),
      blue: ts.map((t) => u.luminance(u.blue(t))),
      neg: ts.map((t) => u.luminance(u.diverging(-t))), pos: ts.map((t) => u.luminance(u.diverging(t))),
      ends: [u.diverging(-1), u.diverging(1)],
    };
  }
  return out;
}"""


def test_palettes_carry_the_value_in_lightness(browser, tmp_path):
    """Colour-blind safe scales: each sequential scale (and each half of the diverging one) changes
    lightness monotonically from one end to the other, in both themes, with a wide range; the
    diverging ends are red and blue (told apart by red-green colour-blind readers)."""
    page = browser.new_page()
    page.goto("about:blank")
    out = page.evaluate(PALETTE_JS, (STATIC / "util.js").read_text())
    for theme, scales in out.items():
        for name in ("green", "purple", "blue", "neg", "pos"):
            lum = scales[name]
            steps = [b - a for a, b in zip(lum, lum[1:])]
            assert all(s < 0 for s in steps) or all(s > 0 for s in steps), (theme, name, lum)
            hi, lo = max(lum), min(lum)
            assert (hi + 0.05) / (lo + 0.05) >= 3.0, (theme, name, lum)   # strong to weak: >= 3:1
        red, blue = (tuple(int(x) for x in c[4:-1].split(",")) for c in scales["ends"])
        assert red[0] > red[2] and blue[2] > blue[0], scales["ends"]
    page.close()
