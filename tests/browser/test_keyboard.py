"""The Explorer driven with the keyboard only (JupyterLab): Tab reaches every control in order with a
visible focus ring; arrow keys move the selected token, the selected logit-lens cell, the selected
head and the open tab; Enter / Space activate; the slider re-runs the model. Roles and labels are
there for screen readers."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from harness.browser import open_notebook, run_all, write_notebook
from tests.browser.pagecheck import focused
from tests.browser.test_explorer import CELLS, expected_prob

# The tab order through one Explorer (each a distinct stop), as (class or role) markers.
ORDER = ["lv-prompt", "lv-target", "lv-run", "INPUT.lv-gen-n", "INPUT.lv-gen-sample", "INPUT.lv-gen-seed",
         "BUTTON.lv-generate", "lv-token", "radio", "lv-colour", "lv-cell", "tab", "SELECT.lv-head-measure", "SELECT.lv-sum-axis",
         "lv-norm-cell", "lv-top-head", "lv-eta", "lv-eta-layers", "lv-eta-heads", "lv-ablate",
         "lv-segments", "lv-topk", "lv-topk-k", "lv-reset", "lv-copy"]


def marker(f) -> str:
    for m in ORDER:
        if m in f["cls"].split() or m == f["role"] or m == f["type"]:
            return m
    return f"{f['tag']}.{f['cls']}"


def test_keyboard_only(tmp_path, lab, page, artifacts):
    write_notebook(tmp_path / "explorer.ipynb", CELLS[:2])
    server = lab(tmp_path)
    open_notebook(page, server, "explorer.ipynb")
    run_all(page)
    ex = page.locator(".lv-explorer").first
    expect(ex.locator(".lv-map-forward")).to_be_visible()
    n = ex.locator(".lv-token").count()

    # roles and labels
    expect(ex.locator('[role="toolbar"].lv-strip')).to_have_count(1)
    expect(ex.locator('table.lv-grid[role="grid"]')).to_have_attribute("aria-label", re.compile("logit lens"))
    expect(ex.locator('[role="gridcell"].lv-cell').first).to_have_attribute("aria-label", re.compile(r"layer \d+, position \d+"))
    expect(ex.locator('[role="tablist"] [role="tab"]')).to_have_count(6)
    expect(ex.locator('canvas.lv-map-forward[role="img"]')).to_have_attribute("aria-label", re.compile("attention map"))

    # Tab order: enter the widget at its first control, then Tab only
    ex.locator(".lv-prompt").focus()
    seen = []
    while len(seen) < 40:
        f = focused(page)
        if not f["inWidget"]:
            break
        assert f["ring"], f"no visible focus ring on {f}"
        seen.append(marker(f))
        page.keyboard.press("Tab")
    stops = [m for i, m in enumerate(seen) if i == 0 or m != seen[i - 1]]   # the top-head chips: one run
    assert stops == ORDER, f"{seen}"
    assert seen.count("lv-top-head") == 6 and seen.count("lv-token") == 1 and seen.count("lv-cell") == 1

    # arrow keys on the token strip move the selection; the grid column follows
    ex.locator(".lv-token.lv-selected").focus()
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    expect(ex.locator(".lv-token.lv-selected")).to_have_attribute("data-pos", str(n - 3))
    expect(ex.locator(".lv-cell.lv-colsel").first).to_have_attribute("data-pos", str(n - 3))
    assert focused(page)["cls"].startswith("lv-token") and focused(page)["ring"]
    page.keyboard.press("Home")
    expect(ex.locator(".lv-token.lv-selected")).to_have_attribute("data-pos", "0")
    page.keyboard.press("End")
    expect(ex.locator(".lv-token.lv-selected")).to_have_attribute("data-pos", str(n - 1))

    # the grid: Tab to the selected cell, arrows move layer and position, Enter shows the top-k
    for _ in range(3):                          # token -> site radio -> colour select -> cell
        page.keyboard.press("Tab")
    assert "lv-cell" in focused(page)["cls"]
    page.keyboard.press("ArrowDown")            # one layer down
    page.keyboard.press("ArrowLeft")
    sel = ex.locator(".lv-cell.lv-selected")
    expect(sel).to_have_attribute("data-layer", "1")
    expect(sel).to_have_attribute("data-pos", str(n - 2))
    assert focused(page)["cls"].startswith("lv-cell") and focused(page)["ring"]
    page.keyboard.press("Enter")
    expect(ex.locator(".lv-tip .lv-bar-row")).to_have_count(10)
    expect(ex.locator(".lv-fig figcaption").first).to_contain_text(f"row = query {n - 2}")
    page.screenshot(path=str(artifacts / "keyboard-grid.png"), full_page=True)

    # the tab list: arrows move between views, the panel follows
    page.keyboard.press("Tab")
    assert focused(page)["role"] == "tab"
    page.keyboard.press("ArrowRight")
    expect(ex.locator('.lv-tab[aria-selected="true"]')).to_have_attribute("data-tab", "reversed")
    expect(ex.locator(".lv-map-reversed")).to_be_visible()
    assert focused(page)["label"].startswith("Reversed")
    page.keyboard.press("ArrowLeft")
    expect(ex.locator('.lv-tab[aria-selected="true"]')).to_have_attribute("data-tab", "attention")
    # the head grid (after the importance-measure select and the sum-axis toggle): arrows move the selected
    # head, the big map follows
    page.keyboard.press("Tab")
    assert "lv-head-measure" in focused(page)["cls"]
    page.keyboard.press("Tab")
    assert "lv-sum-axis" in focused(page)["cls"]
    page.keyboard.press("Tab")
    assert "lv-norm-cell" in focused(page)["cls"]
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    expect(ex.locator(".lv-map-forward")).to_have_attribute("data-head", "2")

    # the eta slider: arrow keys re-run the model; the DOM shows what Python computes
    ex.locator(".lv-eta").focus()
    for _ in range(10):                         # step 0.5: 0 -> -5
        page.keyboard.press("ArrowLeft")
    patched = ex.locator(".lv-patched-prob")
    expect(patched).to_be_visible()
    expect(ex.locator('.lv-patch-chip[data-type="attention"]')).to_contain_text("η=-5")
    assert float(patched.get_attribute("data-prob")) == pytest.approx(expected_prob(-5.0), rel=1e-6)
    # Enter activates Reset; Space activates a tab and a checkbox
    ex.locator(".lv-reset").focus()
    page.keyboard.press("Enter")
    expect(ex.locator(".lv-patched-prob")).to_have_count(0)
    ex.locator('.lv-tab[data-tab="attention"]').focus()
    page.keyboard.press("End")                  # the last tab: Masks
    expect(ex.locator(".lv-mask-map")).to_be_visible()
    page.keyboard.press("Home")
    expect(ex.locator(".lv-map-forward")).to_be_visible()
    ex.locator(".lv-topk-k").focus()
    page.keyboard.press("Shift+Tab")            # back to the top-k checkbox
    page.keyboard.press("Space")
    expect(ex.locator('.lv-patch-chip[data-type="topk"]')).to_contain_text("top-8")
    page.screenshot(path=str(artifacts / "keyboard-topk.png"), full_page=True)
    # Lab's own shortcuts did not fire: still one code cell selected, no cell added or run
    assert page.locator(".jp-Notebook .jp-Cell").count() == 2

    # the kernel goes away: a slider move says so within a second, the controls return to the state shown
    for k in server.api("api/kernels"):
        server.api(f"api/kernels/{k['id']}", method="DELETE")
    expect(page.locator(".jp-StatusBar-TextItem", has_text="| Idle")).to_have_count(0, timeout=30_000)
    slider = ex.locator(".lv-eta")
    slider.focus()
    page.keyboard.press("ArrowLeft")
    expect(ex.locator(".lv-kernel-note")).to_contain_text("No Python kernel answered", timeout=1500)
    expect(ex).not_to_have_class(re.compile(r"\blv-busy\b"), timeout=1000)
    expect(slider).to_have_value("0")
    page.screenshot(path=str(artifacts / "keyboard-no-kernel.png"), full_page=True)
    assert page.offsite == []
