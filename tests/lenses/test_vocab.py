"""Vocabulary projection against the plain math softmax(W_U N_f(v)), on several families."""
from __future__ import annotations

import pytest
import torch

import lensviz as lv
from lensviz import vocab
from tests import models
from tests.conftest import PROMPT


def full_probs(lens, v):
    """softmax(W_U N_f(v)) by the module calls, in the model's dtype (float32 for half models)."""
    with torch.no_grad():
        logits = lens.unembed_module(lens.final_norm_module(v))
        return torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1)


def test_project_equals_plain_softmax_topk_and_rank(tiny):
    tr = tiny.trace(PROMPT, target=" Paris")
    v = torch.stack([tr.resid(layer, "mid") for layer in range(tiny.n_layers)])  # [L, T, D]
    got = tiny.project(v, k=5, target=" Paris")
    p = full_probs(tiny, v)
    top = p.topk(5, dim=-1)
    assert got.ids.shape == (tiny.n_layers, len(tr), 5)
    assert torch.equal(got.ids, top.indices)
    assert torch.allclose(got.probs.double(), top.values, atol=1e-6) and got.probs.dtype == torch.float32
    tid = tr.target_id
    assert torch.equal(got.target_rank, (p > p[..., tid:tid + 1]).sum(-1))
    assert got.tokens[0][0] == [tiny.tokenizer.decode([i]) for i in top.indices[0, 0].tolist()]


def test_bottom_and_normalize(tiny):
    tr = tiny.trace(PROMPT, target=" Paris")
    g = tr.mlp_output_grad(0)
    p = full_probs(tiny, g)
    bottom = tiny.project(g, k=3, bottom=True)
    assert torch.equal(bottom.ids, p.topk(3, dim=-1, largest=False).indices)
    unit = g / g.norm(dim=-1, keepdim=True)
    normed = tiny.project(g, k=3, normalize=True)
    assert torch.equal(normed.ids, full_probs(tiny, unit).topk(3, dim=-1).indices)


def test_last_layer_logit_lens_is_the_models_prediction(tiny):
    tr = tiny.trace(PROMPT)
    ll = tr.logit_lens(k=3)
    assert ll.ids.shape == (tiny.n_layers, len(tr), 3)
    assert torch.equal(ll.ids[-1, :, 0], tr.logits.argmax(-1))
    assert torch.all(ll.target_rank[-1, -1] == 0)  # target None = the model's own top-1
    assert torch.allclose(ll.probs[-1, :, 0], torch.softmax(tr.logits.float(), -1).max(-1).values, atol=1e-6)


def test_three_sites_project_their_own_residuals(tiny):
    tr = tiny.trace(PROMPT, target=" Paris")
    for site in ("pre", "mid", "post"):
        ll = tr.logit_lens(k=2, site=site)
        direct = tiny.project(tr.resid(1, site), k=2)
        assert torch.equal(ll.ids[1], direct.ids)


def test_chunking_does_not_change_results(tiny, monkeypatch):
    tr = tiny.trace(PROMPT, target=" Paris")
    whole = tr.logit_lens(k=4)
    monkeypatch.setattr(vocab, "CHUNK_BYTES", 8 * tiny.vocab_size * 3)  # three rows per chunk (float64)
    chunked = tr.logit_lens(k=4)
    monkeypatch.setattr(vocab, "BLOCK_BYTES", 4 * tiny.vocab_size * 2)  # and two rows per post-matmul block
    blocked = tr.logit_lens(k=4)
    for other in (chunked, blocked):
        assert torch.equal(whole.ids, other.ids) and torch.equal(whole.target_rank, other.target_rank)
        assert torch.equal(whole.probs, other.probs)
    assert whole.target_rank.dtype == torch.long


@pytest.mark.parametrize("group", [7, 8])  # 320 = 45 * 7 + 5 (a tail that fills no group) and 40 * 8
def test_two_stage_topk_equals_plain_topk(tiny, monkeypatch, group):
    tr = tiny.trace(PROMPT, target=" Paris")
    v = torch.stack([tr.resid(layer, "mid") for layer in range(tiny.n_layers)])
    p = full_probs(tiny, v)
    monkeypatch.setattr(vocab, "TOPK_GROUP", group)
    for k in (1, 5, 20):
        for bottom in (False, True):
            got = tiny.project(v, k=k, target=" Paris", bottom=bottom)
            want = p.topk(k, dim=-1, largest=not bottom)
            assert torch.equal(got.ids, want.indices)
            assert torch.allclose(got.probs.double(), want.values, rtol=1e-6, atol=1e-30)
    monkeypatch.setattr(vocab, "BLOCK_BYTES", 4 * tiny.vocab_size * 3)  # the row-block edges change nothing
    assert torch.equal(tiny.project(v, k=5).ids, p.topk(5, dim=-1).indices)
    x = torch.randn(6, 1000, dtype=torch.float64)
    x[:, 990:] += 10  # the winners in the tail columns
    x[0, :64] = x[0, 0]  # ties inside a group: any of the tied columns, with the tied value
    for k in (3, 10):
        for largest in (True, False):
            idx = vocab.top_indices(x, k, largest=largest)
            want = x.topk(k, dim=-1, largest=largest).values
            assert torch.equal(x.gather(1, idx), want) and all(len(set(row)) == k for row in idx.tolist())


class BiasedHead(torch.nn.Linear):
    """An unembedding that is not a plain nn.Linear (lensviz then calls the module itself)."""


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_unembedding_bias_and_custom_heads_follow_the_module(family, tiny_tokenizer):
    lens = lv.Lens(models.build(family), tiny_tokenizer)
    head = lens.unembed_module
    torch.manual_seed(1)
    head.bias = torch.nn.Parameter(torch.randn(head.out_features, dtype=head.weight.dtype))
    tr = lens.trace(PROMPT, target=" Paris")
    v = torch.stack([tr.resid(layer) for layer in range(lens.n_layers)])
    p = full_probs(lens, v)
    fast = lens.project(v, k=4, target=" Paris")  # plain Linear: matmul + bias into a reused buffer
    assert torch.equal(fast.ids, p.topk(4, dim=-1).indices)
    assert torch.allclose(fast.probs.double(), p.topk(4, dim=-1).values, atol=1e-6)
    tid = tr.target_id
    assert torch.equal(fast.target_rank, (p > p[..., tid:tid + 1]).sum(-1))
    head.__class__ = BiasedHead  # same weights, generic path
    generic = lens.project(v, k=4, target=" Paris")
    assert torch.equal(generic.ids, fast.ids) and torch.equal(generic.target_rank, fast.target_rank)
    assert torch.allclose(generic.probs, fast.probs, atol=1e-12)


def test_half_precision_models_rank_in_float32(tiny_tokenizer):
    lens = lv.Lens(models.build("llama", dtype=torch.bfloat16), tiny_tokenizer)
    tr = lens.trace(PROMPT, target=" Paris", backward=False)
    v = torch.stack([tr.resid(layer) for layer in range(lens.n_layers)])
    got = lens.project(v, k=3, target=" Paris")
    p = full_probs(lens, v)
    assert got.probs.dtype == torch.float32
    assert torch.equal(got.ids, p.topk(3, dim=-1).indices)
    assert torch.allclose(got.probs, p.topk(3, dim=-1).values, atol=1e-6)
    tid = tr.target_id
    assert torch.equal(got.target_rank, (p > p[..., tid:tid + 1]).sum(-1))


@pytest.mark.parametrize("family,odd", [("llama", True), ("gpt2", False)])
def test_rmsnorm_is_odd_layernorm_is_not(family, odd, tiny_tokenizer):  # research §5 row 15
    lens = lv.Lens(models.build(family), tiny_tokenizer)
    g = lens.trace(PROMPT, target=" Paris").mlp_output_grad(1)
    with torch.no_grad():
        pos = lens.unembed_module(lens.final_norm_module(g))
        neg = lens.unembed_module(lens.final_norm_module(-g))
    assert torch.allclose(neg, -pos, atol=1e-12) is odd


def test_bad_vectors_are_rejected(tiny):
    with pytest.raises(lv.LensvizError, match="d_model"):
        tiny.project(torch.zeros(3, tiny.d_model + 1))
    with pytest.raises(lv.LensvizError, match="torch.Tensor"):
        tiny.project([[0.0] * tiny.d_model])
    with pytest.raises(lv.LensvizError, match="k must be"):
        tiny.project(torch.zeros(tiny.d_model), k=0)
    with pytest.raises(lv.LensvizError, match="site"):
        tiny.trace(PROMPT).logit_lens(site="resid")
