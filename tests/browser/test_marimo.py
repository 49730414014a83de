"""The Explorer in marimo (`marimo edit` and `marimo run`, real servers on 127.0.0.1): every view
renders, one click selects everywhere, the eta slider and a neuron toggle re-run the model (marimo's
anywidget host: model.send / msg:custom), and the controls' computed styles are the same as in
JupyterLab (the widget styles every control itself, so marimo's CSS reset changes nothing)."""
from __future__ import annotations

import pytest
from playwright.sync_api import expect

from harness.browser import REPO, open_notebook, run_all, server_pool, write_notebook
from tests.browser.marimoserver import MarimoServer, marimo_notebook
from tests.browser.pagecheck import CONTROLS, contrast_report, control_styles
from tests.browser.test_explorer import CELLS, expected_prob
from tests.conftest import PROMPT

SOURCE = marimo_notebook([
    f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport marimo as mo\nimport lensviz as lv\n"
    "from tests import models\nlens = lv.Lens(models.build('llama'), models.tokenizer())",
    f"explorer = lv.Explorer(lens, {PROMPT!r}, target=' Paris')\nex = mo.ui.anywidget(explorer)\nex",
    "mo.md(f'threaded runs: {explorer.threaded}')",
])


@pytest.fixture
def marimo(tmp_path_factory, request):
    with server_pool(request) as servers:
        def start(mode, theme="light"):
            tmp = tmp_path_factory.mktemp(f"marimo-{mode}")
            servers.append(MarimoServer(SOURCE, mode=mode, theme=theme, tmp_parent=tmp).start())
            return servers[-1]

        yield start


@pytest.mark.parametrize("mode", ["edit", "run"])
def test_explorer_in_marimo(mode, marimo, page, artifacts):
    server = marimo(mode)
    page.goto(server.url)
    ex = page.locator(".lv-explorer").first
    expect(ex.locator(".lv-map-forward")).to_be_visible(timeout=120_000)
    from tests import models
    import lensviz as lv
    n = len(lv.Lens(models.build("llama"), models.tokenizer()).encode(PROMPT)[0])
    expect(ex.locator(".lv-token")).to_have_count(n)
    expect(ex.locator(".lv-grid .lv-cell")).to_have_count(3 * n)
    expect(ex.locator(".lv-thumb")).to_have_count(4)
    page.screenshot(path=str(artifacts / f"marimo-{mode}.png"), full_page=True)

    # linked selection: token -> grid column and attention row; norm cell -> the big map's head
    ex.locator(".lv-token").nth(3).click()
    expect(ex.locator(".lv-cell.lv-colsel").first).to_have_attribute("data-pos", "3")
    expect(ex.locator(".lv-fig figcaption").first).to_contain_text("row = query 3")
    ex.locator('.lv-norm-cell[data-layer="1"][data-head="2"]').click()
    expect(ex.locator(".lv-map-forward")).to_have_attribute("data-head", "2")
    ex.locator('.lv-cell[data-layer="2"][data-pos="4"]').hover()
    expect(ex.locator(".lv-tip .lv-bar-row")).to_have_count(10)
    page.mouse.move(0, 0)

    # patch re-runs (in the Explorer's background thread, a mo.Thread): the slider, then a neuron
    # toggle; the DOM shows what Python computes
    expect(page.get_by_text("threaded runs: True")).to_be_visible()
    runs0 = int(ex.get_attribute("data-lv-runs"))
    ex.locator(".lv-eta").fill("-5")
    patched = ex.locator(".lv-patched-prob")
    expect(patched).to_be_visible()
    assert float(patched.get_attribute("data-prob")) == pytest.approx(expected_prob(-5.0), rel=1e-6)
    expect(ex.locator('.lv-patch-chip[data-type="attention"]')).to_contain_text("η=-5")
    expect(ex).to_have_attribute("data-lv-runs", str(runs0 + 1))
    ex.locator(".lv-reset").click()
    expect(ex.locator(".lv-patched-prob")).to_have_count(0)
    ex.locator('.lv-tab[data-tab="neurons"]').click()
    first = ex.locator(".lv-neuron-table .lv-toggle").first
    expect(first).to_be_visible()
    neuron = first.get_attribute("data-neuron")
    first.click()
    expect(ex.locator('.lv-patch-chip[data-type="neuron"]')).to_contain_text(f"#{neuron}")
    expect(ex.locator(".lv-patched-prob")).to_be_visible()

    # every other view, from the kernel's data
    ex.locator('.lv-tab[data-tab="reversed"]').click()
    expect(ex.locator(".lv-map-reversed")).to_be_visible()
    ex.locator('.lv-tab[data-tab="backward"]').click()
    expect(ex.locator(".lv-bl-ff2 .lv-bl-cell")).to_have_count(3 * n)
    ex.locator('.lv-tab[data-tab="flow"]').click()
    expect(ex.locator("svg.lv-flow .lv-node").first).to_be_visible()
    ex.locator('.lv-tab[data-tab="masks"]').click()
    expect(ex.locator(".lv-mask-caption")).to_contain_text(f"{n * (n + 1) // 2} of {n * n} pairs allowed")
    expect(ex.locator(".lv-kernel-note")).to_be_hidden()
    page.screenshot(path=str(artifacts / f"marimo-{mode}-masks.png"), full_page=True)
    assert page.offsite == []


def test_controls_are_styled_the_same_in_jupyterlab_and_marimo(tmp_path, lab, marimo, page, artifacts):
    write_notebook(tmp_path / "explorer.ipynb", CELLS[:2])
    open_notebook(page, lab(tmp_path), "explorer.ipynb")
    run_all(page)
    ex = page.locator(".lv-explorer").first
    expect(ex.locator(".lv-map-forward")).to_be_visible()
    in_lab = control_styles(ex)
    server = marimo("edit")
    page.goto(server.url)
    ex = page.locator(".lv-explorer").first
    expect(ex.locator(".lv-map-forward")).to_be_visible(timeout=120_000)
    in_marimo = control_styles(ex)
    assert set(in_lab) == set(CONTROLS) and all(in_lab.values()), in_lab
    diffs = {(name, prop): (v, in_marimo[name][prop]) for name, props in in_lab.items()
             for prop, v in props.items() if in_marimo[name][prop] != v}
    assert not diffs, diffs
    # and the controls are really drawn: borders and backgrounds, not bare text
    assert in_lab["run"]["border-top-style"] == "solid" and in_lab["run"]["background-color"] != "rgba(0, 0, 0, 0)"
    assert in_lab["text"]["border-top-width"] == "1px" and in_lab["textarea"]["border-top-style"] == "solid"
    page.screenshot(path=str(artifacts / "marimo-controls.png"))


def test_marimo_dark_theme(marimo, page, artifacts):
    """marimo's dark theme (.dark): the Explorer follows it and its text passes WCAG AA."""
    server = marimo("run", theme="dark")
    page.goto(server.url)
    ex = page.locator(".lv-explorer").first
    expect(ex.locator(".lv-map-forward")).to_be_visible(timeout=120_000)
    expect(ex).to_have_attribute("data-lv-theme", "dark")
    report = contrast_report(ex)
    low = [r for r in report if r["ratio"] < 4.5]
    assert len(report) > 20 and not low, low[:8]
    print(f"\nmarimo dark: lowest text contrast {min(r['ratio'] for r in report):.2f}")
    page.screenshot(path=str(artifacts / "marimo-dark.png"), full_page=True)
