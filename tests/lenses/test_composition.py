"""Talking Heads composition scores, SVD channels and channel edits (research/methods-2.md §3.7) against
the plain math written with explicit D x D matrices, dense SVDs, a RoPE rotation built from the model's
inverse frequencies (checked against the traced queries) and a forward hook on the attention output."""
from __future__ import annotations

import functools
import json
import math

import pytest
import torch

import lensviz as lv
from lensviz.lenses import composition as comp
from tests import models
from tests.conftest import PROMPT

MAIN = ("gpt2", "llama", "gpt_neox")  # GPT-2, Llama with GQA, GPT-NeoX (partial RoPE, parallel residual)


@functools.lru_cache(maxsize=None)
def lens_of(family: str) -> lv.Lens:
    return lv.Lens(models.build(family), models.tokenizer())


# ---- the plain math ---------------------------------------------------------------------------------
def dense_heads(lens, fold=False, center=False):
    """Per (layer, query head) dense matrices: dict of lists [L][H] of W_Q, W_K, W_V [D, d], W_O [d, D]."""
    rep = lens.n_heads // lens.n_kv_heads
    eye = torch.eye(lens.d_model, dtype=torch.float64)
    centre = eye - 1.0 / lens.d_model  # I - 1 1^T / D
    out = {n: [] for n in "qkvo"}
    for layer in range(lens.n_layers):
        w = lens.attention_weights(layer)
        g = torch.diag(lens.weight(layer, "ln1")) if fold else eye
        out["q"].append([g @ w["q"][h] for h in range(lens.n_heads)])
        out["k"].append([g @ w["k"][h // rep] for h in range(lens.n_heads)])
        out["v"].append([g @ w["v"][h // rep] for h in range(lens.n_heads)])
        out["o"].append([w["o"][h] @ centre if center else w["o"][h] for h in range(lens.n_heads)])
    return out


def dense_ov(m, layer, head):
    return m["v"][layer][head] @ m["o"][layer][head]  # [D, D]


def dense_receiver(m, mode, layer, head):
    qk = m["q"][layer][head] @ m["k"][layer][head].T
    return {"q": qk, "k": qk.T, "v": dense_ov(m, layer, head)}[mode]


def cs(a, b):
    fro = torch.linalg.matrix_norm
    return fro(a @ b) / (fro(a) * fro(b))


def same(a, b) -> bool:
    """Bit-equal, NaN where the other is NaN."""
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num())


def pairs(lens):
    for l1 in range(lens.n_layers):
        for h1 in range(lens.n_heads):
            for l2 in range(lens.n_layers):
                for h2 in range(lens.n_heads):
                    yield l1, h1, l2, h2


def rope(lens, delta: int) -> torch.Tensor:
    """R(delta) [d, d] with rope(x, p) = x R(p): HF rotate_half pairs dim i with i + r/2 on the first r
    (rotary) dims; built from the model's inverse frequencies."""
    inv = next(m.inv_freq for m in lens.model.modules() if hasattr(m, "inv_freq")).double()
    r, d = 2 * inv.numel(), lens.d_head
    ang = delta * torch.cat([inv, inv])
    swap = torch.zeros(r, r, dtype=torch.float64)  # x @ swap = rotate_half(x) = [-x2, x1]
    swap[r // 2:, :r // 2] = -torch.eye(r // 2, dtype=torch.float64)
    swap[:r // 2, r // 2:] = torch.eye(r // 2, dtype=torch.float64)
    out = torch.eye(d, dtype=torch.float64)
    out[:r, :r] = torch.diag(ang.cos()) + swap @ torch.diag(ang.sin())
    return out


# ---- batched scores == dense per-pair formula --------------------------------------------------------
@pytest.mark.parametrize("family", MAIN + ("qwen2",))
@pytest.mark.parametrize("method", ["gram", "factored"])
@pytest.mark.parametrize("fold,center", [(False, False), (True, False), (True, True)])
def test_batched_scores_equal_dense_formula(family, method, fold, center):
    lens = lens_of(family)
    got = comp.all_composition_scores(lens, fold_norm=fold, center=center, method=method)
    m = dense_heads(lens, fold=fold, center=center and lens.adapter.norm == "layernorm")
    worst = 0.0
    for l1, h1, l2, h2 in pairs(lens):
        for mode in comp.MODES:
            value = got[mode][l1, h1, l2, h2]
            if l2 <= l1:
                assert torch.isnan(value)
                continue
            ref = cs(dense_ov(m, l1, h1), dense_receiver(m, mode, l2, h2))
            worst = max(worst, abs(float(value - ref)))
    assert worst < 1e-12
    assert same(got["q"], comp.composition_scores(lens, "q", fold_norm=fold, center=center, method=method))


def test_folding_and_centring_change_the_scores_where_they_should():
    gpt2, llama = lens_of("gpt2"), lens_of("llama")
    raw = comp.composition_scores(gpt2, "v")
    ok = ~torch.isnan(raw)
    assert (comp.composition_scores(gpt2, "v", fold_norm=True) - raw)[ok].abs().max() > 1e-3
    folded = comp.composition_scores(gpt2, "v", fold_norm=True)
    assert (comp.composition_scores(gpt2, "v", fold_norm=True, center=True) - folded)[ok].abs().max() > 1e-3
    # RMSNorm does not subtract the mean: centring is a no-op there
    assert same(comp.composition_scores(llama, "q", center=True), comp.composition_scores(llama, "q"))


@pytest.mark.parametrize("family", MAIN)
def test_read_side_scores_equal_dense(family):
    lens = lens_of(family)
    got = comp.all_composition_scores(lens, receiver="read")
    m = dense_heads(lens)
    for l1, h1, l2, h2 in pairs(lens):
        if l2 > l1:
            sender = dense_ov(m, l1, h1)
            for mode in comp.MODES:
                assert float(got[mode][l1, h1, l2, h2]) == pytest.approx(float(cs(sender, m[mode][l2][h2])), abs=1e-12)


# ---- masking and range --------------------------------------------------------------------------------
def test_scores_are_masked_below_the_diagonal_and_in_unit_interval(tiny):
    later = (torch.arange(tiny.n_layers)[None, :] > torch.arange(tiny.n_layers)[:, None])[:, None, :, None]
    later = later.expand(tiny.n_layers, tiny.n_heads, tiny.n_layers, tiny.n_heads)
    for receiver in comp.RECEIVERS:
        for mode, s in comp.all_composition_scores(tiny, receiver=receiver).items():
            assert s.shape == (tiny.n_layers, tiny.n_heads, tiny.n_layers, tiny.n_heads)
            assert torch.equal(torch.isnan(s), ~later), (mode, receiver)
            assert s[later].min() > 0 and s[later].max() <= 1
        c = comp.component_scores(tiny, "k", receiver=receiver)
        assert c.scores.shape == (tiny.n_layers, tiny.n_heads, tiny.d_head, tiny.n_layers, tiny.n_heads)
        assert torch.equal(torch.isnan(c.scores), ~later[:, :, None].expand_as(c.scores))
        fin = c.scores[~torch.isnan(c.scores)]
        assert fin.min() >= 0 and fin.max() <= 1


def test_sender_layers_restricts_what_is_computed():
    lens = lens_of("llama")
    every = comp.component_scores(lens, "v")
    one = comp.component_scores(lens, "v", sender_layers=[1])
    assert same(one.scores[1], every.scores[1])
    assert torch.isnan(one.scores[0]).all() and torch.isnan(one.scores[2]).all()


# ---- SVD channels -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", MAIN)
def test_ov_and_qk_svd_match_dense_svd(family):
    lens = lens_of(family)
    m = dense_heads(lens)
    layer = 1
    ov, qk = comp.ov_svd(lens, layer), comp.qk_svd(lens, layer)
    d = lens.d_head
    for h in range(lens.n_heads):
        dense = dense_ov(m, layer, h)
        s = torch.linalg.svdvals(dense)
        assert torch.allclose(ov.S[h], s[:d], rtol=1e-10)
        assert s[d:].max() < 1e-12 * s[0]  # rank <= d_head
        assert torch.allclose(ov.matrix()[h], dense, atol=1e-12)
        assert torch.allclose(ov.V[h].T @ ov.V[h], torch.eye(d, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(qk.matrix()[h], m["q"][layer][h] @ m["k"][layer][h].T, atol=1e-12)
        assert torch.allclose(qk.S[h], torch.linalg.svdvals(m["q"][layer][h] @ m["k"][layer][h].T)[:d], rtol=1e-10)


@pytest.mark.parametrize("family", MAIN)
def test_component_scores_equal_dense_rank_one_scores(family):
    lens = lens_of(family)
    m = dense_heads(lens)
    for mode in comp.MODES:
        got = comp.component_scores(lens, mode)
        l1, l2 = 0, 2
        for h1 in range(lens.n_heads):
            u, s, vh = torch.linalg.svd(dense_ov(m, l1, h1))
            assert torch.allclose(got.sigma[l1, h1], s[:lens.d_head], rtol=1e-10)
            for h2 in range(lens.n_heads):
                r = dense_receiver(m, mode, l2, h2)
                for i in range(lens.d_head):
                    rank_one = s[i] * torch.outer(u[:, i], vh[i])
                    plain = float(cs(rank_one, r))  # CS(sigma_i u_i v_i^T, R)
                    direct = float((vh[i] @ r).norm() / torch.linalg.matrix_norm(r))  # |v_i^T R| / |R|_F
                    assert plain == pytest.approx(direct, abs=1e-12)
                    assert float(got.scores[l1, h1, i, l2, h2]) == pytest.approx(plain, abs=1e-10)


@pytest.mark.parametrize("family", MAIN)
def test_full_score_is_the_sigma_squared_weighted_mean_of_component_scores(family):
    lens = lens_of(family)
    m = dense_heads(lens)
    for mode in comp.MODES:
        full = comp.composition_scores(lens, mode)
        parts = comp.component_scores(lens, mode)
        for l1, h1, l2, h2 in pairs(lens):
            if l2 <= l1:
                continue
            sender, r = dense_ov(m, l1, h1), dense_receiver(m, mode, l2, h2)
            u, s, vh = torch.linalg.svd(sender)
            cs_i = torch.stack([cs(s[i] * torch.outer(u[:, i], vh[i]), r) for i in range(lens.d_head)])
            w = s[:lens.d_head].square()
            weighted = float((w * cs_i.square()).sum() / w.sum())
            assert float(cs(sender, r)) ** 2 == pytest.approx(weighted, rel=1e-4)  # the identity, dense
            assert float(full[l1, h1, l2, h2]) ** 2 == pytest.approx(weighted, rel=1e-4)
        both = ~torch.isnan(full)
        assert torch.allclose(parts.full()[both], full[both], rtol=1e-10)


# ---- null level and z-scores ----------------------------------------------------------------------------
def haar(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(r.diagonal())


@pytest.mark.parametrize("family", MAIN)
def test_random_orthogonal_receiver_gives_the_null_level(family):
    lens = lens_of(family)
    gen = torch.Generator().manual_seed(0)
    big_d = lens.d_model
    m = dense_heads(lens)
    w = comp.head_weights(lens, 1)
    scores = []
    for _ in range(200):
        q = haar(big_d, gen)
        eye = torch.eye(big_d, dtype=torch.float64)
        scores.append(comp.factored_composition_score(w["v"], w["o"], q, eye))  # [H]: R = q (rank D)
        assert float(scores[-1][0]) == pytest.approx(float(cs(dense_ov(m, 1, 0), q)), abs=1e-12)
    x = torch.stack(scores).reshape(-1)
    se = float(x.std() / math.sqrt(x.numel()))
    assert abs(float(x.mean()) - 1 / math.sqrt(big_d)) <= 3 * se + 1e-12
    c = comp.component_scores(lens, "q")
    assert c.null == pytest.approx(1 / math.sqrt(big_d))


@pytest.mark.parametrize("family", MAIN)
def test_rotation_null_matches_monte_carlo(family):
    """CS_i^2 of a randomly rotated sender direction against a real receiver: mean 1/D (within 3 standard
    errors) and the analytic standard deviation of ComponentScores.rotation_std (within 10%)."""
    lens = lens_of(family)
    m = dense_heads(lens)
    c = comp.component_scores(lens, "q")
    gen = torch.Generator().manual_seed(1)
    big_d = lens.d_model
    _, _, vh = torch.linalg.svd(dense_ov(m, 0, 0))
    v = vh[:lens.d_head]  # the sender's write directions
    for h2 in (0, lens.n_heads - 1):
        r = dense_receiver(m, "q", 2, h2)
        x = torch.cat([(v @ haar(big_d, gen) @ r).norm(dim=-1).square() for _ in range(500)])
        x = x / torch.linalg.matrix_norm(r) ** 2
        se = float(x.std() / math.sqrt(x.numel()))
        assert abs(float(x.mean()) - c.null ** 2) <= 3 * se
        assert float(x.std()) == pytest.approx(float(c.rotation_std[2, h2]), rel=0.1)


def test_population_z_scores_and_flags():
    lens = lens_of("llama")
    c = comp.component_scores(lens, "v")
    z = c.z("population")
    for l2, h2 in ((1, 0), (2, 3)):
        pool = c.scores[:l2, :, :, l2, h2].reshape(-1).square()  # every component of every earlier head
        ref = (pool - pool.mean()) / pool.std()
        assert torch.allclose(z[:l2, :, :, l2, h2].reshape(-1), ref, atol=1e-10)
    zr = c.z("rotation")
    assert torch.allclose(zr[0, 1, :, 2, 0], (c.scores[0, 1, :, 2, 0] ** 2 - 1 / lens.d_model) / c.rotation_std[2, 0])
    flags = c.flags(threshold=1.0)
    assert torch.equal(flags, torch.nan_to_num(zr, nan=-1e9) > 1.0) and flags.any()
    rows = c.top(5)
    json.dumps(rows)
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    best = torch.nan_to_num(c.scores, nan=-1).max()
    assert rows[0]["score"] == pytest.approx(float(best))
    l1, h1 = rows[0]["sender"]
    l2, h2 = rows[0]["receiver"]
    assert float(c.scores[l1, h1, rows[0]["component"], l2, h2]) == rows[0]["score"] and l2 > l1


def test_factored_composition_score_equals_dense_on_random_factors():
    gen = torch.Generator().manual_seed(2)
    a1, b1, a2, b2 = (torch.randn(*shape, generator=gen, dtype=torch.float64)
                      for shape in ((5, 20, 4), (5, 4, 20), (5, 20, 3), (5, 3, 20)))
    got = comp.factored_composition_score(a1, b1, a2, b2)
    ref = torch.stack([cs(a1[i] @ b1[i], a2[i] @ b2[i]) for i in range(5)])
    assert torch.allclose(got, ref, atol=1e-13)


# ---- RoPE -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
def test_read_side_score_is_invariant_to_the_rope_rotation(family):
    lens = lens_of(family)
    # the rotation is the one the model applies: traced post-RoPE queries == (x W_Q + b_Q) R(position)
    tr = lens.trace(PROMPT, backward=False)
    layer, w = 1, lens.attention_weights(1)
    q_rot = tr.qkv(layer)[0]  # [H, T, d]
    x = tr.attn_input(layer)
    for h in (0, lens.n_heads - 1):
        pre = x @ w["q"][h] + (0 if w["bq"] is None else w["bq"][h])
        for p in (0, 3, len(tr) - 1):
            assert torch.allclose(pre[p] @ rope(lens, p), q_rot[h, p], atol=1e-10)
    m = dense_heads(lens)
    read = comp.all_composition_scores(lens, ("q", "k"), receiver="read")
    full = comp.composition_scores(lens, "q")
    moved = 0.0
    for delta in (0, 1, 5, 17):
        rot = rope(lens, delta)
        for l1, h1, l2, h2 in pairs(lens):
            if l2 <= l1:
                continue
            sender = dense_ov(m, l1, h1)
            wq, wk = m["q"][l2][h2], m["k"][l2][h2]
            assert float(read["q"][l1, h1, l2, h2]) == pytest.approx(float(cs(sender, wq @ rot)), abs=1e-12)
            assert float(read["k"][l1, h1, l2, h2]) == pytest.approx(float(cs(sender, wk @ rot.T)), abs=1e-12)
            at_delta = float(cs(sender, wq @ rot @ wk.T))  # the score form at relative distance delta
            if delta == 0:
                assert float(full[l1, h1, l2, h2]) == pytest.approx(at_delta, abs=1e-12)
            moved = max(moved, abs(at_delta - float(full[l1, h1, l2, h2])))
    assert moved > 1e-3  # the full Q-composition does depend on delta; the read-side one does not


# ---- edits ------------------------------------------------------------------------------------------------
def head_slice(lens, layer, head):
    """The module-layout slice of o_proj.weight that belongs to `head`."""
    module = lens.adapter.part(lens.model, layer, "o_proj")
    d = lens.d_head
    if isinstance(module, torch.nn.Linear):  # y = z W^T: head h owns columns
        return module.weight[:, head * d:(head + 1) * d]
    return module.weight[head * d:(head + 1) * d, :]  # Conv1D: y = z W, head h owns rows


@pytest.mark.parametrize("family", MAIN + ("qwen2",))
@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
def test_weight_edit_equals_removing_the_rank_one_term(family, alpha):
    lens = lens_of(family)
    layer, head, i = 1, lens.n_heads - 1, 2
    m = dense_heads(lens)
    before = dense_ov(m, layer, head)
    u, s, vh = torch.linalg.svd(before)
    expected = before - (1 - alpha) * s[i] * torch.outer(u[:, i], vh[i])
    module = lens.adapter.part(lens.model, layer, "o_proj")
    weight0 = module.weight.detach().clone()
    bias0 = None if module.bias is None else module.bias.detach().clone()
    new_slice = comp.component_weight_edit(lens, layer, head, i, alpha)
    with comp.edited_component(lens, layer, head, i, alpha) as info:
        assert torch.equal(head_slice(lens, layer, head).detach(), new_slice)
        after = dense_heads(lens)
        assert torch.allclose(dense_ov(after, layer, head), expected, atol=1e-12)
        for other in range(lens.n_heads - 1):
            assert torch.equal(after["o"][layer][other], m["o"][layer][other])
        assert bias0 is None or torch.equal(module.bias, bias0)
        assert abs(float(info["direction"] @ vh[i])) == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(module.weight, weight0)


def test_edit_restores_the_weight_bit_for_bit_on_exception():
    lens = lens_of("gpt2")
    module = lens.adapter.part(lens.model, 2, "o_proj")
    weight0 = module.weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with comp.edited_component(lens, 2, 1, 0, 0.0):
            assert not torch.equal(module.weight, weight0)
            raise RuntimeError("boom")
    assert torch.equal(module.weight, weight0)
    assert module.weight.requires_grad


def logits_with_activation_edit(lens, ids, layer, head, direction, alpha):
    """Run the model with a forward hook on o_proj that replaces head `head`'s write w_h = z_h W_O^h by the
    activation edit; the hook is removed afterwards."""
    module = lens.adapter.part(lens.model, layer, "o_proj")
    d = lens.d_head
    w_o = lens.attention_weights(layer)["o"][head]  # [d, D]

    def hook(mod, args, output):
        write = args[0][..., head * d:(head + 1) * d] @ w_o
        return output + comp.edit_head_write(write, direction, alpha) - write

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return lens.model(ids[None]).logits[0]
    finally:
        handle.remove()


@pytest.mark.parametrize("family", MAIN + ("qwen2",))
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_activation_edit_gives_the_weight_edit_logits(family, alpha):
    lens = lens_of(family)
    ids, _ = lens.encode(PROMPT)
    layer, head, i = 1, 1, 0
    with torch.no_grad():
        base = lens.model(ids[None]).logits[0]
    with comp.edited_component(lens, layer, head, i, alpha) as info:
        with torch.no_grad():
            weight_edit = lens.model(ids[None]).logits[0]
    act_edit = logits_with_activation_edit(lens, ids, layer, head, info["direction"], alpha)
    assert (weight_edit - act_edit).abs().max() < 1e-4
    assert (weight_edit - base).abs().max() > 1e-4  # the edit does something
    with torch.no_grad():
        assert torch.equal(lens.model(ids[None]).logits[0], base)  # hook removed, weight restored
        tr = lens.trace(PROMPT, backward=False)
    assert torch.allclose(tr.logits, base, atol=1e-10)


def test_edit_head_write_target_form_and_channel_basis():
    lens = lens_of("llama")
    gen = torch.Generator().manual_seed(3)
    s = comp.channel_basis(lens, [(1, 0, 0), (1, 0, 1), (2, 3, 0), (1, 0, 0)])
    assert s.shape == (3, lens.d_model)  # a repeated direction adds no rank
    assert torch.allclose(s @ s.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    v = comp.component_direction(lens, 2, 3, 0)
    assert torch.allclose(s.T @ (s @ v), v, atol=1e-12)  # v lies in the channel
    w = torch.randn(6, lens.d_model, generator=gen, dtype=torch.float64)
    target = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    moved = comp.edit_head_write(w, s, target=target)
    assert torch.allclose(moved @ s.T, target, atol=1e-12)  # channel coordinates set to c*
    outside = torch.eye(lens.d_model, dtype=torch.float64) - s.T @ s
    assert torch.allclose(moved @ outside, w @ outside, atol=1e-12)  # the rest untouched
    scaled = comp.edit_head_write(w, s, 0.25)
    assert torch.allclose(scaled, comp.edit_head_write(w, s, target=0.25 * (w @ s.T)), atol=1e-12)


def test_bad_input_is_rejected():
    lens = lens_of("gpt2")
    with pytest.raises(lv.LensvizError, match="mode"):
        comp.composition_scores(lens, "x")
    with pytest.raises(lv.LensvizError, match="receiver"):
        comp.composition_scores(lens, "q", receiver="rope")
    with pytest.raises(lv.LensvizError, match="method"):
        comp.composition_scores(lens, "q", method="dense")
    with pytest.raises(lv.LensvizError, match="alpha"):
        comp.component_weight_edit(lens, 0, 0, 0, alpha=float("nan"))
    with pytest.raises(lv.LensvizError, match="component"):
        comp.component_weight_edit(lens, 0, 0, lens.d_head)
    with pytest.raises(lv.LensvizError, match="orthonormal"):
        comp.edit_head_write(torch.zeros(2, lens.d_model), 2 * torch.ones(lens.d_model))
    with pytest.raises(lv.LensvizError, match="null"):
        comp.component_scores(lens, "q").z("gaussian")


# ---- the real model --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_all_pairs_shapes_masking_range_and_dense_spot_checks(smol):
    scores = comp.all_composition_scores(smol)
    n_l, n_h, big_d = smol.n_layers, smol.n_heads, smol.d_model
    later = (torch.arange(n_l)[None, :] > torch.arange(n_l)[:, None])[:, None, :, None].expand(n_l, n_h, n_l, n_h)
    rep = n_h // smol.n_kv_heads
    for mode, s in scores.items():
        assert s.shape == (30, 9, 30, 9)
        assert torch.equal(torch.isnan(s), ~later)
        assert s[later].min() > 0 and s[later].max() <= 1
        assert 0.5 / math.sqrt(big_d) < float(s[later].mean()) < 2 / math.sqrt(big_d)  # near the null level
    for l1, h1, l2, h2 in ((0, 0, 1, 0), (8, 8, 10, 0), (16, 6, 19, 0), (28, 4, 29, 8)):
        w1, w2 = smol.attention_weights(l1), smol.attention_weights(l2)
        sender = w1["v"][h1 // rep].double() @ w1["o"][h1].double()
        qk = w2["q"][h2].double() @ w2["k"][h2 // rep].double().T
        ov = w2["v"][h2 // rep].double() @ w2["o"][h2].double()
        for mode, r in (("q", qk), ("k", qk.T), ("v", ov)):
            assert float(scores[mode][l1, h1, l2, h2]) == pytest.approx(float(cs(sender, r)), rel=1e-4)


@pytest.mark.slow
def test_smollm2_activation_edit_equals_weight_edit(smol):
    ids, _ = smol.encode(PROMPT)
    layer, head, i, alpha = 8, 8, 3, 0.0
    module = smol.adapter.part(smol.model, layer, "o_proj")
    weight0 = module.weight.detach().clone()
    with comp.edited_component(smol, layer, head, i, alpha) as info:
        with torch.no_grad():
            weight_edit = smol.model(ids[None]).logits[0]
    assert torch.equal(module.weight, weight0)
    act_edit = logits_with_activation_edit(smol, ids, layer, head, info["direction"], alpha)
    assert (weight_edit - act_edit).abs().max() < 1e-4
