"""Fixtures for real-browser widget tests (headless Debian Chromium + Playwright + a local Jupyter).

    from playwright.sync_api import expect
    from harness.browser import open_notebook, run_all, write_notebook

    def test_my_widget(tmp_path, lab, page, artifacts):
        write_notebook(tmp_path / "w.ipynb", ["import lensviz as lv", "w = MyWidget(); w"])
        server = lab(tmp_path)                       # JupyterLab; lab(tmp_path, app="notebook") for Notebook 7
        open_notebook(page, server, "w.ipynb")
        run_all(page)
        expect(page.locator(".my-widget")).to_be_visible()
        page.screenshot(path=artifacts / "my_widget.png")
        assert page.offsite == []

Every test in tests/browser is marked ``browser`` (so ``-m "not browser"`` leaves them out). Without
/usr/bin/chromium they are skipped, except when CI is set, where they fail: CI must test the widgets.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from harness.browser import (CHROMIUM, CHROMIUM_ARGS, LabServer, open_notebook, run_all,  # noqa: F401
                             server_pool, wait_kernel_idle, write_notebook)
ARTIFACTS = Path(__file__).parent / "artifacts"
HERE = Path(__file__).parent.resolve()
_LOCAL = re.compile(r"^(https?|wss?)://(127\.0\.0\.1|localhost)(:\d+)?(/|$)")


def _missing_reason() -> str | None:
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} not found (Debian package 'chromium'; scripts/setup.sh installs it as root)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    return None


@pytest.hookimpl(tryfirst=True)      # before -m "not browser" deselects
def pytest_collection_modifyitems(config, items):
    mine = [it for it in items if HERE in Path(str(it.fspath)).resolve().parents]
    if not mine:
        return
    reason = _missing_reason()
    for it in mine:
        it.add_marker(pytest.mark.browser)
        if reason and not os.environ.get("CI"):
            it.add_marker(pytest.mark.skip(reason=f"browser test: {reason}"))
    # With CI set and no browser, the `browser` fixture fails each test with `reason`.


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the whole run (exactly one sync_playwright per process: pitfall 5)."""
    reason = _missing_reason()
    if reason:
        pytest.fail(f"browser test cannot run on CI: {reason}", pytrace=False)
    from playwright.sync_api import expect, sync_playwright
    expect.set_options(timeout=60_000)           # expect() has its own 5 s default (pitfall 4)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, request, artifacts):
    """A fresh context + page (1280x1000). ``page.offsite`` lists every request not to 127.0.0.1;
    ``page.console_errors`` the console errors and uncaught page errors. On a failing test a
    screenshot goes to artifacts/FAILED-<test>.png."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)
    pg.offsite, pg.console_errors = [], []
    pg.on("request", lambda r: None if _LOCAL.match(r.url) or not re.match(r"^(https?|wss?|ftp):", r.url)
          else pg.offsite.append(r.url))
    pg.on("websocket", lambda ws: None if _LOCAL.match(ws.url) else pg.offsite.append(ws.url))
    pg.on("console", lambda m: pg.console_errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.console_errors.append(f"pageerror: {e}"))
    yield pg
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        try:
            pg.screenshot(path=str(artifacts / f"FAILED-{_safe(request.node.name)}.png"))
        except Exception:                        # noqa: BLE001
            pass
    ctx.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture
def lab(tmp_path_factory, request):
    """Factory: ``lab(folder, app="lab"|"notebook")`` starts a server on a temporary copy of
    ``folder`` and returns the LabServer (``.url``, ``.token``, ``.root``, ``.notebook_url(name)``);
    every server it started is stopped when the test ends. On failure, the server log is printed."""
    with server_pool(request, lambda s: f"{s.app} server ({s.url})") as servers:
        def start(folder=None, app: str = "lab", **kw) -> LabServer:
            kw.setdefault("tmp_parent", tmp_path_factory.mktemp(f"{app}server"))
            servers.append(LabServer(folder, app=app, **kw).start())
            return servers[-1]

        yield start


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """tests/browser/artifacts/ (ignored by git): screenshots and other things to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)
