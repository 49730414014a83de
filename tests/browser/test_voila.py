"""The Explorer in Voilà (a real server on 127.0.0.1): the dashboard renders the widget (not the
static snapshot), one click selects everywhere, and the eta slider re-runs the model in the kernel."""
from __future__ import annotations

import pytest
from playwright.sync_api import expect

from harness.browser import server_pool, write_notebook
from tests.browser.test_explorer import CELLS, expected_prob
from tests.browser.voilaserver import VoilaServer

VOILA_TEMPLATE_CDN = ("https://cdn.jsdelivr.net/npm/@fortawesome/", "https://cdnjs.cloudflare.com/ajax/libs/es6-shim/",
                      "https://cdn.jsdelivr.net/npm/es6-shim", "https://unpkg.com/@fortawesome/",
                      "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/")


@pytest.fixture
def voila(tmp_path_factory, request):
    with server_pool(request) as servers:
        def start(folder, notebook):
            servers.append(VoilaServer(folder, notebook, tmp_parent=tmp_path_factory.mktemp("voila")).start())
            return servers[-1]

        yield start


def test_explorer_in_voila(tmp_path, voila, page, artifacts):
    write_notebook(tmp_path / "explorer.ipynb", CELLS[:2] + ["print('threaded runs:', ex.threaded)"])
    server = voila(tmp_path, "explorer.ipynb")
    page.goto(server.page_url)
    ex = page.locator(".lv-explorer").first
    expect(ex.locator(".lv-map-forward")).to_be_visible(timeout=120_000)
    expect(page.locator(".lv-snapshot")).to_have_count(0)     # the widget, not the fallback
    n = ex.locator(".lv-token").count()
    assert n > 5
    expect(ex.locator(".lv-grid .lv-cell")).to_have_count(3 * n)
    ex.locator(".lv-token").nth(2).click()
    expect(ex.locator(".lv-cell.lv-colsel").first).to_have_attribute("data-pos", "2")
    expect(ex.locator(".lv-fig figcaption").first).to_contain_text("row = query 2")
    # the runs go to the Explorer's background thread here (Voilà's kernel is an IPython kernel), and a
    # patch re-run from that thread reaches the page: twice, the second replacing the first
    expect(page.get_by_text("threaded runs: True")).to_be_visible()
    runs0 = int(ex.get_attribute("data-lv-runs"))
    ex.locator(".lv-eta").fill("-5")
    patched = ex.locator(".lv-patched-prob")
    expect(patched).to_be_visible()
    assert float(patched.get_attribute("data-prob")) == pytest.approx(expected_prob(-5.0), rel=1e-6)
    ex.locator(".lv-eta").fill("-3")
    expect(ex.locator('.lv-patch-chip[data-type="attention"]')).to_contain_text("η=-3 ")
    assert float(patched.get_attribute("data-prob")) == pytest.approx(expected_prob(-3.0), rel=1e-6)
    expect(ex).to_have_attribute("data-lv-runs", str(runs0 + 2))
    ex.locator('.lv-tab[data-tab="reversed"]').click()
    expect(ex.locator(".lv-map-reversed")).to_be_visible()
    page.screenshot(path=str(artifacts / "voila.png"), full_page=True)
    # Voilà's own page template asks CDNs for its stylesheets (Font Awesome, es6 shims); they fail
    # here (no DNS) and change nothing. Nothing else may leave 127.0.0.1.
    print("\nVoilà template's off-box requests:", page.offsite)
    ours = [u for u in page.offsite if not u.startswith(VOILA_TEMPLATE_CDN)]
    assert ours == []
