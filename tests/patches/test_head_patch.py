"""HeadPatch: copying heads' outputs O_h from a source trace. Oracle: with every head of layer l copied,
the attention output is the source's, so resid mid(l) = pre(l) of this run + (mid(l) - pre(l)) of the
source; with one head, the sweep's exact head cell is this patch's effect on the metric."""
from __future__ import annotations

import pytest
import torch

import lensviz as lv
from tests.conftest import PROMPT

CORRUPT = PROMPT.replace(" France", " Paris")


def test_all_heads_copied_give_the_source_attention_output(tiny):
    lens = tiny
    clean = lens.trace(PROMPT, target=" Paris", backward=False)
    layer = 1
    patched = lens.trace(CORRUPT, target=" Paris", patches=(lv.HeadPatch(clean, layer, list(range(lens.n_heads))),),
                         backward=False)
    corrupt = lens.trace(CORRUPT, target=" Paris", backward=False)
    assert torch.equal(patched.resid(layer, "pre"), corrupt.resid(layer, "pre"))   # nothing below changes
    want = corrupt.resid(layer, "pre").double() + (clean.resid(layer, "mid") - clean.resid(layer, "pre")).double()
    assert torch.allclose(patched.resid(layer, "mid").double(), want, atol=1e-9)
    assert torch.allclose(patched.head_values(layer), clean.head_values(layer), atol=0)


def test_one_head_is_the_exact_sweep_cell(tiny):
    lens = tiny
    sw = lens.patching_sweep(PROMPT, CORRUPT, target=" Paris", site="head", method="exact")
    tr = lens.trace(CORRUPT, target=" Paris", patches=(lv.HeadPatch(sw.clean, 2, [1]),), backward=False)
    assert tr.metric - sw.metric_corrupt == pytest.approx(float(sw.effect[2, 1]), abs=1e-9)


def test_bad_head_patches_are_refused(tiny):
    lens = tiny
    clean = lens.trace(PROMPT, target=" Paris", backward=False)
    for patch, match in ((lv.HeadPatch(clean, 9, [0]), "layer"), (lv.HeadPatch(clean, 0, [99]), "head"),
                         (lv.HeadPatch(clean, 0, None), "heads"), (lv.HeadPatch("clean", 0, [0]), "source")):
        with pytest.raises(lv.LensvizError, match=match):
            lens.trace(CORRUPT, target=" Paris", patches=(patch,))
    with pytest.raises(lv.LensvizError, match="same token length"):
        lens.trace("I visited the city of", target=" Paris", patches=(lv.HeadPatch(clean, 0, [0]),))
