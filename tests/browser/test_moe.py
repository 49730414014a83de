"""The Explorer on a mixture-of-experts model (tiny Mixtral) in JupyterLab, driven like a user: the neuron
view names each sub-update's expert, switching the strongest one off lists "L{l}E{e} #{n}" in the patch
panel and re-runs with the probability Python computes for NeuronPatch(expert=e), and the value search
answers with experts."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch
from playwright.sync_api import expect

import lensviz as lv
from harness.browser import open_notebook, run_all, write_notebook
from tests import models
from tests.conftest import PROMPT
from tests.test_conformance import build

pytestmark = pytest.mark.browser
REPO = str(pathlib.Path(__file__).resolve().parents[2])
CELLS = [
    f"import sys\nsys.path.insert(0, {REPO!r})\nimport lensviz as lv\nfrom tests import models\n"
    "from tests.test_conformance import build\nlens = lv.Lens(build('mixtral'), models.tokenizer())",
    f"ex = lv.Explorer(lens, {PROMPT!r}, target=' Paris')\nex",
]


def test_moe_neuron_view_and_toggle(tmp_path, lab, page, artifacts):
    write_notebook(tmp_path / "moe.ipynb", CELLS)
    server = lab(tmp_path)
    open_notebook(page, server, "moe.ipynb")
    run_all(page)
    ex = page.locator(".lv-explorer").first
    expect(ex.locator(".lv-map-forward")).to_be_visible()
    ex.locator('.lv-tab[data-tab="neurons"]').click()
    row = ex.locator(".lv-neuron-table .lv-neuron").first
    expect(row).to_be_visible()
    expert, neuron = int(row.get_attribute("data-expert")), int(row.get_attribute("data-neuron"))
    layer = 2                                      # the selected layer: the last one (3 layers)
    expect(row.locator("td").first).to_have_text(f"L{layer}E{expert} #{neuron}")
    row.locator(".lv-toggle").click()
    expect(ex.locator('.lv-patch-chip[data-type="neuron"]')).to_contain_text(f"L{layer}E{expert} #{neuron}")
    expect(ex.locator(".lv-patched-prob")).to_be_visible()

    lens = lv.Lens(build("mixtral"), models.tokenizer())
    tr = lens.trace(PROMPT, target=" Paris", patches=(lv.NeuronPatch(layer, [neuron], 0.0, expert=expert),))
    want = float(torch.softmax(tr.logits[-1].double(), -1)[tr.target_id])
    assert float(ex.locator(".lv-patched-prob").get_attribute("data-prob")) == pytest.approx(want, rel=1e-6)
    expect(ex.locator(f'.lv-neuron[data-expert="{expert}"] .lv-toggle[data-neuron="{neuron}"]')).to_have_class(
        "lv-toggle lv-active")

    ex.locator(".lv-search").fill(" Paris")
    ex.locator(".lv-search").press("Enter")
    expect(ex.locator(".lv-hit").first).to_be_visible()
    assert re.fullmatch(r"L\d+E\d+ #\d+", ex.locator(".lv-hit .lv-chip").first.inner_text())
    ex.screenshot(path=str(artifacts / "moe-neurons.png"))


def test_moe_flow_graph_renders_the_routed_experts(tmp_path, lab, page, artifacts):
    """The flow tab draws the VISIT graph on MoE: its MLP value nodes are routed experts' neurons, named
    "L{l}E{e} #{n}" in their hover text, and they are the ones Python's visit graph picks."""
    from lensviz.views import payload

    write_notebook(tmp_path / "moe_flow.ipynb", CELLS)
    server = lab(tmp_path)
    open_notebook(page, server, "moe_flow.ipynb")
    run_all(page)
    ex = page.locator(".lv-explorer").first
    expect(ex.locator(".lv-map-forward")).to_be_visible()
    ex.locator('.lv-tab[data-tab="flow"]').click()
    nodes = ex.locator("svg.lv-flow .lv-node-mlp_value")
    expect(nodes.first).to_be_visible()
    lens = lv.Lens(build("mixtral"), models.tokenizer())
    tr = lens.trace(PROMPT, target=" Paris")
    layer = 2  # the selected layer: the last one, at the last position
    want = [n for n in payload.flow_graph(tr, len(tr) - 1, [layer])["nodes"] if n["kind"] == "mlp_value"]
    assert nodes.count() == len(want) == 9
    got = sorted((int(nodes.nth(i).get_attribute("data-expert")), nodes.nth(i).get_attribute("data-id"))
                 for i in range(nodes.count()))
    assert got == sorted((n["expert"], n["id"]) for n in want)
    assert {e for e, _ in got} <= set(tr.router(layer)[0][-1].tolist())
    title = nodes.first.locator("title").text_content()
    assert re.match(rf"mlp_value L{layer}E\d+ #\d+ ", title)
    ex.screenshot(path=str(artifacts / "moe-flow.png"))
