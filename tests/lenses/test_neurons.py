"""LM-Debugger sub-updates, projections, before/after views and the value index (research/methods-2.md
§1.11), checked against the MLP modules, HF hidden states and brute-force projections."""
from __future__ import annotations

import json

import pytest
import torch

import lensviz as lv
from lensviz.lenses import neurons
from tests import models
from tests.conftest import PROMPT

SEQUENTIAL = ("gpt2", "llama", "qwen2", "gpt_neox_seq")


def module(lens, layer, part):
    return lens.adapter.part(lens.model, layer, part)


def values_from_module(lens, layer):
    """v_i [F, D] read off the FF2 module itself: FF2(e_i) - FF2(0), no layout knowledge."""
    ff2 = module(lens, layer, "mlp_out")
    eye = torch.eye(lens.d_mlp, dtype=lens.model_dtype)
    with torch.no_grad():
        return ff2(eye) - ff2(torch.zeros(1, lens.d_mlp, dtype=lens.model_dtype))


def captured_coefficients(lens, ids):
    """m [L, T, F]: the FF2 inputs seen by forward pre-hooks during a plain model call."""
    seen = {}
    handles = [module(lens, layer, "mlp_out").register_forward_pre_hook(
        lambda mod, args, layer=layer: seen.__setitem__(layer, args[0][0].detach().clone()))
        for layer in range(lens.n_layers)]
    try:
        with torch.no_grad():
            lens.model(ids[None])
    finally:
        for h in handles:
            h.remove()
    return torch.stack([seen[layer] for layer in range(lens.n_layers)])


def plain_probs(lens, h):
    with torch.no_grad():
        return torch.softmax(lens.unembed_module(lens.final_norm_module(h)).float(), -1)


# §1.11 #1 ---------------------------------------------------------------------------------------------
def test_sub_updates_sum_to_the_mlp_modules_output(tiny):
    tr = tiny.trace(PROMPT, target=" Paris")
    for layer in range(tiny.n_layers):
        with torch.no_grad():
            reference = module(tiny, layer, "mlp")(tr.mlp_input(layer))
        assert torch.allclose(neurons.mlp_output(tr, layer), reference, atol=1e-12, rtol=0)
        every = neurons.sub_updates(tr, layer, list(range(tiny.d_mlp)))  # [T, F, D]
        bias = neurons.value_bias(tiny, layer)
        summed = every.sum(1) + (0 if bias is None else bias)
        assert torch.allclose(summed, reference, atol=1e-12, rtol=0)
        assert torch.allclose(neurons.value_vectors(tiny, layer), values_from_module(tiny, layer), atol=1e-14)


# §1.11 #2 and #3 -------------------------------------------------------------------------------------
def test_switching_a_value_off_changes_the_output_by_minus_its_sub_update(tiny):
    tr = tiny.trace(PROMPT, target=" Paris")
    for layer in range(tiny.n_layers):
        mlp, ff2 = module(tiny, layer, "mlp"), module(tiny, layer, "mlp_out")
        x = tr.mlp_input(layer)
        dim = int(neurons.top_sub_updates(tr, 1, layers=[layer], positions=[-1]).dims[0, 0, 0])

        def off(mod, args, dim=dim):
            m = args[0].clone()
            m[..., dim] = 0.0
            return (m,)

        with torch.no_grad():
            clean = mlp(x)
            handle = ff2.register_forward_pre_hook(off)
            try:
                switched = mlp(x)
            finally:
                handle.remove()
            after = mlp(x)
        expected = -neurons.sub_updates(tr, layer, dim)[:, 0]  # [T, D], every position
        assert torch.allclose(switched - clean, expected, atol=1e-12, rtol=0)
        assert expected[-1].norm() > 0
        assert torch.equal(after, clean)  # no hook left behind


# §1.11 #4 ---------------------------------------------------------------------------------------------
def test_top10_ordering_is_argsort_of_coefficient_times_value_norm(tiny):
    tr = tiny.trace(PROMPT, target=" Paris")
    m = captured_coefficients(tiny, tr.input_ids)  # [L, T, F]
    subs = neurons.top_sub_updates(tr, 10, positions=[-1])
    assert subs.dims.shape == (tiny.n_layers, 1, 10) and subs.positions == [len(tr) - 1]
    for layer in range(tiny.n_layers):
        score = m[layer, -1].abs() * values_from_module(tiny, layer).norm(dim=-1)
        order = torch.argsort(score, descending=True)[:10]
        assert subs.dims[layer, 0].tolist() == order.tolist()
        assert torch.allclose(subs.scores[layer, 0], score[order], atol=1e-12)
        assert torch.allclose(subs.coeffs[layer, 0], m[layer, -1][order], atol=1e-12)
        assert subs.labels()[layer][0][0] == f"L{layer}D{int(order[0])}"


def test_top_sub_updates_at_every_position(tiny):
    tr = tiny.trace(PROMPT, target=" Paris")
    subs = neurons.top_sub_updates(tr, 4, layers=[0, -1])
    assert subs.layers == [0, tiny.n_layers - 1] and subs.dims.shape == (2, len(tr), 4)
    m = tr.mlp_activations(-1)
    score = m.abs() * values_from_module(tiny, tiny.n_layers - 1).norm(dim=-1)
    assert torch.equal(subs.dims[1], score.topk(4, dim=-1).indices)


# §1.11 #5 and #6 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", SEQUENTIAL)
def test_before_is_the_ln2_input_and_after_the_next_blocks_input(family, tiny_tokenizer):
    lens = lv.Lens(models.build(family), tiny_tokenizer)
    tr = lens.trace(PROMPT, target=" Paris")
    ln2_in = {}
    handles = [module(lens, layer, "ln2").register_forward_pre_hook(
        lambda mod, args, layer=layer: ln2_in.__setitem__(layer, args[0][0, -1].detach().clone()))
        for layer in range(lens.n_layers)]
    try:
        with torch.no_grad():
            out = lens.model(tr.input_ids[None], output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    preds = neurons.layer_predictions(tr, k=5)
    assert preds.position == len(tr) - 1 and preds.before.ids.shape == (lens.n_layers, 5)
    for layer in range(lens.n_layers):
        before = plain_probs(lens, ln2_in[layer]).topk(5)
        assert torch.equal(preds.before.ids[layer], before.indices)
        assert torch.allclose(preds.before.probs[layer], before.values, atol=1e-6)
    for layer in range(lens.n_layers - 1):  # after(l) is the input of block l + 1 = hidden_states[l + 1]
        after = plain_probs(lens, out.hidden_states[layer + 1][0, -1]).topk(5)
        assert torch.equal(preds.after.ids[layer], after.indices)
        assert torch.allclose(preds.after.probs[layer], after.values, atol=1e-6)
        # §1.11 #5 read literally (before(l+1) == after(l)) does not hold: layer l+1's attention sits between
        assert not torch.allclose(preds.before.probs[layer + 1], preds.after.probs[layer], atol=1e-6)
    # §1.11 #6: the last "after" is the model's own output distribution (the final norm applied once)
    last = torch.softmax(out.logits[0, -1].float(), -1).topk(5)
    assert torch.equal(preds.after.ids[-1], last.indices)
    assert torch.allclose(preds.after.probs[-1], last.values, atol=1e-6)
    assert int(preds.after.target_rank[-1]) == int((out.logits[0, -1] > out.logits[0, -1, tr.target_id]).sum())


def test_before_is_block_input_plus_attention_in_a_parallel_block(tiny_tokenizer):
    lens = lv.Lens(models.build("gpt_neox"), tiny_tokenizer)
    tr = lens.trace(PROMPT, target=" Paris")
    seen = {}
    hooks = []

    def block_input(mod, args, kw, layer):
        seen["pre", layer] = (args[0] if args else kw["hidden_states"])[0, -1].detach().clone()

    def attn_output(mod, args, out, layer):
        seen["attn", layer] = out[0][0, -1].detach().clone()

    for layer, block in enumerate(lens.adapter.blocks_of(lens.model)):
        hooks.append(block.register_forward_pre_hook(
            lambda mod, args, kw, layer=layer: block_input(mod, args, kw, layer), with_kwargs=True))
        hooks.append(block.get_submodule(lens.adapter.attn).register_forward_hook(
            lambda mod, args, out, layer=layer: attn_output(mod, args, out, layer)))
    try:
        with torch.no_grad():
            lens.model(tr.input_ids[None])
    finally:
        for h in hooks:
            h.remove()
    preds = neurons.layer_predictions(tr, k=4)
    for layer in range(lens.n_layers):
        ref = plain_probs(lens, seen[("pre", layer)] + seen[("attn", layer)]).topk(4)
        assert torch.equal(preds.before.ids[layer], ref.indices)


# projections of value vectors --------------------------------------------------------------------------
def test_value_projections_raw_folded_and_sign_corrected(tiny):
    w_u = tiny.unembed_module.weight.detach()
    gamma = tiny.final_norm_module.weight.detach()
    layer, dims = 1, [3, 0, 7]
    v = values_from_module(tiny, layer)[dims]  # [3, D]
    raw = v @ w_u.T  # [3, V]
    got = neurons.project_values(tiny, layer, dims, k=6)
    assert torch.equal(got.ids, raw.topk(6, dim=-1).indices)
    assert torch.allclose(got.logits, raw.topk(6, dim=-1).values.float(), atol=1e-6)
    folded = (v * gamma) @ w_u.T
    assert torch.equal(neurons.project_values(tiny, layer, dims, k=6, fold_norm=True).ids,
                       folded.topk(6, dim=-1).indices)
    signed = neurons.project_values(tiny, layer, dims, k=6, signs=torch.tensor([-0.5, 2.0, -1.0]))
    assert torch.equal(signed.ids[0], raw[0].topk(6, largest=False).indices)  # m < 0 promotes v E's bottom
    assert torch.equal(signed.ids[1], raw[1].topk(6).indices)
    assert torch.allclose(signed.logits[0], -raw[0].topk(6, largest=False).values.float(), atol=1e-6)
    one = neurons.project_values(tiny, layer, 7, k=2)
    assert one.ids.shape == (2,) and one.tokens == [tiny.tokenizer.decode([i]) for i in raw[2].topk(2).indices.tolist()]


def test_debugger_view_is_plain_data_matching_the_tensors(tiny):
    tr = tiny.trace(PROMPT, target=" Paris")
    view = neurons.debugger_view(tr, k=4, value_k=3)
    json.dumps(view)
    assert view["position"] == len(tr) - 1 and view["target"] == " Paris" and len(view["layers"]) == tiny.n_layers
    m = captured_coefficients(tiny, tr.input_ids)
    w_u = tiny.unembed_module.weight.detach()
    negatives = 0
    for layer, entry in enumerate(view["layers"]):
        after = plain_probs(tiny, tr.resid(layer, "post")[-1]).topk(4).indices.tolist()
        assert [d["id"] for d in entry["after"]] == after
        vals = values_from_module(tiny, layer)
        for item in entry["sub_updates"]:
            assert item["label"] == f"L{layer}D{item['dim']}"
            assert item["coeff"] == pytest.approx(float(m[layer, -1, item["dim"]]), abs=1e-12)
            s = 1.0 if item["coeff"] >= 0 else -1.0
            negatives += s < 0
            expected = (s * vals[item["dim"]] @ w_u.T).topk(3).indices.tolist()
            assert [t["id"] for t in item["tokens"]] == expected
    if tiny.adapter.mlp_gate is not None:  # SwiGLU coefficients take both signs: the sign path is exercised
        assert negatives > 0


# the value index ---------------------------------------------------------------------------------------
def brute_force_hits(lens, k, bottom=False):
    """{token: {(layer, dim, rank)}} from dense projections of every value vector."""
    hits = {}
    w_u = lens.unembed_module.weight.detach()
    for layer in range(lens.n_layers):
        logits = values_from_module(lens, layer) @ w_u.T  # [F, V]
        top = logits.topk(k, dim=-1, largest=not bottom).indices
        for dim, row in enumerate(top.tolist()):
            for rank, tok in enumerate(row):
                hits.setdefault(tok, set()).add((layer, dim, rank))
    return hits


def test_value_index_answers_like_brute_force(tiny, tmp_path):
    index = neurons.build_value_index(tiny, k=8, cache_dir=tmp_path)
    assert len(index) == tiny.n_layers * tiny.d_mlp
    expected = brute_force_hits(tiny, 8)
    for tok in (272, 0, 45, 300):  # " Paris" and a few others
        hits = index.query(tok, limit=None)
        assert {(h["layer"], h["dim"], h["rank"]) for h in hits} == expected.get(tok, set())
        assert all(h["token_id"] == tok and h["sign"] == 1 for h in hits)
        ranks = [h["rank"] for h in hits]
        assert ranks == sorted(ranks)
    for h in index.query(272, limit=None):
        stored = index.value_tokens(h["layer"], h["dim"])
        assert stored[h["rank"]]["id"] == 272 and stored[h["rank"]]["logit"] == pytest.approx(h["logit"])
    assert len(index.query(272, limit=2)) == min(2, len(expected.get(272, ())))


def test_value_index_string_and_list_queries(tiny, tmp_path):
    index = neurons.build_value_index(tiny, k=8, cache_dir=tmp_path)
    strings = [tiny.tokenizer.decode([i]) for i in range(tiny.vocab_size)]
    variants = [i for i, s in enumerate(strings) if s.strip().lower() == "paris"]
    assert 272 in variants and index.token_ids("PARIS") == variants
    by_str = {(h["layer"], h["dim"], h["token_id"]) for h in index.query("paris", limit=None)}
    by_ids = {(h["layer"], h["dim"], h["token_id"]) for t in variants for h in index.query(t, limit=None)}
    assert by_str == by_ids
    both = index.query([272, 45], limit=None)
    assert {h["token_id"] for h in both} <= {272, 45}
    assert len(both) == len(index.query(272, limit=None)) + len(index.query(45, limit=None))
    assert [h["rank"] for h in both] == sorted(h["rank"] for h in both)
    assert index.query("no such token anywhere") == []
    with pytest.raises(lv.LensvizError, match="vocabulary"):
        index.query(tiny.vocab_size)
    with pytest.raises(lv.LensvizError, match="limit"):
        index.query(272, limit=-1)


def test_value_index_bottom_entries_have_sign_minus_one(tiny, tmp_path):
    index = neurons.build_value_index(tiny, k=5, bottom=True, cache_dir=tmp_path)
    top, low = brute_force_hits(tiny, 5), brute_force_hits(tiny, 5, bottom=True)
    hits = index.query(272, limit=None)
    assert {(h["layer"], h["dim"], h["rank"]) for h in hits if h["sign"] == 1} == top.get(272, set())
    assert {(h["layer"], h["dim"], h["rank"]) for h in hits if h["sign"] == -1} == low.get(272, set())
    h = next(h for h in hits if h["sign"] == -1)
    assert index.value_tokens(h["layer"], h["dim"], sign=-1)[h["rank"]]["id"] == 272


def test_value_index_cache_is_reused_and_keyed_by_the_weights(tiny, tmp_path, monkeypatch):
    first = neurons.build_value_index(tiny, k=6, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("*.pt"))
    assert len(files) == 1

    def no_recompute(*args, **kwargs):
        raise AssertionError("recomputed despite a cache hit")

    monkeypatch.setattr(neurons, "_topk_logits", no_recompute)
    again = neurons.build_value_index(tiny, k=6, cache_dir=tmp_path)
    assert torch.equal(again.ids, first.ids) and torch.equal(again.order, first.order)
    assert again.query(272, limit=None) == first.query(272, limit=None)
    monkeypatch.undo()
    with torch.no_grad():  # any change to FF2 weights makes a new key, hence a new file
        module(tiny, 2, "mlp_out").weight[0, 0] += 0.01
    neurons.build_value_index(tiny, k=6, cache_dir=tmp_path)
    assert len(sorted(tmp_path.glob("*.pt"))) == 2
    monkeypatch.setenv("LENSVIZ_CACHE", str(tmp_path / "env"))
    assert neurons.default_cache_dir() == tmp_path / "env"
    neurons.build_value_index(tiny, k=6)
    assert len(list((tmp_path / "env").glob("*.pt"))) == 1
    neurons.build_value_index(tiny, k=6, cache_dir=tmp_path / "off", use_cache=False)
    assert not (tmp_path / "off").exists()


def test_bad_arguments_are_rejected(tiny):
    tr = tiny.trace(PROMPT)
    with pytest.raises(lv.LensvizError, match="dims"):
        neurons.sub_updates(tr, 0, tiny.d_mlp)
    with pytest.raises(lv.LensvizError, match="k must be"):
        neurons.top_sub_updates(tr, 0)
    with pytest.raises(lv.LensvizError, match="layer"):
        neurons.value_vectors(tiny, tiny.n_layers)
    with pytest.raises(lv.LensvizError, match="signs"):
        neurons.project_values(tiny, 0, [1, 2], signs=[1.0])


# the real model ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_sub_updates_in_float32(smol, tmp_path):
    tr = smol.trace(PROMPT, target=" Florence")
    m = captured_coefficients(smol, tr.input_ids)
    for layer in range(smol.n_layers):
        mlp, ff2 = module(smol, layer, "mlp"), module(smol, layer, "mlp_out")
        x = tr.mlp_input(layer)
        with torch.no_grad():
            clean = mlp(x)
        assert float((neurons.mlp_output(tr, layer) - clean).abs().max()) < 1e-4  # §1.11 #1
        subs = neurons.top_sub_updates(tr, 10, layers=[layer], positions=[-1])
        norms = ff2.weight.detach().norm(dim=0)  # down_proj columns are the values
        assert subs.dims[0, 0].tolist() == torch.argsort(m[layer, -1].abs() * norms, descending=True)[:10].tolist()
        dim = int(subs.dims[0, 0, 0])
        handle = ff2.register_forward_pre_hook(lambda mod, args: (args[0].index_fill(-1, torch.tensor([dim]), 0.0),))
        try:
            with torch.no_grad():
                switched = mlp(x)
        finally:
            handle.remove()
        # §1.11 #2 at float32: the BOS row carries massive activations (|out| up to ~2e4 on SmolLM2), so the
        # 1e-5 of the spec is taken relative to the output's scale (measured worst: 2.3e-7 relative)
        err = float((switched - clean + neurons.sub_updates(tr, layer, dim)[:, 0]).abs().max())
        assert err < 1e-6 * max(1.0, float(clean.abs().max()))
    index = neurons.build_value_index(smol, k=50, layers=[smol.n_layers - 1], cache_dir=tmp_path)
    hits = index.query(" Paris", limit=None)
    assert hits and all(h["layer"] == smol.n_layers - 1 for h in hits)
    w_u = smol.unembed_module.weight.detach()
    for h in hits[:5]:
        logits = w_u @ smol.adapter.part(smol.model, h["layer"], "mlp_out").weight.detach()[:, h["dim"]]
        assert int(logits.topk(50).indices[h["rank"]]) == h["token_id"]
