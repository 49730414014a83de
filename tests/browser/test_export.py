"""export_html: one file that opens from file:// with every request blocked and shows the tokens,
the logit lens and the attention views of the captured run."""
from __future__ import annotations

import re

from playwright.sync_api import expect

import lensviz as lv
from tests import models
from tests.conftest import PROMPT

CDN_HOSTS = ("cdn.", "unpkg", "jsdelivr", "cdnjs", "googleapis", "http://", "https://")


def test_export_opens_offline_and_shows_the_views(tmp_path, browser, artifacts):
    lens = lv.Lens(models.build("gpt2"), models.tokenizer())
    tr = lens.trace(PROMPT, target=" Paris")
    path = lv.export_html(tr, tmp_path / "trace.html")
    html = path.read_text()
    assert not any(h in html for h in CDN_HOSTS)
    assert len(html) < 3_000_000
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    blocked, errors = [], []
    ctx.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "blob:", "data:"))
              else (blocked.append(route.request.url), route.abort()))
    page = ctx.new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    expect(page.locator("body[data-ready='1']")).to_have_count(1)
    expect(page.locator(".lv-token")).to_have_count(len(tr))
    expect(page.locator(".lv-grid .lv-cell")).to_have_count(lens.n_layers * len(tr))
    top1 = tr.logit_lens(k=1).tokens[-1][-1][0]
    cell = page.locator(f'.lv-cell[data-layer="{lens.n_layers - 1}"][data-pos="{len(tr) - 1}"]')
    assert cell.get_attribute("data-token") == top1
    expect(page.locator(".lv-map-forward")).to_be_visible()
    # interactions work on the exported data: click a token, switch to Reversed, hover a cell
    page.locator(".lv-token").nth(4).click()
    expect(page.locator(".lv-fig figcaption").first).to_contain_text("row = query 4")
    page.locator('.lv-tab[data-tab="reversed"]').click()
    expect(page.locator(".lv-map-reversed")).to_be_visible()
    page.locator('.lv-cell[data-layer="1"][data-pos="2"]').hover()
    expect(page.locator(".lv-tip .lv-bar-row")).to_have_count(10)
    page.locator(".lv-run").click()
    expect(page.locator(".lv-kernel-note")).to_contain_text("static export")   # a calm note, no error
    expect(page.locator(".lv-error")).to_have_text("")
    page.screenshot(path=str(artifacts / "export.png"), full_page=True)
    assert blocked == [] and errors == []
    assert re.search(r"\d+ tokens", page.locator(".lv-status").text_content())
    ctx.close()
