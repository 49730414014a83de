"""Reversed Attention summaries against direct computation from the per-layer maps."""
from __future__ import annotations

import pytest
import torch

import lensviz as lv
from lensviz.lenses import reversed as rev
from tests.conftest import PROMPT


def test_head_norms_and_ranking(tiny):
    tr = tiny.trace(PROMPT, target=" Paris")
    norms = rev.head_norms(tr)
    assert norms.shape == (tiny.n_layers, tiny.n_heads)
    for layer in range(tiny.n_layers):
        for h in range(tiny.n_heads):
            assert float(norms[layer, h]) == pytest.approx(float(torch.linalg.matrix_norm(tr.reversed_attention(layer)[h])), rel=1e-12)
    fwd = rev.head_norms(tr, "forward", layers=[0])
    assert torch.allclose(fwd[0], torch.linalg.matrix_norm(tr.attention(0)))
    ranked = rev.rank_heads(tr, top=3)
    assert [r.score for r in ranked] == sorted([r.score for r in ranked], reverse=True)
    assert ranked[0].score == pytest.approx(float(norms.max()))
    assert float(norms[ranked[0].layer, ranked[0].head]) == pytest.approx(ranked[0].score)


def test_compare_gives_both_maps_and_consistent_numbers(tiny):
    tr = tiny.trace(PROMPT, target=" Paris")
    c = rev.compare(tr, 1, -1)
    assert c["head"] == tiny.n_heads - 1
    assert torch.equal(c["forward"], tr.attention(1)[-1])
    assert torch.equal(c["reversed"], tr.reversed_attention(1)[-1])
    assert 0 < c["reversed_top10_share"] <= 1 and 0 < c["forward_top10_share"] <= 1
    assert c["reversed_norm"] == pytest.approx(float(c["reversed"].norm()))
    with pytest.raises(lv.LensvizError, match="head"):
        rev.compare(tr, 0, tiny.n_heads)


def test_average_over_equal_length_prompts(tiny):
    prompts = ["I visited the city of", "I visited the city of"]
    a = tiny.trace(prompts[0], target=" Paris", target_mode="first").reversed_attention(2)
    b = tiny.trace(prompts[1], target=" Tokyo", target_mode="first").reversed_attention(2)
    avg = rev.average_reversed_attention(tiny, prompts, [" Paris", " Tokyo"], layers=[2])
    assert list(avg) == [2]
    assert torch.allclose(avg[2], (a + b) / 2, atol=1e-15)
    with pytest.raises(lv.LensvizError, match="one token length"):
        rev.average_reversed_attention(tiny, ["I visited", "I visited the city of"], " Paris")
    with pytest.raises(lv.LensvizError, match="targets"):
        rev.average_reversed_attention(tiny, prompts, [" Paris"])
