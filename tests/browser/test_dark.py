"""The Explorer in JupyterLab Dark: it follows the theme (.lv-dark), every piece of text it draws
passes WCAG AA contrast (>= 4.5:1) against the background behind it, measured in the browser, on
every view; the heat maps stay readable (their strongest cells stand out from the dark frame)."""
from __future__ import annotations

import json

from playwright.sync_api import expect

from harness.browser import open_notebook, run_all, write_notebook
from tests.browser.pagecheck import contrast_report
from tests.browser.test_explorer import CELLS

AA = 4.5


def dark_lab(lab, tmp_path):
    server = lab(tmp_path)
    themes = server.home / "lab-settings" / "@jupyterlab" / "apputils-extension" / "themes.jupyterlab-settings"
    themes.write_text(json.dumps({"theme": "JupyterLab Dark"}))     # read by the server per request
    return server


def luminance_contrast(page, a: str, b: str) -> float:
    return page.evaluate("""([a, b]) => {
      const lum = (s) => { const [r, g, bb] = s.match(/[\\d.]+/g).slice(0, 3).map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
        return 0.2126 * r + 0.7152 * g + 0.0722 * bb; };
      const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); }""", [a, b])


def test_explorer_in_jupyterlab_dark(tmp_path, lab, page, artifacts):
    write_notebook(tmp_path / "explorer.ipynb", CELLS[:2])
    server = dark_lab(lab, tmp_path)
    open_notebook(page, server, "explorer.ipynb")
    expect(page.locator("body[data-jp-theme-light='false']")).to_have_count(1)
    run_all(page)
    ex = page.locator(".lv-explorer").first
    expect(ex.locator(".lv-map-forward")).to_be_visible()
    expect(ex).to_have_attribute("data-lv-theme", "dark")
    frame_bg = ex.evaluate("e => getComputedStyle(e).backgroundColor")
    assert frame_bg == page.evaluate("() => getComputedStyle(document.body).getPropertyValue('--jp-layout-color0')") \
        or frame_bg == "rgb(17, 17, 17)", frame_bg

    worst = {}
    def check(view):
        report = contrast_report(ex)
        assert len(report) > 20, report
        low = [r for r in report if r["ratio"] < AA]
        assert not low, f"{view}: text below {AA}:1: {low[:8]}"
        worst[view] = min(r["ratio"] for r in report)

    check("attention")
    # a patched run (green / red diff line), then the views one by one
    ex.locator(".lv-eta").fill("-5")
    expect(ex.locator(".lv-patched-prob")).to_be_visible()
    ex.locator('.lv-cell[data-layer="2"][data-pos="4"]').hover()
    expect(ex.locator(".lv-tip .lv-bar-row")).to_have_count(10)
    check("patched + tip")
    page.screenshot(path=str(artifacts / "dark-attention.png"), full_page=True)
    page.mouse.move(0, 0)
    ex.locator('.lv-tab[data-tab="reversed"]').click()
    expect(ex.locator(".lv-map-reversed")).to_be_visible()
    # the Reversed head-norm grid: its strongest cell stands out from the frame (>= 3:1, non-text)
    cells = ex.locator(".lv-norm-cell")
    bgs = cells.evaluate_all("cs => cs.map((c) => getComputedStyle(c).backgroundColor)")
    best = max(luminance_contrast(page, b, frame_bg) for b in bgs)
    assert best >= 3.0, (best, bgs[:4])
    ex.locator(".lv-side-by-side").check()
    expect(ex.locator(".lv-map-forward")).to_be_visible()
    check("reversed")
    page.screenshot(path=str(artifacts / "dark-reversed.png"), full_page=True)
    for tab, ready in [("neurons", ".lv-neuron-table .lv-toggle"), ("backward", ".lv-bl-ff2 .lv-bl-cell"),
                       ("flow", "svg.lv-flow .lv-node"), ("masks", ".lv-mask-map")]:
        ex.locator(f'.lv-tab[data-tab="{tab}"]').click()
        expect(ex.locator(ready).first).to_be_visible()
        check(tab)
        page.screenshot(path=str(artifacts / f"dark-{tab}.png"), full_page=True)
    ex.locator(".lv-colour").select_option("rank")
    check("rank colours")
    print("\nlowest text contrast per view (JupyterLab Dark):", {k: round(v, 2) for k, v in worst.items()})
    assert page.offsite == []
