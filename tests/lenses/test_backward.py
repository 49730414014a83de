"""Backward Lens against independent computations: projections against the plain math of the final norm
and unembedding, rebuilt weight gradients and FF1 VJPs against autograd (tests/oracle.py), and the
SmolLM2 regression checks of research/methods-ra-bl-visit.md §2 and §5 (rows 10-13, 15)."""
from __future__ import annotations


import pytest
import torch

import lensviz as lv
from lensviz.lenses import backward as bl
from tests import models, oracle
from tests.conftest import PROMPT

TARGET = " Paris"
LAYERNORM_FAMILIES = {"gpt2": True, "gpt_neox": True, "llama": False, "qwen2": False}


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def plain_logits(lens, v, normalize=False):
    """W_U N_f(v) written out by hand (LayerNorm: centre, scale, gamma, beta; RMSNorm: scale, gamma)."""
    m = lens.final_norm_module
    with torch.no_grad():
        v = v.to(lens.model_dtype)
        if normalize:  # unit vectors; a zero vector stays zero
            n = v.norm(dim=-1, keepdim=True)
            v = torch.where(n > 0, v / torch.where(n > 0, n, 1.0), v)
        if isinstance(m, torch.nn.LayerNorm):
            c = v - v.mean(-1, keepdim=True)
            n = c / torch.sqrt((c * c).mean(-1, keepdim=True) + m.eps) * m.weight + m.bias
        else:
            n = v / torch.sqrt((v * v).mean(-1, keepdim=True) + m.variance_epsilon) * m.weight
        return (n @ lens.unembed_module.weight.T).float()


def rank_of(logits, tid):
    return (logits > logits[..., tid:tid + 1]).sum(-1)


def check_grid(grid, logits, tid, k, vectors):
    assert grid.top.ids.shape == grid.bottom.ids.shape == logits.shape[:-1] + (k,)
    live = vectors.norm(dim=-1) > 0  # zero vectors (e.g. delta off the loss position) tie on RMSNorm
    assert live.any()
    assert torch.equal(grid.top.ids[live], logits.topk(k, dim=-1).indices[live])
    assert torch.equal(grid.bottom.ids[live], logits.argsort(dim=-1)[..., :k][live])  # least probable first
    p = torch.softmax(logits, -1)
    assert torch.allclose(grid.top.probs, p.topk(k, dim=-1).values, rtol=1e-5, atol=0)
    assert torch.allclose(grid.bottom.probs, p.topk(k, dim=-1, largest=False).values, rtol=1e-5, atol=0)
    assert torch.equal(grid.target_rank, rank_of(logits, tid))
    assert torch.allclose(grid.norm.double(), vectors.double().pow(2).sum(-1).sqrt(), rtol=1e-12, atol=0)


@pytest.fixture
def traced(tiny):
    return tiny, tiny.trace(PROMPT, target=TARGET)


@pytest.fixture
def autograd(traced):
    """(lens, trace, {(layer, part): dL/d(FF1 output) [T, F]}) with parameter .grad filled by autograd."""
    lens, tr = traced
    model, ad = lens.model, lens.adapter
    kept, handles = {}, []
    for layer in range(lens.n_layers):
        for part in bl.FF1_PARTS:
            if getattr(ad, part) is None:
                continue

            def hook(module, args, out, key=(layer, part)):
                out.retain_grad()
                kept[key] = out

            handles.append(ad.part(model, layer, part).register_forward_hook(hook))
    try:
        ref = oracle.run(model, tr.input_ids, tr.target_id, params_grad=True)
    finally:
        for h in handles:
            h.remove()
    assert ref["loss"] == pytest.approx(tr.loss, rel=1e-12)
    yield lens, tr, {key: out.grad[0] for key, out in kept.items()}
    for p in model.parameters():
        p.grad = None


# (a) the tables ----------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [None, True])
def test_tables_are_the_plain_projections(traced, normalize):
    lens, tr = traced
    table = bl.backward_lens(tr, k=4, normalize=normalize)
    want_norm = LAYERNORM_FAMILIES[lens.arch] if normalize is None else normalize
    assert table.normalize is want_norm and table.sign == 1
    assert table.layers == list(range(lens.n_layers)) and table.tokens == tr.tokens
    x = torch.stack([tr.mlp_input(layer) for layer in range(lens.n_layers)])
    delta = torch.stack([tr.resid_grad(layer, "post") for layer in range(lens.n_layers)])  # MLP output feeds "post"
    check_grid(table.ff1, plain_logits(lens, x), tr.target_id, 4, x)  # FF1 inputs: never normalised
    check_grid(table.ff2, plain_logits(lens, delta, want_norm), tr.target_id, 4, delta)
    assert table.ff1.top.tokens[1][2] == [tr.lens.decode(i) for i in table.ff1.top.ids[1, 2].tolist()]
    assert torch.equal(table.delta_norm, table.ff2.norm)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_sign_minus_one_projects_minus_delta(family, tiny_tokenizer):  # row 15
    lens = lv.Lens(models.build(family), tiny_tokenizer)
    tr = lens.trace(PROMPT, target=TARGET)
    delta = torch.stack([tr.mlp_output_grad(layer) for layer in range(lens.n_layers)])
    neg = bl.backward_lens(tr, k=5, sign=-1, normalize=False)
    pos = bl.backward_lens(tr, k=5, sign=1, normalize=False)
    check_grid(neg.ff2, plain_logits(lens, -delta), tr.target_id, 5, delta)
    assert torch.equal(neg.ff1.top.ids, pos.ff1.top.ids)  # sign only touches FF2
    live = delta.norm(dim=-1) > 0
    if LAYERNORM_FAMILIES[lens.arch]:
        # LayerNorm + bias is not odd: top of proj(-delta) is not bottom of proj(delta)
        assert not torch.equal(neg.ff2.top.ids[live], pos.ff2.bottom.ids[live])
    else:
        # RMSNorm is odd: the two read-outs coincide, ranks mirror
        assert torch.equal(neg.ff2.top.ids, pos.ff2.bottom.ids)
        assert torch.equal(neg.ff2.target_rank[live], lens.vocab_size - 1 - pos.ff2.target_rank[live])


def test_layer_subset_rows_and_bad_arguments(traced):
    lens, tr = traced
    full = bl.backward_lens(tr, k=3)
    part = bl.backward_lens(tr, k=3, layers=[-1, 0])
    assert part.layers == [lens.n_layers - 1, 0]
    assert part.ff2.top.ids.shape == (2, len(tr), 3)
    assert torch.equal(part.ff2.top.ids, full.ff2.top.ids[[lens.n_layers - 1, 0]])
    assert torch.equal(part.ff1.bottom.ids, full.ff1.bottom.ids[[lens.n_layers - 1, 0]])
    assert torch.equal(part.ff2.norm, full.ff2.norm[[lens.n_layers - 1, 0]])
    with pytest.raises(lv.LensvizError, match="layer"):
        bl.backward_lens(tr, layers=[lens.n_layers])
    with pytest.raises(lv.LensvizError, match="sign"):
        bl.backward_lens(tr, sign=2)
    with pytest.raises(lv.LensvizError, match="normalize"):
        bl.backward_lens(tr, normalize="yes")
    with pytest.raises(lv.LensvizError, match="k must be"):
        bl.backward_lens(tr, k=0)
    with pytest.raises(lv.LensvizError, match="part"):
        bl.weight_gradient(tr, 0, "o_proj")
    fwd = lens.trace(PROMPT, target=TARGET, backward=False)
    with pytest.raises(lv.LensvizError, match="backward=False"):
        bl.backward_lens(fwd)


def test_weight_gradients_and_ff1_vjps_equal_autograd(autograd):  # row 10
    lens, tr, ff1_grads = autograd
    model, ad = lens.model, lens.adapter
    checked = set()
    for layer in range(lens.n_layers):
        vjps = bl.ff1_output_grads(tr, layer)
        for part in bl.FF_PARTS:
            if getattr(ad, part) is None:
                continue
            module = ad.part(model, layer, part)
            got = bl.weight_gradient(tr, layer, part)
            assert got.weight.shape == module.weight.shape  # the module's own layout
            assert rel(got.weight, module.weight.grad) < 1e-12
            if module.bias is None:
                assert got.bias is None
            else:
                assert rel(got.bias, module.bias.grad) < 1e-12
            if part != "mlp_out":
                assert rel(vjps[part], ff1_grads[(layer, part)]) < 1e-12
            checked.add(part)
    assert checked == {p for p in bl.FF_PARTS if getattr(ad, p) is not None}


def test_ff2_gradient_rank_is_at_most_T_and_one_in_the_last_layer(traced):  # rows 11, 12
    lens, tr = traced
    for layer in range(lens.n_layers):
        g = bl.weight_gradient(tr, layer, "mlp_out")
        assert int(torch.linalg.matrix_rank(g.weight)) <= len(tr)
    last = bl.weight_gradient(tr, -1, "mlp_out")
    assert int(torch.linalg.matrix_rank(last.weight)) == 1
    assert torch.all(last.vjps[:-1] == 0) and float(last.vjps[-1].norm()) > 0
    # FF1 of the last layer too: only the loss position carries a VJP
    assert int(torch.linalg.matrix_rank(bl.weight_gradient(tr, -1, "mlp_in").weight)) == 1


# (c) shift and imprint ---------------------------------------------------------------------------
def test_shift_tokens_are_the_top_of_proj_minus_delta(traced):
    lens, tr = traced
    normalize = LAYERNORM_FAMILIES[lens.arch]
    for layer, pos in ((-1, -1), (0, 3), (1, -2)):
        delta = tr.resid_grad(layer, "post")[pos]
        got = bl.shift_tokens(tr, layer, pos, k=6)
        logits = plain_logits(lens, -delta, normalize)
        assert got.ids.shape == (6,)
        assert torch.equal(got.ids, logits.topk(6).indices)
        assert int(got.target_rank) == int(rank_of(logits, tr.target_id))
        if not normalize:  # RMSNorm: the same tokens as the authors' bottom-k of proj(delta)
            assert torch.equal(got.ids, plain_logits(lens, delta).argsort()[:6])
    # in the last layer, -delta at the loss position writes the target
    assert int(bl.shift_tokens(tr, -1, k=3).target_rank) == 0


def test_imprint_projects_minus_the_autograd_key_gradient(autograd):
    lens, tr, ff1_grads = autograd
    ad = lens.adapter
    layer = 1
    for part in [p for p in bl.FF1_PARTS if getattr(ad, p) is not None]:
        g = ad.as_in_out(ad.part(lens.model, layer, part).weight.grad)  # [D, F]: column n = neuron n's key grad
        u = -g.T  # [F, D] key updates
        got = bl.imprint_tokens(tr, layer, k=4, part=part, top=3)
        assert torch.equal(got.neurons, u.norm(dim=-1).topk(3).indices)
        assert torch.allclose(got.update_norm, u.norm(dim=-1)[got.neurons], rtol=1e-12, atol=0)
        assert rel(got.weights, -ff1_grads[(layer, part)][:, got.neurons].T) < 1e-12
        logits = plain_logits(lens, u[got.neurons], LAYERNORM_FAMILIES[lens.arch])
        assert torch.equal(got.tokens.ids, logits.topk(4, dim=-1).indices)
        assert torch.equal(got.tokens.target_rank, rank_of(logits, tr.target_id))
        chosen = bl.imprint_tokens(tr, layer, k=2, part=part, neurons=[0, -1])
        assert chosen.neurons.tolist() == [0, u.shape[0] - 1]


# (d), (e) the real model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def florence(smol):
    return smol.trace(PROMPT, target=" Florence")


@pytest.mark.slow
def test_smollm2_target_sits_at_the_bottom_of_proj_delta_in_late_layers(smol, florence):  # §2.3
    table = bl.backward_lens(florence, k=5)
    assert table.normalize is False  # RMSNorm
    v = smol.vocab_size
    ranks = table.ff2.target_rank[:, -1]
    assert all(int(ranks[layer]) >= v - 10 for layer in range(21, smol.n_layers)), ranks.tolist()
    for layer in (21, 29):  # the same rank from the plain math
        logits = plain_logits(smol, florence.resid_grad(layer, "post")[-1])
        assert int(ranks[layer]) == int(rank_of(logits, florence.target_id))
    for layer in range(21, smol.n_layers):  # and the FF2 shift writes it among the first ten tokens
        assert int(bl.shift_tokens(florence, layer, k=10).target_rank) < 10


@pytest.mark.slow
def test_smollm2_last_layer_delta_and_norm_column(smol, florence):  # row 12
    table = bl.backward_lens(florence, k=3, layers=[0, 14, -1])
    delta = florence.mlp_output_grad(-1)
    assert torch.all(delta[:-1] == 0)
    assert torch.all(table.ff2.norm[-1, :-1] == 0) and float(table.ff2.norm[-1, -1]) > 0
    for row, layer in enumerate(table.layers):
        d = florence.mlp_output_grad(layer).double()
        assert torch.allclose(table.ff2.norm[row].double(), (d * d).sum(-1).sqrt(), rtol=1e-6, atol=0)


@pytest.mark.slow
def test_smollm2_ff2_gradient_rank(smol, florence):  # row 11
    t = len(florence)
    first = bl.weight_gradient(florence, 0, "mlp_out")
    assert first.weight.shape == (smol.d_model, smol.d_mlp)  # Linear [out, in]
    assert int(torch.linalg.matrix_rank(first.weight)) <= t
    assert int(torch.linalg.matrix_rank(bl.weight_gradient(florence, -1, "mlp_out").weight)) == 1
