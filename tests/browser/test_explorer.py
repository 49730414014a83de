"""The Explorer driven like a user in JupyterLab (and Notebook 7): every view renders, a click on a
token moves the logit-lens column and the attention row, the eta slider re-runs the model and the DOM
shows the probability Python computes, a neuron toggle shows its diff, XSS payloads stay inert, and
no request leaves 127.0.0.1."""
from __future__ import annotations

import pathlib

import pytest
import torch
from playwright.sync_api import expect

import lensviz as lv
from tests import models
from harness.browser import open_notebook, run_all, write_notebook
from tests.conftest import PROMPT

XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> of'
REPO = str(pathlib.Path(__file__).resolve().parents[2])
CELLS = [
    f"import sys\nsys.path.insert(0, {REPO!r})\nimport lensviz as lv\nfrom tests import models\n"
    "lens = lv.Lens(models.build('llama'), models.tokenizer())",
    f"ex = lv.Explorer(lens, {PROMPT!r}, target=' Paris')\nex",
    f"lv.Explorer(lens, {XSS!r}, target=' Paris')",
]


def expected_prob(eta: float) -> float:
    lens = lv.Lens(models.build("llama"), models.tokenizer())
    tr = lens.trace(PROMPT, target=" Paris", patches=(lv.AttentionPatch(eta),) if eta else ())
    return float(torch.softmax(tr.logits[-1].double(), -1)[tr.target_id])


def test_explorer_in_jupyterlab(tmp_path, lab, page, artifacts):
    write_notebook(tmp_path / "explorer.ipynb", CELLS)
    server = lab(tmp_path)
    open_notebook(page, server, "explorer.ipynb")
    run_all(page)
    ex = page.locator(".lv-explorer").first
    expect(ex).to_be_visible()
    n_tokens = len(lv.Lens(models.build("llama"), models.tokenizer()).encode(PROMPT)[0])
    expect(ex.locator(".lv-token")).to_have_count(n_tokens)
    expect(ex.locator(".lv-grid .lv-cell")).to_have_count(3 * n_tokens)
    expect(ex.locator(".lv-map-forward")).to_be_visible()
    expect(ex.locator(".lv-norm-cell")).to_have_count(3 * 4)
    expect(ex.locator(".lv-thumb")).to_have_count(4)
    base = expected_prob(0.0)
    assert float(ex.locator(".lv-target-prob").get_attribute("data-prob")) == pytest.approx(base, rel=1e-6)
    page.screenshot(path=str(artifacts / "explorer-lab.png"), full_page=True)

    # one click selects everywhere: token 3 -> logit-lens column and the attention query row
    ex.locator(".lv-token").nth(3).click()
    expect(ex.locator(".lv-token.lv-selected")).to_have_attribute("data-pos", "3")
    expect(ex.locator(".lv-cell.lv-colsel").first).to_have_attribute("data-pos", "3")
    expect(ex.locator(".lv-cell.lv-colsel")).to_have_count(3)
    expect(ex.locator(".lv-fig figcaption").first).to_contain_text("row = query 3")
    # a grid cell selects layer and position; a norm cell selects the head
    ex.locator('.lv-cell[data-layer="1"][data-pos="5"]').click()
    expect(ex.locator(".lv-token.lv-selected")).to_have_attribute("data-pos", "5")
    ex.locator('.lv-norm-cell[data-layer="1"][data-head="2"]').click()
    expect(ex.locator(".lv-map-forward")).to_have_attribute("data-head", "2")
    expect(ex.locator(".lv-map-forward")).to_have_attribute("data-layer", "1")
    # hover a cell: top-k from the kernel
    ex.locator('.lv-cell[data-layer="2"][data-pos="4"]').hover()
    expect(ex.locator(".lv-tip .lv-bar-row")).to_have_count(10)

    # Reversed tab draws the diverging map
    ex.locator('.lv-tab[data-tab="reversed"]').click()
    expect(ex.locator(".lv-map-reversed")).to_be_visible()
    ex.locator(".lv-side-by-side").check()
    expect(ex.locator(".lv-map-forward")).to_be_visible()
    page.screenshot(path=str(artifacts / "explorer-reversed.png"), full_page=True)

    # the eta slider re-runs the model; the DOM shows what Python computes
    ex.locator('.lv-tab[data-tab="attention"]').click()
    slider = ex.locator(".lv-eta")
    slider.fill("-5")
    patched = ex.locator(".lv-patched-prob")
    expect(patched).to_be_visible()
    assert float(patched.get_attribute("data-prob")) == pytest.approx(expected_prob(-5.0), rel=1e-6)
    expect(ex.locator('.lv-patch-chip[data-type="attention"]')).to_contain_text("η=-5")
    page.screenshot(path=str(artifacts / "explorer-patched.png"), full_page=True)

    # Neurons: toggle the strongest sub-update off, see it listed and the diff change
    ex.locator(".lv-reset").click()
    expect(ex.locator(".lv-patched-prob")).to_have_count(0)
    ex.locator('.lv-tab[data-tab="neurons"]').click()
    first = ex.locator(".lv-neuron-table .lv-toggle").first
    expect(first).to_be_visible()
    neuron = first.get_attribute("data-neuron")
    first.click()
    expect(ex.locator('.lv-patch-chip[data-type="neuron"]')).to_contain_text(f"#{neuron}")
    expect(ex.locator(".lv-patched-prob")).to_be_visible()
    expect(ex.locator(f'.lv-toggle[data-neuron="{neuron}"]')).to_have_class("lv-toggle lv-active")
    page.screenshot(path=str(artifacts / "explorer-neurons.png"), full_page=True)

    # Backward Lens and flow graph render from the kernel's data
    ex.locator('.lv-tab[data-tab="backward"]').click()
    expect(ex.locator(".lv-bl-ff2 .lv-bl-cell")).to_have_count(3 * n_tokens)
    ex.locator('.lv-tab[data-tab="flow"]').click()
    expect(ex.locator("svg.lv-flow .lv-node").first).to_be_visible()
    page.screenshot(path=str(artifacts / "explorer-flow.png"), full_page=True)

    # XSS payloads in token text render inert, as text
    xss = page.locator(".lv-explorer").nth(1)
    expect(xss.locator(".lv-token").first).to_be_visible()
    assert page.evaluate("window.__xss") is None
    assert xss.locator("img").count() == 0 and xss.locator("script").count() == 0
    assert "<" in "".join(xss.locator(".lv-token").all_text_contents())
    assert page.offsite == []


def test_explorer_in_notebook7(tmp_path, lab, page, artifacts):
    write_notebook(tmp_path / "explorer.ipynb", CELLS[:2])
    server = lab(tmp_path, app="notebook")
    open_notebook(page, server, "explorer.ipynb")
    run_all(page)
    ex = page.locator(".lv-explorer").first
    expect(ex.locator(".lv-map-forward")).to_be_visible()
    ex.locator(".lv-token").nth(2).click()
    expect(ex.locator(".lv-cell.lv-colsel").first).to_have_attribute("data-pos", "2")
    page.screenshot(path=str(artifacts / "explorer-notebook7.png"), full_page=True)
    assert page.offsite == []
