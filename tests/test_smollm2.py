"""The real embedded model (SmolLM2-135M-Instruct, Llama family with GQA, float32): capture agrees
with the plain model and with autograd at float32 tolerances (research §5)."""
from __future__ import annotations

import pytest
import torch

from tests import oracle
from tests.conftest import PROMPT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def florence(smol):
    return smol.trace(PROMPT, target=" Florence")


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_embedded_model_traces_the_florence_prompt(smol, florence):
    assert smol.arch == "llama" and (smol.n_layers, smol.n_heads, smol.n_kv_heads) == (30, 9, 3)
    assert florence.tokens[-3:] == [" the", " city", " of"]
    assert florence.target == " Florence"
    assert florence.loss == pytest.approx(3.056, abs=0.01)  # research §1.7: eta = 0 -> 3.056


def test_logits_equal_the_plain_model(smol, florence):
    with torch.no_grad():
        plain = smol.model(florence.input_ids[None]).logits[0]
    assert torch.allclose(florence.logits, plain, atol=1e-4, rtol=1e-5)
    assert torch.equal(florence.logits.argmax(-1), plain.argmax(-1))


def test_reversed_attention_equals_autograd_in_float32(smol, florence):
    ref = oracle.run(smol.model, florence.input_ids, florence.target_id)
    assert florence.loss == pytest.approx(ref["loss"], rel=1e-5)
    worst = max(rel(florence.reversed_attention(layer), ref["S"][layer].grad[0]) for layer in range(smol.n_layers))
    assert worst < 1e-4  # research §5 row 2: rel 1e-4 in float32
    for layer in (0, 15, 29):
        ra = florence.reversed_attention(layer)
        assert float(ra.sum(-1).abs().max()) <= 1e-6 * max(float(ra.abs().max()), 1e-30) * len(florence)
        assert torch.all(ra.triu(1) == 0)
        assert rel(florence.resid_grad(layer, "pre"), ref["hidden"][layer].grad[0]) < 1e-4


def test_top_reversed_attention_heads_match_the_reference_run(smol, florence):
    """Soft fixture from research §5: the top-2 heads by ||RA||_F are L23H4 and L23H3."""
    norms = torch.stack([florence.reversed_attention(layer).flatten(1).norm(dim=1) for layer in range(smol.n_layers)])
    top = [divmod(int(i), smol.n_heads) for i in norms.flatten().topk(2).indices]
    assert top == [(23, 4), (23, 3)]


def test_last_layer_gradient_lives_only_at_the_loss_position(smol, florence):  # research §5 row 12
    assert torch.all(florence.mlp_output_grad(-1)[:-1] == 0)
    assert torch.all(florence.reversed_attention(-1)[:, :-1] == 0)
    assert float(florence.mlp_output_grad(-1)[-1].norm()) > 0
