"""The exported page (lv.export_html) without a kernel: it opens with no error and no note; asking for
something that needs a kernel (a patch, a re-run, Generate, a step) gives a calm note within a second,
no error, and every control goes back to the state shown."""
from __future__ import annotations

import time

from playwright.sync_api import expect

import lensviz as lv
from tests import models
from tests.conftest import PROMPT


def test_static_page_is_calm_until_asked_and_then_restores(tmp_path, browser, artifacts):
    lens = lv.Lens(models.build("llama"), models.tokenizer())
    ex = lv.Explorer(lens, PROMPT, target=" Paris", generate=3)
    ex.error = "left over from the session"          # an old error does not travel into the page
    path = lv.export_html(ex, tmp_path / "page.html")
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    ctx.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "blob:", "data:"))
              else route.abort())
    page = ctx.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    expect(page.locator("body[data-ready='1']")).to_have_count(1)
    expect(page.locator(".lv-map-forward")).to_be_visible()
    page.wait_for_timeout(1500)                       # longer than the widget waits for a kernel
    expect(page.locator(".lv-error")).to_have_text("")
    expect(page.locator(".lv-kernel-note")).to_have_text("")
    page.screenshot(path=str(artifacts / "export-at-load.png"), full_page=True)
    note = page.locator(".lv-kernel-note")
    n = len(lens.encode(PROMPT)[0])

    def asks(action, restored):
        page.evaluate("document.querySelector('.lv-kernel-note').textContent = ''")
        t0 = time.perf_counter()
        action()
        expect(note).to_contain_text("static export", timeout=3000)
        waited = time.perf_counter() - t0
        assert waited < 1.5, waited
        expect(page.locator(".lv-error")).to_have_text("")
        expect(page.locator(".lv-explorer")).not_to_have_class("lv-busy")
        restored()

    # the eta slider: note, and the slider back at 0 (no patch was applied)
    asks(lambda: page.locator(".lv-eta").fill("-5"), lambda: expect(page.locator(".lv-eta")).to_have_value("0"))
    expect(page.locator(".lv-patch-chip")).to_have_count(0)
    # a new prompt and Run: the prompt box shows the exported prompt again
    asks(lambda: (page.locator(".lv-prompt").fill("Something else"), page.locator(".lv-run").click()),
         lambda: expect(page.locator(".lv-prompt")).to_have_value(PROMPT))
    # a step: the scrubber stays on the exported step
    asks(lambda: page.locator(".lv-gen-token").nth(2).click(),
         lambda: expect(page.locator(".lv-step")).to_have_value("0"))
    expect(page.locator(".lv-token")).to_have_count(n)
    # Generate
    asks(lambda: page.locator(".lv-generate").click(), lambda: expect(page.locator(".lv-gen-token")).to_have_count(3))
    page.screenshot(path=str(artifacts / "export-asked.png"), full_page=True)
    assert errors == []
    ctx.close()
