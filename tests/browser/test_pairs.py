"""A prompt pair in the Explorer driven like a user in JupyterLab: both prompts side by side with their
metrics, the head grid's importance measures, the patching heatmap (attribution at once, site switch,
exact on demand), a clicked heatmap cell applied as a patch that every view follows and that the patch
list shows and removes, and the heatmap's keyboard access. The numbers in the DOM are the ones Python
computes for the same tiny model."""
from __future__ import annotations

import pathlib
import re

import pytest
from playwright.sync_api import expect

import lensviz as lv
from harness.browser import open_notebook, run_all, write_notebook
from tests import models
from tests.conftest import PROMPT

CLEAN = PROMPT
CORRUPT = PROMPT.replace(" France", " Paris")
REPO = pathlib.Path(__file__).resolve().parents[2]
CELLS = [
    f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport lensviz as lv\nfrom tests import models\n"
    "lens = lv.Lens(models.build('llama'), models.tokenizer())",
    f"ex = lv.Explorer(lens, {CLEAN!r}, corrupt={CORRUPT!r}, target=' Paris', distractor=' the')\nex",
]


def values(grid) -> list[float]:
    return [float(v) for v in grid.locator("td[data-value]").evaluate_all("els => els.map(e => e.dataset.value)")]


def by_cell(grid, attr) -> dict:
    rows = grid.locator("td[data-value]").evaluate_all(
        f"els => els.map(e => [Number(e.dataset.layer), Number(e.dataset.{attr}), Number(e.dataset.value)])")
    return {(la, c): v for la, c, v in rows}


def test_prompt_pair_in_jupyterlab(tmp_path, lab, page, artifacts):
    lens = lv.Lens(models.build("llama"), models.tokenizer())
    kw = dict(target=" Paris", distractor=" the")
    clean, corrupt = lens.trace(CLEAN, **kw), lens.trace(CORRUPT, **kw)
    write_notebook(tmp_path / "pairs.ipynb", CELLS)
    server = lab(tmp_path)
    open_notebook(page, server, "pairs.ipynb")
    run_all(page)
    ex = page.locator(".lv-explorer").first
    expect(ex).to_be_visible()

    # both prompts side by side, the replaced token marked in each, the metric of each run in the header
    expect(ex.locator(".lv-clean-strip .lv-pair-token")).to_have_count(20)
    expect(ex.locator(".lv-corrupt-strip .lv-pair-token")).to_have_count(20)
    expect(ex.locator(".lv-clean-strip .lv-differ")).to_have_text("·France")
    expect(ex.locator(".lv-corrupt-strip .lv-differ")).to_have_text("·Paris")
    assert float(ex.locator(".lv-metric-clean").get_attribute("data-value")) == pytest.approx(clean.metric, rel=1e-6)
    assert float(ex.locator(".lv-metric-corrupt").get_attribute("data-value")) == pytest.approx(corrupt.metric, rel=1e-6)
    expect(ex.locator(".lv-metric")).to_contain_text('logit(" Paris") − logit(" the")')

    # the head grid shows the direct logit attribution by default, and the other measures on demand
    grid = ex.locator(".lv-norm-grid")
    expect(grid).to_have_attribute("data-measure", "dla")
    dla = lv.head_importance(corrupt, "dla")
    got = by_cell(grid, "head")
    assert all(got[(la, h)] == pytest.approx(float(dla[la, h]), rel=1e-4, abs=1e-6) for la in range(3) for h in range(4))
    ex.locator(".lv-head-measure").select_option("ablation")
    expect(grid).to_have_attribute("data-measure", "ablation")
    abl = lv.head_importance(corrupt, "ablation")
    got = by_cell(grid, "head")
    assert all(got[(la, h)] == pytest.approx(float(abl[la, h]), rel=1e-4, abs=1e-6) for la in range(3) for h in range(4))
    expect(ex.locator(".lv-head-legend .lv-scale-bar")).to_be_visible()

    # the patching tab: attribution at once (resid post, layers x positions), site switch to heads
    ex.locator('.lv-tab[data-tab="patching"]').click()
    sweep = ex.locator(".lv-sweep-grid")
    expect(sweep).to_have_attribute("data-site", "post")
    expect(sweep.locator(".lv-sweep-cell")).to_have_count(3 * 20)
    ref = lens.patching_sweep(CLEAN, CORRUPT, site="post", method="attribution", **kw).effect
    got = by_cell(sweep, "col")
    assert all(got[(la, p)] == pytest.approx(float(ref[la, p]), rel=1e-4, abs=1e-6) for la in range(3) for p in range(20))
    expect(ex.locator(".lv-sweep-legend .lv-scale-bar")).to_be_visible()
    ex.locator(".lv-sweep-site").select_option("head")
    expect(sweep).to_have_attribute("data-site", "head")
    expect(sweep.locator(".lv-sweep-cell")).to_have_count(3 * 4)
    # exact on demand
    ex.locator(".lv-sweep-exact").click()
    expect(sweep).to_have_attribute("data-method", "exact")
    exact = lens.patching_sweep(CLEAN, CORRUPT, site="head", method="exact", **kw).effect
    got = by_cell(sweep, "col")
    assert all(got[(la, h)] == pytest.approx(float(exact[la, h]), rel=1e-4, abs=1e-6) for la in range(3) for h in range(4))
    # normalized toggle divides by metric_clean - metric_corrupt
    ex.locator(".lv-sweep-normalized").check()
    cell = sweep.locator('.lv-sweep-cell[data-layer="1"][data-col="2"]')
    assert float(cell.get_attribute("data-value")) == pytest.approx(
        float(exact[1, 2]) / (clean.metric - corrupt.metric), rel=1e-4)
    # hover shows the value
    cell.hover()
    expect(ex.locator(".lv-sweep-readout")).to_contain_text("layer 1 head 2: effect")

    # a click applies the patch: the patch list, the header metric and the patched diff follow
    cell.click()
    expect(ex.locator('.lv-patch-chip[data-type="head"]')).to_contain_text("L1H2")
    patched = lens.trace(CORRUPT, patches=(lv.HeadPatch(clean, 1, [2]),), **kw)
    metric = ex.locator(".lv-metric-patched")
    expect(metric).to_be_visible()
    assert float(metric.get_attribute("data-value")) == pytest.approx(patched.metric, rel=1e-6)
    assert float(metric.get_attribute("data-value")) - corrupt.metric == pytest.approx(float(exact[1, 2]), abs=1e-5)
    expect(ex.locator(".lv-patched-prob")).to_be_visible()
    expect(sweep.locator('.lv-sweep-cell[data-layer="1"][data-col="2"]')).to_have_class("lv-sweep-cell lv-patched")
    page.screenshot(path=str(artifacts / "pairs-patched.png"), full_page=True)

    # keyboard: arrows move the focused cell, Enter patches it too
    sweep.locator('.lv-sweep-cell[data-layer="1"][data-col="2"]').focus()
    page.keyboard.press("ArrowUp")
    focused = sweep.locator("td:focus")
    expect(focused).to_have_attribute("data-layer", "2")
    expect(focused).to_have_attribute("data-col", "2")
    page.keyboard.press("ArrowLeft")
    expect(sweep.locator("td:focus")).to_have_attribute("data-col", "1")
    page.keyboard.press("Enter")
    expect(ex.locator('.lv-patch-chip[data-type="head"]')).to_have_count(2)
    expect(ex.locator('.lv-patch-chip[data-type="head"]').nth(1)).to_contain_text("L2H1")
    # a residual cell: switch back to resid post and click the replaced token's column
    ex.locator(".lv-sweep-site").select_option("post")
    expect(ex.locator(".lv-sweep-wrap")).to_contain_text("exact sweep not computed yet")   # exact is per site
    ex.locator(".lv-sweep-method").select_option("attribution")
    expect(sweep.locator(".lv-sweep-cell")).to_have_count(3 * 20)
    sweep.locator('.lv-sweep-cell[data-layer="0"][data-col="9"]').click()
    expect(ex.locator('.lv-patch-chip[data-type="activation"]')).to_contain_text("post L0 @9")
    both = lens.trace(CORRUPT, patches=(lv.HeadPatch(clean, 1, [2]), lv.HeadPatch(clean, 2, [1]),
                                        lv.ActivationPatch(clean, 0, "post", positions=[9])), **kw)
    page.wait_for_function("v => Math.abs(Number(document.querySelector('.lv-metric-patched').dataset.value) - v) < 1e-5",
                           arg=both.metric)
    # views follow: the logit-lens grid shows the patched run's target ranks where they changed
    before, after = corrupt.logit_lens(k=1).target_rank, both.logit_lens(k=1).target_rank
    changed = (before != after).nonzero().tolist()
    assert changed, "the three patches change some logit-lens cell"
    for la, pos in changed[:5]:
        expect(ex.locator(f'.lv-cell[data-layer="{la}"][data-pos="{pos}"]')).to_have_attribute("data-rank", str(int(after[la, pos]) + 1))
    ex.locator('.lv-tab[data-tab="patching"]').click()
    expect(sweep).to_be_visible()
    expect(ex.locator(".lv-code")).to_have_count(1)
    ex.locator(".lv-copy").click()
    expect(ex.locator(".lv-code")).to_contain_text("clean = lens.trace(")
    expect(ex.locator(".lv-code")).to_contain_text("lv.ActivationPatch(source=clean, layer=0, site='post', positions=[9])")
    ex.screenshot(path=str(artifacts / "pairs-widget.png"))

    # removing the patches from the list restores the corrupt run
    for _ in range(3):
        ex.locator(".lv-patch-chip .lv-x").first.click()
        page.wait_for_timeout(300)
    expect(ex.locator(".lv-patch-chip")).to_have_count(0)
    expect(ex.locator(".lv-metric-patched")).to_have_count(0)
    expect(sweep.locator(".lv-sweep-cell.lv-patched")).to_have_count(0)
    assert page.offsite == []


IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


@pytest.mark.slow
def test_ioi_pair_on_smollm2_for_the_docs(tmp_path, lab, page, artifacts):
    """The figure in docs/images/patching.png: the exact resid-post sweep of an IOI pair on SmolLM2,
    normalized, with the strongest cell patched."""
    cells = [f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport lensviz as lv\nlens = lv.load(progress=False)",
             f"ex = lv.Explorer(lens, {IOI_CLEAN!r}, corrupt={IOI_CORRUPT!r}, target=' Mary', distractor=' John', "
             "tab='patching')\nex"]
    write_notebook(tmp_path / "ioi.ipynb", cells)
    page.set_viewport_size({"width": 1280, "height": 1900})     # tall enough for the figure: no layout shift later
    server = lab(tmp_path)
    open_notebook(page, server, "ioi.ipynb")
    run_all(page, timeout=300_000)
    ex = page.locator(".lv-explorer").first
    sweep = ex.locator(".lv-sweep-grid")
    expect(sweep.locator(".lv-sweep-cell")).to_have_count(30 * 14, timeout=120_000)
    ex.locator(".lv-sweep-exact").click()
    expect(sweep).to_have_attribute("data-method", "exact", timeout=300_000)
    ex.locator(".lv-sweep-normalized").check()
    vals = sweep.locator("td[data-value]").evaluate_all(
        "els => els.map(e => [Number(e.dataset.layer), Number(e.dataset.col), Number(e.dataset.value)])")
    layer, col, best = max(vals, key=lambda r: r[2])
    assert best > 0.5          # some single cell restores most of the clean logit difference
    sweep.locator(f'.lv-sweep-cell[data-layer="{layer}"][data-col="{col}"]').click()
    expect(ex.locator('.lv-patch-chip[data-type="activation"]')).to_contain_text(f"post L{layer} @{col}", timeout=120_000)
    expect(ex.locator(".lv-metric-patched")).to_be_visible(timeout=120_000)
    ex.scroll_into_view_if_needed()
    page.evaluate("() => document.querySelector('.lv-explorer').scrollIntoView({block: 'start'})")
    sweep.locator(f'.lv-sweep-cell[data-layer="{layer}"][data-col="{col}"]').hover()
    expect(ex.locator(".lv-sweep-readout")).to_contain_text(f"layer {layer} position {col}")
    ex.screenshot(path=str(REPO / "docs" / "images" / "patching.png"))
    ex.locator(".lv-view-patching").screenshot(path=str(artifacts / "ioi-patching.png"))
    assert page.offsite == []


def test_exported_pair_shows_the_heatmap_offline(tmp_path, browser, artifacts):
    lens = lv.Lens(models.build("llama"), models.tokenizer())
    ex = lv.Explorer(lens, CLEAN, corrupt=CORRUPT, target=" Paris", distractor=" the")
    ex.head_measure("ablation")              # computed before the export, so the page carries it
    path = lv.export_html(ex, tmp_path / "pair.html")
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    errors = []
    ctx.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "blob:", "data:"))
              else route.abort())
    page = ctx.new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    expect(page.locator("body[data-ready='1']")).to_have_count(1)
    expect(page.locator(".lv-clean-strip .lv-pair-token")).to_have_count(20)
    expect(page.locator(".lv-norm-grid")).to_have_attribute("data-measure", "dla")
    page.locator(".lv-head-measure").select_option("ablation")
    expect(page.locator(".lv-norm-grid")).to_have_attribute("data-measure", "ablation")
    page.locator('.lv-tab[data-tab="patching"]').click()
    expect(page.locator(".lv-sweep-grid .lv-sweep-cell")).to_have_count(3 * 20)
    page.locator(".lv-sweep-site").select_option("head")
    expect(page.locator(".lv-sweep-grid .lv-sweep-cell")).to_have_count(3 * 4)
    page.screenshot(path=str(artifacts / "pairs-export.png"), full_page=True)
    assert errors == []
    ctx.close()


LONG_CELLS = [
    f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport torch, lensviz as lv\nfrom transformers import AutoModelForCausalLM\n"
    "from tests import models\nfrom tests.conftest import PROMPT\n"
    "cfg = models.config('llama'); cfg.max_position_embeddings = 256\ntorch.manual_seed(0)\n"
    "lens = lv.Lens(AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval(), models.tokenizer())\n"
    "CLEAN = ' '.join([PROMPT] * 6)\nCORRUPT = ' '.join([PROMPT] * 5 + [PROMPT.replace(' France', ' Paris')])",
    "ex = lv.Explorer(lens, CLEAN, corrupt=CORRUPT, target=' Paris', tab='patching')\nex",
]


def test_long_pair_heatmap_draws_only_the_columns_in_view(tmp_path, lab, page, artifacts):
    """At T >= 96 the patching heatmap is windowed like the logit-lens grid: a scroll to the far right
    draws the last columns with Python's values, End / Home move the focused cell to the last / first
    position and bring it into view."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = models.config("llama")
    cfg.max_position_embeddings = 256
    torch.manual_seed(0)
    lens = lv.Lens(AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval(), models.tokenizer())
    clean = " ".join([PROMPT] * 6)
    corrupt = " ".join([PROMPT] * 5 + [PROMPT.replace(" France", " Paris")])
    ref = lens.patching_sweep(clean, corrupt, target=" Paris", site="post", method="attribution").effect
    n_layers, t = ref.shape
    assert t >= 96
    write_notebook(tmp_path / "long.ipynb", LONG_CELLS)
    server = lab(tmp_path)
    open_notebook(page, server, "long.ipynb")
    run_all(page)
    ex = page.locator(".lv-explorer").first
    sweep = ex.locator(".lv-sweep-grid")
    expect(sweep).to_have_attribute("data-site", "post", timeout=60_000)
    expect(sweep).to_have_class("lv-sweep-grid lv-windowed")
    drawn = sweep.locator(".lv-sweep-cell").count()
    assert 0 < drawn < n_layers * t
    assert sweep.get_attribute("data-columns").startswith("0-")
    ex.locator(".lv-sweep-wrap").evaluate("el => { el.scrollLeft = el.scrollWidth; }")
    expect(ex.locator(".lv-sweep-grid")).to_have_attribute("data-columns", re.compile(rf"^\d+-{t}$"))
    got = by_cell(ex.locator(".lv-sweep-grid"), "col")
    assert (n_layers - 1, t - 1) in got and (0, 0) not in got
    assert all(v == pytest.approx(float(ref[la, c]), rel=1e-4, abs=1e-6) for (la, c), v in got.items())
    label = ex.locator('.lv-sweep-grid th[role="rowheader"]').first     # the layer labels stay in view
    box, wrap = label.bounding_box(), ex.locator(".lv-sweep-wrap").bounding_box()
    assert wrap["x"] - 1 <= box["x"] <= wrap["x"] + 4, (box, wrap)
    ex.screenshot(path=str(artifacts / "pairs-long-right.png"))
    # keyboard: Home goes to position 0 and scrolls it into view, End back to the last one
    ex.locator(f'.lv-sweep-cell[data-layer="{n_layers - 1}"][data-col="{t - 1}"]').focus()
    page.keyboard.press("Home")
    expect(ex.locator(".lv-sweep-grid td:focus")).to_have_attribute("data-col", "0")
    expect(ex.locator(".lv-sweep-grid")).to_have_attribute("data-columns", re.compile(r"^0-\d+$"))
    page.keyboard.press("End")
    expect(ex.locator(".lv-sweep-grid td:focus")).to_have_attribute("data-col", str(t - 1))
    page.keyboard.press("Enter")
    expect(ex.locator('.lv-patch-chip[data-type="activation"]')).to_contain_text(f"post L{n_layers - 1} @{t - 1}")
    assert page.offsite == []


NORM_CELLS = [
    f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport torch, lensviz as lv\nfrom transformers import AutoModelForCausalLM\n"
    "from tests import models\nfrom tests.conftest import PROMPT\n"
    "cfg = models.config('llama'); cfg.max_position_embeddings = 512\ntorch.manual_seed(0)\n"
    "lens = lv.Lens(AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval(), models.tokenizer())",
    "ex = lv.Explorer(lens, ' '.join([PROMPT] * 15), target=' Paris')\nex",
]


def test_long_prompt_head_norms_arrive_when_the_reversed_tab_opens(tmp_path, lab, page):
    """Past 256 tokens the head norms are not in the state: the Reversed tab asks for them and its grid
    shows Python's ||RA|| per head."""
    import torch
    from transformers import AutoModelForCausalLM

    from lensviz.lenses.reversed import head_norms

    cfg = models.config("llama")
    cfg.max_position_embeddings = 512
    torch.manual_seed(0)
    lens = lv.Lens(AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval(), models.tokenizer())
    tr = lens.trace(" ".join([PROMPT] * 15), target=" Paris")
    assert len(tr) > 256
    ra = head_norms(tr, "reversed")
    write_notebook(tmp_path / "norms.ipynb", NORM_CELLS)
    server = lab(tmp_path)
    open_notebook(page, server, "norms.ipynb")
    run_all(page)
    ex = page.locator(".lv-explorer").first
    expect(ex.locator(".lv-map-forward")).to_be_visible(timeout=60_000)
    ex.locator('.lv-tab[data-tab="reversed"]').click()
    grid = ex.locator('.lv-norm-grid[data-measure="ra"]')
    expect(grid.locator(".lv-norm-cell")).to_have_count(lens.n_layers * lens.n_heads, timeout=60_000)
    got = grid.locator(".lv-norm-cell").evaluate_all(
        "els => els.map(e => [Number(e.dataset.layer), Number(e.dataset.head), Number(e.dataset.value)])")
    assert all(v == pytest.approx(float(ra[la, h]), rel=1e-4) for la, h, v in got)
    expect(ex.locator(".lv-norms-loading")).to_have_count(0)
    assert page.offsite == []
