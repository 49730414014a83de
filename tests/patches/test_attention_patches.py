"""Attention patching (research §1.7, §5 rows 18-20) and top-k attention (methods-2 §5.6)."""
from __future__ import annotations

import pytest
import torch

import lensviz as lv
from lensviz import attention
from lensviz.patches import topk_fidelity
from tests import models
from tests.conftest import PROMPT

FAMILIES = ("gpt2", "llama", "gpt_neox")


@pytest.fixture(params=FAMILIES)
def lens(request, tiny_tokenizer):
    return lv.Lens(models.build(request.param), tiny_tokenizer)


def test_eta_zero_reproduces_logits_bit_for_bit(lens):  # row 18
    base = lens.trace(PROMPT, target=" Paris")
    tr = lens.trace(PROMPT, target=" Paris", patches=(lv.AttentionPatch(0.0),))
    assert torch.equal(tr.logits, base.logits)


def test_patched_rows_sum_to_one_and_stay_causal(lens):  # row 19
    base = lens.trace(PROMPT, target=" Paris")
    tr = lens.trace(PROMPT, target=" Paris", patches=(lv.AttentionPatch(-3.0, heads=[0, 2]),), base=base)
    for layer in range(lens.n_layers):
        a = tr.attention(layer)
        assert torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-12)
        assert torch.all(a.triu(1) == 0)
        # the patched run's own softmax (equal to the base's in layer 0) plus eta * the base's RA on heads 0, 2
        softmax = tr._softmax(layer) if layer else base.attention(0)
        expect = softmax - 3.0 * base.reversed_attention(layer) * torch.tensor(
            [1.0, 0, 1.0, 0], dtype=a.dtype)[:, None, None]
        assert torch.allclose(a, expect, atol=1e-12)


def test_loss_derivative_in_eta_is_the_inner_product_with_ra(lens):  # row 20: central finite difference
    base = lens.trace(PROMPT, target=" Paris")
    eps = 1e-4
    up = lens.trace(PROMPT, target=" Paris", patches=(lv.AttentionPatch(eps),), base=base, backward=False).loss
    down = lens.trace(PROMPT, target=" Paris", patches=(lv.AttentionPatch(-eps),), base=base, backward=False).loss
    n_rep = lens.n_heads // lens.n_kv_heads
    inner = 0.0
    for layer in range(lens.n_layers):
        v = base.qkv(layer)[2].repeat_interleave(n_rep, dim=0)
        g = base.head_output_grad(layer) @ v.transpose(-1, -2)  # dL/dA
        inner += float((g * base.reversed_attention(layer)).sum())
    assert (up - down) / (2 * eps) == pytest.approx(inner, rel=1e-3)
    assert inner > 0  # a small negative eta lowers the loss to first order


def test_user_maps_and_layer_scope(lens):
    base = lens.trace(PROMPT, target=" Paris")
    t = len(base)
    maps = {1: torch.full((lens.n_heads, t, t), 0.0, dtype=torch.float64)}
    maps[1][:, :, 0] = 1.0
    maps[1][:, torch.arange(t), torch.arange(t)] -= 1.0  # move each row's mass from the diagonal to token 0
    tr = lens.trace(PROMPT, target=" Paris", patches=(lv.AttentionPatch(0.5, maps=maps),))
    assert torch.allclose(tr.attention(1), base.attention(1) + 0.5 * maps[1], atol=1e-12)
    assert torch.equal(tr.resid(1, "pre"), base.resid(1, "pre"))  # layers before the patch are untouched
    assert not torch.allclose(tr.resid(1, "mid"), base.resid(1, "mid"))
    with pytest.raises(lv.LensvizError, match="maps"):
        lens.trace(PROMPT, patches=(lv.AttentionPatch(0.5, maps={1: torch.zeros(2, 2)}),))


def test_reversed_attention_stays_the_score_gradient_under_topk(lens):
    """Under top-k, RA is still a softmax VJP: rows sum to 0 and dropped keys get exactly 0."""
    tr = lens.trace(PROMPT, target=" Paris", patches=(lv.TopKAttention(3),))
    for layer in range(lens.n_layers):
        ra = tr.reversed_attention(layer)
        assert float(ra.sum(-1).abs().max()) <= 1e-12 * max(float(ra.abs().max()), 1e-300)
        kept = tr.attention(layer) > 0
        assert torch.all(ra[~kept] == 0)


# --- top-k attention ----------------------------------------------------------------------------------
def test_explicit_path_equals_eager_and_chunking_does_not_matter(lens):  # §5.6 checks 1 and 6
    q = torch.randn(1, lens.n_heads, 9, lens.d_head, dtype=torch.float64)
    k = torch.randn(1, lens.n_kv_heads, 9, lens.d_head, dtype=torch.float64)
    v = torch.randn(1, lens.n_kv_heads, 9, lens.d_head, dtype=torch.float64)
    n_rep = lens.n_heads // lens.n_kv_heads
    kk, vv = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    scores = (q @ kk.transpose(-1, -2)) * 0.3
    scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    eager = torch.softmax(scores, -1) @ vv
    full = attention.explicit_attention(q, k, v, None, 0.3)
    assert torch.allclose(full, eager, atol=1e-12)
    top = attention.AttentionEdit(scores=[lambda s, rows: s.masked_fill(s < s.topk(2, -1).values[..., -1:], float("-inf"))])
    whole = attention.explicit_attention(q, k, v, None, 0.3, top)
    for chunk in (1, 2, 5, 9):
        assert torch.allclose(attention.explicit_attention(q, k, v, None, 0.3, chunk=chunk), full, atol=1e-15)
        assert torch.allclose(attention.explicit_attention(q, k, v, None, 0.3, top, chunk=chunk), whole, atol=1e-15)


def test_topk_rows_and_renormalisation(lens):  # §5.6 checks 2, 3, 4, 5
    base = lens.trace(PROMPT, target=" Paris")
    t = len(base)
    big = lens.trace(PROMPT, target=" Paris", patches=(lv.TopKAttention(t),))
    assert torch.allclose(big.logits, base.logits, atol=1e-12)
    k = 3
    tr = lens.trace(PROMPT, target=" Paris", patches=(lv.TopKAttention(k),))
    for layer in range(lens.n_layers):
        a_k, a = tr.attention(layer), tr._softmax(layer)
        assert torch.equal(a_k, a)
        nonzero = (a_k > 0).sum(-1)
        allowed = torch.arange(1, t + 1).clamp(max=k)
        assert torch.equal(nonzero, allowed.expand_as(nonzero))
        assert torch.allclose(a_k.sum(-1), torch.ones(lens.n_heads, t, dtype=a_k.dtype), atol=1e-12)
        # on the kept set, top-k probabilities are the exact ones divided by the retained mass rho,
        # with the exact probabilities of the same (patched-run) scores
        q, kk, v = tr.qkv(layer)
        n_rep = lens.n_heads // lens.n_kv_heads
        s = (q @ kk.repeat_interleave(n_rep, 0).transpose(-1, -2)) * tr.attention_scaling(layer)
        exact = torch.softmax(s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")), -1)
        kept = a_k > 0
        rho = (exact * kept).sum(-1, keepdim=True)
        assert torch.allclose(a_k[kept], (exact / rho)[kept], atol=1e-12)
        vv = v.repeat_interleave(n_rep, 0)
        # what the run computed (fused kernel with the kept keys as a boolean mask) is A_k V
        assert torch.allclose(tr.head_values(layer), a_k @ vv, atol=1e-12)
        err = ((a_k - exact) @ vv).norm(dim=-1)
        bound = 2 * (1 - rho[..., 0]) * vv.norm(dim=-1).max(dim=-1).values[:, None]
        assert torch.all(err <= bound + 1e-12)


def test_topk_key_selection_runs_as_a_mask_and_does_not_depend_on_chunks(lens):
    tr = lens.trace(PROMPT, target=" Paris", patches=(lv.TopKAttention(2),))
    edit = tr._edit(1)
    assert edit.keep and not edit.explicit  # the fused kernel runs, with a boolean mask
    q, k, _ = (x[None] for x in tr.qkv(1))
    whole = attention.keep_mask(q, k, None, tr.attention_scaling(1), edit.keep)
    assert whole.dtype == torch.bool and torch.equal(whole[0], tr.attention(1) > 0)
    for chunk in (1, 3):
        assert torch.equal(attention.keep_mask(q, k, None, tr.attention_scaling(1), edit.keep, chunk=chunk), whole)
    # the same selection on the explicit path (with a no-op score edit) gives the same run
    both = attention.AttentionEdit(keep=list(edit.keep), scores=[lambda s, rows: s])
    v = tr.qkv(1)[2][None]
    fused = tr.head_values(1)
    explicit = attention.explicit_attention(q, k, v, None, tr.attention_scaling(1), both)[0]
    assert torch.allclose(explicit, fused, atol=1e-12)


def test_topk_scope_to_layers_and_heads(lens):
    base = lens.trace(PROMPT, target=" Paris")
    tr = lens.trace(PROMPT, target=" Paris", patches=(lv.TopKAttention(1, layers=[1], heads=[0]),))
    assert torch.equal(tr.attention(0), base.attention(0))
    a = tr.attention(1)
    assert torch.all((a[0] > 0).sum(-1) == 1)
    assert torch.allclose(a[1:], base.attention(1)[1:], atol=1e-12)


def test_topk_fidelity_report(lens):
    rows = topk_fidelity(lens, PROMPT, ks=(1, 4, 64))
    assert [r["k"] for r in rows] == [1, 4, 64]
    assert rows[-1]["mean_kl"] == pytest.approx(0.0, abs=1e-10) and rows[-1]["top1_agreement"] == 1.0
    assert rows[-1]["retained_mass"] == pytest.approx(1.0)
    assert rows[0]["mean_kl"] > rows[1]["mean_kl"] >= 0
    assert 0 < rows[0]["retained_mass"] < rows[1]["retained_mass"] <= 1


@pytest.mark.slow
def test_self_patching_on_smollm2_moves_the_loss_in_the_papers_direction(smol):
    base = smol.trace(PROMPT, target=" Florence")
    down = smol.trace(PROMPT, target=" Florence", patches=(lv.AttentionPatch(-5.0),), base=base, backward=False)
    up = smol.trace(PROMPT, target=" Florence", patches=(lv.AttentionPatch(5.0),), base=base, backward=False)
    assert base.loss - down.loss >= 1.0  # research §1.7: 3.06 -> 1.01
    assert up.loss > base.loss + 1.0  # -> 12.1
    same = smol.trace(PROMPT, target=" Florence", patches=(lv.AttentionPatch(0.0),), backward=False)
    assert torch.equal(same.logits, base.logits)
