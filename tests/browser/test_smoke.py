"""Smoke test of the browser set-up: an anywidget JS -> Python -> JS round trip and `import lensviz`,
in JupyterLab and in Notebook 7, with no request leaving 127.0.0.1."""
from __future__ import annotations

import re
import sys
import time

import pytest
from playwright.sync_api import expect

import lensviz
from harness.browser import open_notebook, run_all, write_notebook

pytestmark = pytest.mark.browser     # (conftest marks every test here anyway)

COUNTER = '''
import anywidget, traitlets

class Counter(anywidget.AnyWidget):
    _esm = """
    function render({ model, el }) {
      const btn = document.createElement("button"); btn.className = "lv-count-btn";
      const lbl = document.createElement("span");   lbl.className = "lv-label";
      const sync = () => { btn.textContent = `count is ${model.get("count")}`;
                           lbl.textContent = model.get("label"); };
      btn.addEventListener("click", () => {            // JS -> Python
        model.set("count", model.get("count") + 1); model.save_changes(); });
      model.on("change:count", sync);
      model.on("change:label", sync);                  // Python -> JS
      sync(); el.append(btn, lbl);
    }
    export default { render };
    """
    count = traitlets.Int(0).tag(sync=True)
    label = traitlets.Unicode("python has not run yet").tag(sync=True)

    @traitlets.observe("count")
    def _on_count(self, change):                       # runs in the kernel
        self.label = f"python saw count={change['new']}"

    def __repr__(self):                                # deterministic (nbval)
        return f"Counter(count={self.count})"

w = Counter(); w
'''

CELLS = [
    "%%md\n# lensviz browser smoke test",
    "import sys, lensviz\nprint(f'lensviz {lensviz.__version__} | {sys.executable}')",
    COUNTER,
    "import ipywidgets\nipywidgets.IntSlider(value=3, description='slider')",
]


@pytest.mark.parametrize("app", ["lab", "notebook"])
def test_roundtrip_and_import(app, tmp_path, lab, page, artifacts):
    t0 = time.monotonic()
    write_notebook(tmp_path / "smoke.ipynb", CELLS)
    server = lab(tmp_path, app=app)
    t_server = time.monotonic()
    open_notebook(page, server, "smoke.ipynb")
    t_open = time.monotonic()
    run_all(page)
    t_run = time.monotonic()

    # the kernel is the venv's python, and it imports *this* lensviz
    expect(page.locator(".jp-OutputArea-output", has_text="lensviz ")).to_have_text(
        f"lensviz {lensviz.__version__} | {sys.executable}")

    btn, label = page.locator(".lv-count-btn"), page.locator(".lv-label")
    expect(btn).to_have_text("count is 0")
    expect(label).to_have_text("python has not run yet")
    expect(page.locator(".widget-slider")).to_be_visible()          # ipywidgets rendered too
    btn.click()
    expect(label).to_have_text("python saw count=1")                # JS -> Python -> JS
    btn.click()
    expect(btn).to_have_text("count is 2")
    expect(label).to_have_text("python saw count=2")
    t_click = time.monotonic()

    page.screenshot(path=str(artifacts / f"smoke-{app}.png"))
    assert page.offsite == [], f"requests left 127.0.0.1: {page.offsite}"
    assert not [e for e in page.console_errors if re.search(r"anywidget|widget", e, re.I)], page.console_errors
    print(f"\n{app}: server {t_server - t0:.1f}s, open->idle {t_open - t_server:.1f}s, "
          f"run all {t_run - t_open:.1f}s, round trips {t_click - t_run:.1f}s; "
          f"console errors: {page.console_errors}")
