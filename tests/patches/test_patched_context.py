"""`with lens.patched(...)`: plain model calls run patched inside, and nothing remains after."""
from __future__ import annotations

import pytest
import torch

import lensviz as lv
from tests import models
from tests.conftest import PROMPT


@pytest.fixture(params=["gpt2", "llama"])
def lens(request, tiny_tokenizer):
    return lv.Lens(models.build(request.param), tiny_tokenizer)


def test_model_calls_inside_are_patched_and_restored(lens):
    ids = lens.encode(PROMPT)[0][None]
    with torch.no_grad():
        clean = lens.model(ids).logits
    patches = (lv.HeadAblation(1, [0, 2]), lv.NeuronPatch(0, [3], 0.0))
    traced = lens.trace(PROMPT, target=" Paris", patches=patches, backward=False)
    with lens.patched(*patches), torch.no_grad():
        inside = lens.model(ids).logits
        out = lens.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.allclose(inside[0], traced.logits, atol=1e-12)
    assert out.shape[1] == ids.shape[1] + 3
    with torch.no_grad():
        assert torch.equal(lens.model(ids).logits, clean)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lens.model.modules())


def test_self_patching_needs_a_base_and_maps_fit_one_length(lens):
    with pytest.raises(lv.LensvizError, match="base"):
        with lens.patched(lv.AttentionPatch(-1.0)):
            pass
    base = lens.trace(PROMPT, target=" Paris")
    ids = base.input_ids[None]
    with lens.patched(lv.AttentionPatch(-1.0), base=base), torch.no_grad():
        inside = lens.model(ids).logits[0]
        with pytest.raises(lv.LensvizError, match="one prompt length"):
            lens.model(ids[:, :5])
    ref = lens.trace(PROMPT, target=" Paris", patches=(lv.AttentionPatch(-1.0),), base=base, backward=False)
    assert torch.allclose(inside, ref.logits, atol=1e-12)
    with pytest.raises(lv.LensvizError, match="only inside"):
        with lens.patched(lv.SegmentMask()):
            pass
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lens.model.modules())
