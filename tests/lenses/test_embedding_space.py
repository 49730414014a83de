"""Parameters in embedding space (research/methods-2.md §2.7): factored top pairs against dense V x V
matrices, the right inverse, the kernelized correlation, and the per-head extraction against the
model's own attention and attention output."""
from __future__ import annotations

import json

import pytest
import torch

import lensviz as lv
from lensviz.lenses import embedding_space as es
from tests import models
from tests.conftest import PROMPT

ROTARY = ("llama", "qwen2", "gpt_neox")


def w_unembed(lens):
    return lens.unembed_module.weight.detach()  # [V, D]


def rotary_module(lens):
    return next(m for m in lens.model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor))


def rope_at(lens, x, pos):
    """HF rotary embedding of head vectors x [..., d] at one position, written out on the vectors."""
    cos, sin = rotary_module(lens)(x.reshape(1, -1, x.shape[-1]), torch.tensor([[pos]]))
    cos, sin = cos[0, 0].to(x.dtype), sin[0, 0].to(x.dtype)
    r = cos.shape[-1]
    turn, keep = x[..., :r], x[..., r:]
    swapped = torch.cat((-turn[..., r // 2:], turn[..., :r // 2]), dim=-1)
    return torch.cat((turn * cos + swapped * sin, keep), dim=-1)


def dense_matrix(lens, layer, head, kind, delta=0):
    """The full V x V embedding-space matrix, built directly (E' = E^T = W_U)."""
    w = lens.attention_weights(layer)
    g = head * lens.n_kv_heads // lens.n_heads
    u = w_unembed(lens)
    if kind == "ov":
        return (u @ w["v"][g]) @ (w["o"][head] @ u.T)
    q, k = u @ w["q"][head], u @ w["k"][g]
    if lens.adapter.rotary:
        q, k = rope_at(lens, q, 5 + delta), rope_at(lens, k, 5)
    return q @ k.T


def pair_set(got) -> set:
    return {(int(s), int(d)) for s, d in zip(got.src_ids, got.dst_ids)}


def dense_top(m, k, largest=True):
    top = m.reshape(-1).topk(k, largest=largest)
    return top.values, {(int(i) // m.shape[1], int(i) % m.shape[1]) for i in top.indices}


# §2.7 #1 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ov", "qk"])
def test_factored_top_pairs_equal_the_dense_matrix(tiny, kind):
    head = 1  # GQA families (4 heads, 2 kv): g(1) = 1 // 2 = 0, where h % H_kv would wrongly give 1
    dense = dense_matrix(tiny, 1, head, kind)
    for block in (1024, 7):
        got = es.head_top_pairs(tiny, 1, head, kind, k=40, block=block)
        values, pairs = dense_top(dense, 40)
        assert pair_set(got) == pairs
        assert torch.allclose(got.values, values, atol=1e-12)
    low = es.head_top_pairs(tiny, 1, head, kind, k=15, bottom=True)
    values, pairs = dense_top(dense, 15, largest=False)
    assert pair_set(low) == pairs
    assert torch.allclose(low.values, values, atol=1e-12)
    assert low.kv_head == head // (tiny.n_heads // tiny.n_kv_heads)


def test_allow_list_and_exclude_same_match_the_restricted_dense_matrix(tiny):
    ids = torch.randperm(tiny.vocab_size, generator=torch.Generator().manual_seed(1))[:60]
    for kind in ("ov", "qk"):
        dense = dense_matrix(tiny, 0, 1, kind)[ids][:, ids]
        got = es.head_top_pairs(tiny, 0, 1, kind, k=25, tokens=ids.tolist(), block=5)
        _, pairs = dense_top(dense, 25)
        assert pair_set(got) == {(int(ids[r]), int(ids[c])) for r, c in pairs}
        no_self = dense.clone()
        no_self.fill_diagonal_(float("-inf"))
        got = es.head_top_pairs(tiny, 0, 1, kind, k=25, tokens=ids.tolist(), exclude_same=True)
        _, pairs = dense_top(no_self, 25)
        assert pair_set(got) == {(int(ids[r]), int(ids[c])) for r, c in pairs}
        assert all(s != d for s, d in zip(got.src_ids.tolist(), got.dst_ids.tolist()))
    rows = es.head_top_pairs(tiny, 0, 1, "ov", k=10, rows=[" Paris", 45])
    assert set(rows.src_ids.tolist()) <= {272, 45}


@pytest.mark.parametrize("family", ROTARY)
def test_qk_pairs_at_a_rope_distance(family, tiny_tokenizer):
    lens = lv.Lens(models.build(family), tiny_tokenizer)
    for delta in (0, 3):
        got = es.head_top_pairs(lens, 2, 3, "qk", k=30, delta=delta)
        _, pairs = dense_top(dense_matrix(lens, 2, 3, "qk", delta), 30)
        assert pair_set(got) == pairs
        assert got.delta == delta and f"RoPE distance {delta}" in got.label
    assert "content term" in es.head_top_pairs(lens, 2, 3, "qk", k=2).label
    r3 = es.rope_relative(lens, 3)
    assert torch.allclose(r3 @ r3.T, torch.eye(lens.d_head, dtype=r3.dtype), atol=1e-6)  # orthogonal
    assert torch.allclose(es.rope_relative(lens, 1) @ es.rope_relative(lens, 2), r3, atol=1e-6)
    assert not torch.allclose(r3, torch.eye(lens.d_head, dtype=r3.dtype), atol=1e-2)


def test_gpt2_qk_has_no_rope_factor(tiny_tokenizer):
    lens = lv.Lens(models.build("gpt2"), tiny_tokenizer)
    assert torch.equal(es.rope_relative(lens, 4), torch.eye(lens.d_head, dtype=lens.model_dtype))
    got = es.head_top_pairs(lens, 0, 0, "qk", k=3)
    assert got.delta is None and "RoPE" not in got.label
    out = got.to_dict()
    json.dumps(out)
    first = out["pairs"][0]
    assert first["src_id"] == int(got.src_ids[0]) and first["src"] == lens.tokenizer.decode([first["src_id"]])


# §2.7 #2 ----------------------------------------------------------------------------------------------
def test_pinv_space_is_an_exact_right_inverse(tiny):
    sp = es.embedding_space(tiny, inverse="pinv")
    eye = torch.eye(tiny.d_model, dtype=sp.write.dtype)
    assert float((sp.write @ sp.read - eye).abs().max()) < 1e-10
    assert torch.allclose(sp.read, torch.linalg.pinv(w_unembed(tiny).T), atol=1e-10)
    plain = es.embedding_space(tiny)
    assert torch.equal(plain.read, w_unembed(tiny)) and torch.equal(plain.write, w_unembed(tiny).T)
    assert float((plain.write @ plain.read - eye).abs().max()) > 1e-2  # E^T is only an approximation
    emb = tiny.model.get_input_embeddings().weight.detach()
    inp = es.embedding_space(tiny, inverse="pinv", read="input")
    assert float((emb.T @ inp.read - eye).abs().max()) < 1e-10
    # keys projected with E^+ differ from keys projected with E^T
    keys = es.ffn_keys(tiny, 0)[:4]
    assert not torch.equal(es.project_read(tiny, keys, 5, space=sp).ids, es.project_read(tiny, keys, 5).ids)


def test_folded_final_norm_scales_the_write_side(tiny):
    sp = es.embedding_space(tiny, fold_final_norm=True)
    gamma = tiny.final_norm_module.weight.detach()
    assert torch.allclose(sp.write, gamma[:, None] * w_unembed(tiny).T)
    v = es.value_vectors(tiny, 1)[:3]
    expected = (w_unembed(tiny) @ (gamma[:, None] * v.T)).T.topk(4, dim=-1).indices
    assert torch.equal(es.project_write(tiny, v, 4, space=sp).ids, expected)


# §2.7 #3 ----------------------------------------------------------------------------------------------
def test_kernelized_correlation_equals_pearson_of_explicit_projections(tiny_tokenizer):
    a = lv.Lens(models.build("llama", seed=0), tiny_tokenizer)
    b = lv.Lens(models.build("gpt2", seed=1), tiny_tokenizer)
    e1, e2 = es.unembedding(a), es.unembedding(b)
    x, y = es.value_vectors(a, 0)[:6], es.value_vectors(b, 2)[:5]
    got = es.projection_correlation(x, y, e1, e2)
    explicit = torch.corrcoef(torch.cat((x @ e1, y @ e2)))[:6, 6:]
    assert got.shape == (6, 5) and float((got - explicit).abs().max()) < 1e-10
    same = es.projection_correlation(x, x, e1)
    assert torch.allclose(same.diagonal(), torch.ones(6, dtype=same.dtype), atol=1e-12)


# §2.7 #4 ----------------------------------------------------------------------------------------------
def test_per_head_extraction_reproduces_attention_probabilities(tiny):
    tr = tiny.trace(PROMPT, target=" Paris")
    for layer in range(tiny.n_layers):
        rebuilt = es.head_attention(tr, layer)
        assert rebuilt.shape == (tiny.n_heads, len(tr), len(tr))
        assert float((rebuilt - tr.attention(layer)).abs().max()) < 1e-5


def test_the_wrong_kv_group_would_not_reproduce_attention(tiny_tokenizer):
    lens = lv.Lens(models.build("llama"), tiny_tokenizer)
    tr = lens.trace(PROMPT, target=" Paris")
    x = tr.attn_input(1)
    t, h = len(tr), 0
    w = es.head_weights(lens, 1, h)
    assert w["kv_head"] == 0 and torch.equal(w["k"], lens.attention_weights(1)["k"][0])
    wrong = lens.attention_weights(1)["k"][1]
    q = torch.stack([rope_at(lens, x[i] @ w["q"], i) for i in range(t)])
    k = torch.stack([rope_at(lens, x[j] @ wrong, j) for j in range(t)])
    scores = (q @ k.T * tr.attention_scaling(1)).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    assert float((torch.softmax(scores, -1) - tr.attention(1)[h]).abs().max()) > 1e-2


# §2.7 #5 ----------------------------------------------------------------------------------------------
def test_attention_output_is_the_sum_of_head_writes_plus_bias(tiny):
    seen = {}
    hooks = [tiny.adapter.part(tiny.model, layer, "o_proj").register_forward_hook(
        lambda mod, args, out, layer=layer: seen.__setitem__(layer, (args[0][0].detach(), out[0].detach())))
        for layer in range(tiny.n_layers)]
    try:
        with torch.no_grad():
            tiny.model(tiny.encode(PROMPT)[0][None])
    finally:
        for h in hooks:
            h.remove()
    for layer in range(tiny.n_layers):
        z, out = seen[layer]
        writes = es.head_writes(tiny, layer, z)
        bias = es.head_weights(tiny, layer, 0)["bo"]
        assert writes.shape == (tiny.n_heads, z.shape[0], tiny.d_model)
        assert torch.allclose(writes.sum(0) + (0 if bias is None else bias), out, atol=1e-12)
        d = tiny.d_head
        only_head_1 = torch.zeros_like(z)
        only_head_1[:, d:2 * d] = z[:, d:2 * d]
        with torch.no_grad():
            single = tiny.adapter.part(tiny.model, layer, "o_proj")(only_head_1)
        assert torch.allclose(writes[1] + (0 if bias is None else bias), single, atol=1e-12)


# FFN keys / values and head dimensions ------------------------------------------------------------------
def test_ffn_keys_are_what_ff1_reads(tiny):
    x = torch.randn(3, tiny.d_model, dtype=tiny.model_dtype, generator=torch.Generator().manual_seed(0))
    parts = ["mlp_in"] + (["mlp_gate"] if tiny.adapter.mlp_gate is not None else [])
    for part in parts:
        ff1 = tiny.adapter.part(tiny.model, 1, part)
        with torch.no_grad():
            response = ff1(x) - ff1(torch.zeros_like(x))
        keys = es.ffn_keys(tiny, 1, part)
        assert keys.shape == (tiny.d_mlp, tiny.d_model)
        assert torch.allclose(x @ keys.T, response, atol=1e-12)
        which = "key" if part == "mlp_in" else "gate"
        got = es.ffn_projections(tiny, 1, which, dims=[0, 5], k=6)
        assert torch.equal(got.ids, (w_unembed(tiny) @ keys[[0, 5]].T).T.topk(6, dim=-1).indices)
    gamma = tiny.adapter.part(tiny.model, 1, "ln2").weight.detach()
    assert torch.allclose(es.ffn_keys(tiny, 1, fold_norm=True), es.ffn_keys(tiny, 1) * gamma, atol=1e-14)
    values = es.ffn_projections(tiny, 1, "value", k=4)
    assert values.ids.shape == (tiny.d_mlp, 4)
    assert torch.equal(values.ids, (es.value_vectors(tiny, 1) @ w_unembed(tiny).T).topk(4, dim=-1).indices)
    if tiny.adapter.mlp_gate is None:
        with pytest.raises(lv.LensvizError, match="gate"):
            es.ffn_keys(tiny, 0, "mlp_gate")


def test_head_dimension_projections(tiny):
    h = 1
    w = tiny.attention_weights(2)
    g = h // (tiny.n_heads // tiny.n_kv_heads)
    u = w_unembed(tiny)
    o_proj = tiny.adapter.part(tiny.model, 2, "o_proj")
    basis = torch.zeros(tiny.d_head, tiny.n_heads * tiny.d_head, dtype=tiny.model_dtype)
    basis[:, h * tiny.d_head:(h + 1) * tiny.d_head] = torch.eye(tiny.d_head)
    with torch.no_grad():
        rows = o_proj(basis) - o_proj(torch.zeros_like(basis))  # rows of W_O^h from the module
    assert torch.equal(es.head_projections(tiny, 2, h, "o", k=5).ids, (rows @ u.T).topk(5, dim=-1).indices)
    for part, mat in (("q", w["q"][h]), ("k", w["k"][g]), ("v", w["v"][g])):
        assert torch.equal(es.head_projections(tiny, 2, h, part, k=5).ids, (u @ mat).T.topk(5, dim=-1).indices)
    gamma = tiny.adapter.part(tiny.model, 2, "ln1").weight.detach()
    assert torch.allclose(es.head_weights(tiny, 2, h, fold_norm=True)["q"], gamma[:, None] * w["q"][h])


def test_bad_arguments_are_rejected(tiny):
    with pytest.raises(lv.LensvizError, match="kind"):
        es.head_top_pairs(tiny, 0, 0, "vo")
    with pytest.raises(lv.LensvizError, match="head"):
        es.head_top_pairs(tiny, 0, tiny.n_heads)
    with pytest.raises(lv.LensvizError, match="inverse"):
        es.embedding_space(tiny, inverse="solve")
    with pytest.raises(lv.LensvizError, match="space"):
        es.head_top_pairs(tiny, 0, 0, space="pinv")
    with pytest.raises(lv.LensvizError, match="delta"):
        es.rope_relative(tiny, 1.5)


# the real model ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_embedding_space_checks(smol):
    vocab = torch.randperm(smol.vocab_size, generator=torch.Generator().manual_seed(0))[:2000]
    w = smol.attention_weights(10)
    u = w_unembed(smol)[vocab]
    h, g = 4, 4 // (smol.n_heads // smol.n_kv_heads)
    for kind, dense in (("ov", (u @ w["v"][g]) @ (w["o"][h] @ u.T)), ("qk", (u @ w["q"][h]) @ (u @ w["k"][g]).T)):
        got = es.head_top_pairs(smol, 10, h, kind, k=50, tokens=vocab.tolist())
        top = dense.reshape(-1).topk(51)
        kth, next_one = float(top.values[49]), float(top.values[50])
        pairs = {(int(vocab[i // 2000]), int(vocab[i % 2000])) for i in top.indices[:50].tolist()}
        assert kth - next_one > 1e-4  # distinct values at the cut: the index sets must agree exactly
        assert pair_set(got) == pairs  # §2.7 #1
        assert torch.allclose(got.values, top.values[:50], rtol=1e-5, atol=1e-5)
    sp = es.embedding_space(smol, inverse="pinv")
    assert float((sp.write @ sp.read - torch.eye(smol.d_model)).abs().max()) < 1e-4  # §2.7 #2
    x, y = es.value_vectors(smol, 3)[:4], es.value_vectors(smol, 20)[:3]
    explicit = torch.corrcoef(torch.cat((x @ sp.write, y @ sp.write)).double())[:4, 4:]
    assert float((es.projection_correlation(x, y, sp.write) - explicit).abs().max()) < 1e-5  # §2.7 #3
    tr = smol.trace(PROMPT, target=" Florence")
    for layer in (0, 15, smol.n_layers - 1):  # §2.7 #4 with RoPE and GQA
        assert float((es.head_attention(tr, layer) - tr.attention(layer)).abs().max()) < 1e-5
