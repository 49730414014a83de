"""bertviz interop: to_bertviz output is accepted by bertviz's head_view and model_view, and the HTML they
return carries the forward / Reversed Attention values (parsed back from the embedded params JSON)."""
from __future__ import annotations

import json

import pytest
import torch

bertviz = pytest.importorskip("bertviz")

import lensviz as lv  # noqa: E402
from lensviz.interop.bertviz import to_bertviz  # noqa: E402
from tests import models  # noqa: E402

PROMPT = "I like Italy and France. I visited the city of"


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def trace(request):
    lens = lv.Lens(models.build(request.param), models.tokenizer())
    return lens.trace(PROMPT, target=" Florence")


def params_of(html: str) -> dict:
    """The params object bertviz substitutes into its script (`const params = {...};`)."""
    start = html.index("const params = ") + len("const params = ")
    return json.JSONDecoder().raw_decode(html, start)[0]


def test_shapes_and_layers(trace):
    bv = to_bertviz(trace)
    assert set(bv) == {"attention", "tokens", "include_layers"}
    assert bv.include_layers == list(range(trace.n_layers)) and bv.tokens == trace.tokens
    t, h = len(trace), trace.dims.n_heads
    assert len(bv.attention) == trace.n_layers
    for layer, a in enumerate(bv.attention):
        assert a.shape == (1, h, t, t)
        assert torch.equal(a[0], trace.attention(layer))
    sub = to_bertviz(trace, "reversed", layers=[-1, 0])
    assert sub.include_layers == [0, trace.n_layers - 1]
    assert len(sub.attention) == trace.n_layers  # real layer indices; unselected layers are placeholders
    assert all(float(a.abs().max()) == 0 for i, a in enumerate(sub.attention) if i not in sub.include_layers)


def test_reversed_scales(trace):
    layer = trace.n_layers - 1
    ra = trace.reversed_attention(layer)
    head = to_bertviz(trace, "reversed", layers=layer).attention[layer][0]
    assert head.min() >= 0 and torch.allclose(head.flatten(1).amax(1)[ra.flatten(1).abs().amax(1) > 0],
                                              torch.ones((), dtype=head.dtype))
    assert torch.allclose(head * ra.abs().flatten(1).amax(1)[:, None, None], ra.abs())
    whole = to_bertviz(trace, "reversed", layers=layer, scale="layer").attention[layer][0]
    assert torch.allclose(whole, ra.abs() / ra.abs().max())
    every = to_bertviz(trace, "reversed", scale="all")
    top = max(float(trace.reversed_attention(i).abs().max()) for i in range(trace.n_layers))
    assert float(max(a.max() for a in every.attention)) == pytest.approx(1.0)
    assert torch.allclose(every.attention[layer][0], ra.abs() / top)
    raw = to_bertviz(trace, "reversed", layers=layer, scale=None).attention[layer][0]
    assert torch.equal(raw, ra)


def test_bad_input(trace):
    with pytest.raises(lv.LensvizError):
        to_bertviz(trace, "backward")
    with pytest.raises(lv.LensvizError):
        to_bertviz(trace, "reversed", scale="row")
    with pytest.raises(lv.LensvizError):
        to_bertviz(trace, layers=[trace.n_layers])
    with pytest.raises(lv.LensvizError):
        to_bertviz(trace, layers=[])


def test_head_view_html_carries_reversed_attention(trace):
    from bertviz import head_view

    layer = trace.n_layers - 1
    bv = to_bertviz(trace, "reversed", layers=[0, layer])
    html = head_view(**bv, html_action="return")
    assert "<script" in html.data and "bertviz-" in html.data
    params = params_of(html.data)
    assert params["include_layers"] == [0, layer]
    attn = params["attention"][0]["attn"]  # [layers shown, H, T, T]
    assert len(attn) == 2 and params["attention"][0]["left_text"] == trace.tokens
    ra = trace.reversed_attention(layer)
    expected = ra.abs() / ra.abs().flatten(1).amax(1)[:, None, None]
    h = 1
    i, j = divmod(int(ra[h].abs().argmax()), ra.shape[-1])   # head 1's strongest entry
    assert round(attn[1][h][i][j], 6) == round(float(expected[h, i, j]), 6) == 1.0
    assert torch.allclose(torch.tensor(attn[1], dtype=expected.dtype), expected)
    # a known entry's rounded value appears in the embedded JSON text itself
    value = float(expected[0, -1].sort(descending=True).values[1])  # head 0's second strongest entry
    assert 0 < value < 1 and json.dumps(value) in html.data  # the JSON number, digit for digit


def test_signed_values_reach_the_html(trace):
    from bertviz import head_view

    layer = trace.n_layers - 1
    html = head_view(**to_bertviz(trace, "reversed", layers=layer, scale=None), html_action="return")
    attn = params_of(html.data)["attention"][0]["attn"][0]
    ra = trace.reversed_attention(layer)
    assert torch.allclose(torch.tensor(attn, dtype=ra.dtype), ra)
    assert min(min(min(row) for row in head) for head in attn) < 0  # the signed RA, negatives included


def test_model_view_forward(trace):
    from bertviz import model_view

    bv = to_bertviz(trace, "forward", layers=[1, 2])
    html = model_view(**bv, html_action="return")
    params = params_of(html.data)
    assert params["include_layers"] == [1, 2] and params["include_heads"] == list(range(trace.dims.n_heads))
    attn = params["attention"][0]["attn"]
    assert torch.allclose(torch.tensor(attn[0], dtype=torch.float64), trace.attention(1).double())
    html_ra = model_view(**to_bertviz(trace, "reversed"), html_action="return")
    assert len(params_of(html_ra.data)["attention"][0]["attn"]) == trace.n_layers


def test_tokens_cannot_close_the_script():
    lens = lv.Lens(models.build("gpt2"), models.tokenizer())
    tr = lens.trace("a </script> b\nc", target=" the")
    bv = to_bertviz(tr)
    assert all("</" not in t and "\n" not in t for t in bv.tokens)
    from bertviz import head_view

    html = head_view(**bv, html_action="return").data
    assert html.count("</script>") == html.count("<script")
