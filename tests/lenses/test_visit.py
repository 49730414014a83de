"""VISIT lens (research §3, §5 rows 16-17) against quantities recorded independently: plain forward hooks on
the HF modules during the same run, the raw weights read by their HF layout, autograd, and the oracle."""
from __future__ import annotations

import json
import time

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import lensviz as lv
from lensviz.lenses import visit
from tests import models, oracle
from tests.conftest import PROMPT

TOL = 1e-12  # research §5 row 16/17, float64


def rel(a, b):
    return float((a - b).norm() / b.norm())


def _first(x):
    return x[0] if isinstance(x, tuple) else x


# independent recording -----------------------------------------------------------------------------
def record(lens, prompt=PROMPT, target=" Paris"):
    """lens.trace with plain forward hooks that keep, per layer, what each HF module saw (batch 0)."""
    ad = lens.adapter
    rec = {n: {} for n in ("block_in", "block_out", "ln1_in", "ln1_out", "ln2_in", "ln2_out", "attn_out",
                           "o_in", "mlp_out", "a")}
    handles = []

    def keep(name, layer, what):
        def hook(mod, args, out):
            x = args[0] if what == "in" else _first(out)
            rec[name][layer] = x[0].detach().clone()
        return hook

    for layer, block in enumerate(ad.blocks_of(lens.model)):
        def pre(mod, args, kwargs, layer=layer):
            rec["block_in"][layer] = (args[0] if args else kwargs["hidden_states"])[0].detach().clone()

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(keep("block_out", layer, "out")))
        for part, name, what in (("ln1", "ln1_in", "in"), ("ln1", "ln1_out", "out"), ("ln2", "ln2_in", "in"),
                                 ("ln2", "ln2_out", "out"), ("attn", "attn_out", "out"), ("o_proj", "o_in", "in"),
                                 ("mlp", "mlp_out", "out"), ("mlp_out", "a", "in")):
            handles.append(block.get_submodule(getattr(ad, part)).register_forward_hook(keep(name, layer, what)))
    try:
        tr = lens.trace(prompt, target=target)
    finally:
        for h in handles:
            h.remove()
    return tr, rec


def module(lens, layer, part):
    return lens.adapter.blocks_of(lens.model)[layer].get_submodule(getattr(lens.adapter, part))


def w_o_head(lens, layer, h):
    """W_O,h [d, D] read off the raw o_proj weight by its HF class (Conv1D [in, out], Linear [out, in])."""
    m, d = module(lens, layer, "o_proj"), lens.d_head
    w = m.weight.detach()
    return w[h * d:(h + 1) * d] if isinstance(m, Conv1D) else w[:, h * d:(h + 1) * d].T


def mlp_matrix(lens, layer, part):
    """An MLP weight as [in, out] read by its HF class."""
    m = module(lens, layer, part)
    return m.weight.detach() if isinstance(m, Conv1D) else m.weight.detach().T


def projections(lens, layer, x):
    """Pre-RoPE q [H, T, d] and k, v [H_kv, T, d] from the HF projection modules applied to x [T, D]."""
    with torch.set_grad_enabled(x.requires_grad):
        return _projections(lens, layer, x)


def _projections(lens, layer, x):
    ad, h, hkv, d = lens.adapter, lens.n_heads, lens.n_kv_heads, lens.d_head
    t = x.shape[0]
    if ad.qkv is None:
        q, k, v = (module(lens, layer, f"{n}_proj")(x) for n in "qkv")
    else:
        out = module(lens, layer, "qkv")(x)
        if ad.qkv_split == "concat":  # GPT-2 c_attn: [q | k | v]
            q, k, v = out.split(h * d, dim=-1)
        else:  # GPT-NeoX: per head [q k v]
            q, k, v = (c.reshape(t, h * d) for c in out.view(t, h, 3 * d).chunk(3, dim=-1))
    return (q.view(t, h, d).transpose(0, 1), k.view(t, hkv, d).transpose(0, 1), v.view(t, hkv, d).transpose(0, 1))


def full_probs(lens, v):
    with torch.no_grad():
        return torch.softmax(lens.unembed_module(lens.final_norm_module(v)).double(), -1)


@pytest.fixture(scope="module", params=[f for f in models.FAMILIES if f != "qwen2"])  # qwen2: QK test only
def run(request, tiny_tokenizer):
    lens = lv.Lens(models.build(request.param), tiny_tokenizer)
    tr, rec = record(lens)
    return lens, tr, rec


# research §3.2 / §5 row 16: decomposition identities ----------------------------------------------
def test_attention_output_is_the_sum_of_heads_and_heads_the_sum_of_memory_values(run):
    lens, tr, rec = run
    d, n_rep = lens.d_head, lens.n_heads // lens.n_kv_heads
    for layer in range(lens.n_layers):
        _, _, v = projections(lens, layer, rec["ln1_out"][layer])  # v is never rotated
        for t in (len(tr) - 1, 4):
            parts = visit.attention_parts(tr, layer, t)
            assert rel(parts.output, rec["attn_out"][layer][t]) < TOL  # attn_out == sum_h O_h W_O,h + b
            assert (parts.bias is None) == (module(lens, layer, "o_proj").bias is None)
            for h in range(lens.n_heads):
                o_h = rec["o_in"][layer][t, h * d:(h + 1) * d]
                assert rel(parts.o[h], o_h) < TOL  # O_h,t == sum_j A v_j (GQA kv head h // n_rep)
                assert rel(parts.head_out[h], o_h @ w_o_head(lens, layer, h)) < TOL
                mem = v[h // n_rep] @ w_o_head(lens, layer, h)  # [T, D]
                assert rel(parts.memory_values[h], mem) < TOL
                # O_h,t W_O,h == sum_j A_h[t, j] v_j W_O,h with the model's own O
                assert rel((parts.attention[h, :, None] * mem).sum(0), o_h @ w_o_head(lens, layer, h)) < TOL
            assert torch.all(parts.attention[:, t + 1:] == 0)


def test_gqa_memory_values_use_the_kv_head_of_each_query_head(tiny_tokenizer):
    lens = lv.Lens(models.build("llama"), tiny_tokenizer)
    tr, rec = record(lens)
    parts = visit.attention_parts(tr, 1)
    _, _, v = projections(lens, 1, rec["ln1_out"][1])
    wrong = v[1] @ w_o_head(lens, 1, 0)  # query head 0 reads kv head 0, not 1
    assert rel(parts.memory_values[0], wrong) > 0.1


def test_attention_parts_follow_a_head_ablation(tiny_tokenizer):
    lens = lv.Lens(models.build("llama"), tiny_tokenizer)
    ad = lens.adapter
    seen = {}
    hook = ad.blocks_of(lens.model)[1].get_submodule(ad.attn).register_forward_hook(
        lambda m, a, o: seen.__setitem__("out", _first(o)[0].detach().clone()))
    try:
        tr = lens.trace(PROMPT, target=" Paris", patches=[lv.HeadAblation(1, [0, 3])])
    finally:
        hook.remove()
    parts = visit.attention_parts(tr, 1)
    assert torch.all(parts.o[[0, 3]] == 0) and torch.all(parts.head_out[[0, 3]] == 0)
    assert rel(parts.output, seen["out"][-1]) < TOL
    g = visit.visit_graph(tr, layers=1, n_heads=2)
    assert {n["head"] for n in g["nodes"] if n["kind"] == "head_output"} == {1, 2}


def test_mlp_output_is_the_sum_of_activation_weighted_values(run):
    lens, tr, rec = run
    for layer in range(lens.n_layers):
        w_in, w_out = mlp_matrix(lens, layer, "mlp_in"), mlp_matrix(lens, layer, "mlp_out")  # [D, F], [F, D]
        for t in (len(tr) - 1, 2):
            parts = visit.mlp_parts(tr, layer, t)
            assert rel(parts.output, rec["mlp_out"][layer][t]) < TOL  # mlp_out == sum_n a_n value_n + b
            assert torch.equal(parts.activation, rec["a"][layer][t])
            for n in (0, 7, lens.d_mlp - 1):
                assert torch.equal(parts.values[n], w_out[n]) and torch.equal(parts.keys[n], w_in[:, n])
            assert (parts.gate_keys is None) == (lens.adapter.mlp_gate is None)


def test_block_output_is_input_plus_attention_plus_mlp(run):
    lens, tr, rec = run
    parallel = lens.adapter.is_parallel(lens.model.config)
    for layer in range(lens.n_layers):
        for t in (len(tr) - 1, 0, 5):
            vec = visit.block_vectors(tr, layer, t)
            assert rel(vec["block_input"], rec["block_in"][layer][t]) < TOL
            total = vec["block_input"] + vec["attn_output"] + vec["mlp_output"]
            assert rel(total, rec["block_out"][layer][t]) < TOL
            assert rel(vec["attn_input"], rec["ln1_out"][layer][t]) < TOL
            assert rel(vec["mlp_input"], rec["ln2_out"][layer][t]) < TOL
            if parallel:
                assert vec["residual_after_attn"] is None
            else:
                assert rel(vec["residual_after_attn"], rec["ln2_in"][layer][t]) < TOL


# research §3.2 correctness note / §5 row 17: the QK bilinear forms ---------------------------------
def test_query_and_key_directions_are_exact_on_gpt2(tiny_tokenizer):
    lens = lv.Lens(models.build("gpt2"), tiny_tokenizer)
    tr, rec = record(lens)
    ref = oracle.run(lens.model, tr.input_ids, tr.target_id)
    q_cap, k_cap, _ = tr.qkv(2)  # no RoPE: the captured q, k are the ones scored
    x = rec["ln1_out"][2]
    for t in (len(tr) - 1, 6):
        qk = visit.qk_forms(tr, 2, t)
        assert qk.approx is False and qk.note == "exact"
        truth = torch.einsum("hd,hjd->hj", q_cap[:, t], k_cap)  # q_h . k_j
        assert rel(truth, ref["S"][2][0][:, t].detach()) < TOL
        via_q = x @ qk.q_dir.T + qk.q_bias  # x_j . (W_K,h q_h) + b_K . q_h
        via_k = torch.einsum("D,hjD->hj", x[t], qk.k_dir) + qk.k_bias  # x_t . (W_Q,h k_j) + b_Q . k_j
        assert rel(via_q.T, truth) < TOL and rel(via_k, truth) < TOL
        assert rel(qk.scores, truth) < TOL


def test_transposed_query_form_of_the_original_code_is_wrong_on_gpt2(tiny_tokenizer):
    """Guard: VISIT's pre_project_q computes q @ W_K; the right direction is W_K q (research §3.2)."""
    lens = lv.Lens(models.build("gpt2"), tiny_tokenizer)
    tr, rec = record(lens)
    big_d, layer, t = lens.d_model, 1, len(tr) - 1
    c_attn = module(lens, layer, "qkv")
    w_k, b_k = c_attn.weight.detach()[:, big_d:2 * big_d], c_attn.bias.detach()[big_d:2 * big_d]
    q_cap, k_cap, _ = tr.qkv(layer)
    q_full = q_cap[:, t].reshape(-1)  # heads concatenated, [H*d] = [D]
    truth = torch.einsum("hd,hjd->j", q_cap[:, t], k_cap)  # sum over heads of q_h . k_j
    x = rec["ln1_out"][layer]
    wrong = x @ (q_full @ w_k) + b_k @ q_full
    right = x @ (w_k @ q_full) + b_k @ q_full
    assert rel(wrong, truth) > 0.1
    assert rel(right, truth) < TOL
    assert rel(visit.qk_forms(tr, layer, t).q_dir.sum(0), w_k @ q_full) < TOL


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
def test_qk_forms_on_rotary_families_use_pre_rope_vectors_and_are_labelled_approx(family, tiny_tokenizer):
    lens = lv.Lens(models.build(family), tiny_tokenizer)
    tr, rec = record(lens)
    n_rep = lens.n_heads // lens.n_kv_heads
    for layer in (0, 2):
        x = rec["ln1_out"][layer]
        q_pre, k_pre, _ = projections(lens, layer, x)
        q_rot, k_rot, _ = tr.qkv(layer)
        t = len(tr) - 1
        qk = visit.qk_forms(tr, layer, t)
        assert qk.approx is True and qk.note == "approx (RoPE ignored)"
        kv = torch.arange(lens.n_heads) // n_rep
        truth = torch.einsum("hd,hjd->hj", q_pre[:, t], k_pre[kv])  # pre-RoPE q_h . k_{g(h), j}
        via_q = (x @ qk.q_dir.T + qk.q_bias).T
        via_k = torch.einsum("D,hjD->hj", x[t], qk.k_dir) + qk.k_bias
        assert rel(via_q, truth) < TOL and rel(via_k, truth) < TOL
        rotated = torch.einsum("hd,hjd->hj", q_rot[:, t], k_rot[kv])  # what the model scored
        # same position: the rotations cancel (up to HF's float32 cos/sin tables, ~1e-8)
        assert rel(via_q[:, t], rotated[:, t]) < 1e-6
        assert rel(via_q[:, :t], rotated[:, :t]) > 1e-3  # elsewhere it is only an approximation


# research §3.1: the graph --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graphs(run):
    lens, tr, rec = run
    g = visit.visit_graph(tr, position=-1, layers=[1], n_heads=2)
    return g, {n["id"]: n for n in g["nodes"]}, {(e["source"], e["target"]): e for e in g["edges"]}


def test_edge_weights_follow_the_visit_rules(run, graphs):
    lens, tr, rec = run
    g, _, edges = graphs
    layer, t, d = 1, len(tr) - 1, lens.d_head
    p = "L1."

    def weight(src, dst):
        return edges[(p + src, p + dst)]["weight"]

    ref = oracle.run(lens.model, tr.input_ids, tr.target_id)
    a_ref = ref["A"][layer][0, :, t].detach()  # [H, T]
    o = rec["o_in"][layer][t]
    o_norms = o.view(lens.n_heads, d).norm(dim=-1)
    shown = sorted(int(n["head"]) for n in g["nodes"] if n["kind"] == "head_output")
    assert shown == sorted(o_norms.topk(2).indices.tolist())  # the 2 heads with the largest |O_h|
    # residual and norm links: L2 norms of the vectors
    block_in, attn_out = rec["block_in"][layer][t], rec["attn_out"][layer][t]
    assert weight("block_input", "attn_input") == pytest.approx(float(block_in.norm()), rel=TOL)
    assert weight("mlp_output", "block_output") == pytest.approx(float(rec["mlp_out"][layer][t].norm()), rel=TOL)
    if lens.adapter.is_parallel(lens.model.config):
        assert weight("attn_output", "block_output") == pytest.approx(float(attn_out.norm()), rel=TOL)
        assert weight("block_input", "block_output") == pytest.approx(float(block_in.norm()), rel=TOL)
        assert edges[(p + "block_input", p + "mlp_input")]["kind"] == "ln"
    else:
        mid = rec["ln2_in"][layer][t]
        assert weight("attn_output", "residual_after_attn") == pytest.approx(float(attn_out.norm()), rel=TOL)
        assert weight("residual_after_attn", "mlp_input") == pytest.approx(float(mid.norm()), rel=TOL)
        assert weight("residual_after_attn", "block_output") == pytest.approx(float(mid.norm()), rel=TOL)
    # heads: query direction by autograd, memory entries by the oracle's A
    x = rec["ln1_out"][layer]
    q_pre, _, v = projections(lens, layer, x)
    for h in shown:
        hp, kvh = f"H{h}.", h // (lens.n_heads // lens.n_kv_heads)
        xj = x[0].clone().requires_grad_(True)
        k_of_x = projections(lens, layer, xj[None])[1][kvh, 0]
        q_dir = torch.autograd.grad(k_of_x @ q_pre[h, t].detach(), xj)[0]  # d(q_h . k(x))/dx = W_K q_h
        assert weight("qkv", hp + "q") == pytest.approx(0.2 * float(q_dir.norm()), rel=1e-10)
        head_out = o[h * d:(h + 1) * d] @ w_o_head(lens, layer, h)
        assert weight(hp + "out", "concat") == pytest.approx(1.8 * float(head_out.norm()), rel=TOL)
        top_j = a_ref[h, :t + 1].topk(2).indices.tolist()
        keys = [n["position"] for n in g["nodes"] if n["kind"] == "memory_key" and n["head"] == h]
        assert sorted(keys) == sorted(top_j)
        for j in top_j:
            a = float(a_ref[h, j])
            assert weight(hp + "q", f"{hp}key{j}") == pytest.approx(max(10 * a, 0.51), rel=1e-10)
            assert weight(f"{hp}key{j}", f"{hp}value{j}") == pytest.approx(max(10 * a, 0.51), rel=1e-10)
            mem = v[kvh, j] @ w_o_head(lens, layer, h)
            expected = max(1.3 * a * float(mem.norm()), 0.51)
            assert weight(f"{hp}value{j}", hp + "out") == pytest.approx(expected, rel=1e-10)
    # W_O neurons: top 18 / bottom 7 of O[n] * |W_O[n]|
    m = module(lens, layer, "o_proj")
    rows = m.weight.detach() if isinstance(m, Conv1D) else m.weight.detach().T  # [H*d, D]
    score = o * rows.norm(dim=-1)
    chosen = [n["neuron"] for n in g["nodes"] if n["kind"] == "wo_neuron"]
    top = score.argsort(descending=True)[:18].tolist()
    assert chosen[:18] == top
    assert sorted(chosen[18:]) == sorted([i for i in score.argsort().tolist() if i not in top][:7])
    for n in chosen[:3] + chosen[-3:]:
        assert weight(f"wo{n}", "attn_output") == pytest.approx(abs(float(o[n])) * float(rows[n].norm()), rel=TOL)
        assert weight("concat", f"wo{n}") == 7.0
        assert edges[(p + "concat", f"{p}wo{n}")]["sign"] == (1 if o[n] >= 0 else -1)
    # MLP neurons: key -> value 1.5 |a_n|, value -> mlp_output |a_n| |value_n|
    a_mlp, w_out = rec["a"][layer][t], mlp_matrix(lens, layer, "mlp_out")
    mscore = a_mlp * w_out.norm(dim=-1)
    picked = [n["neuron"] for n in g["nodes"] if n["kind"] == "mlp_value"]
    top = mscore.argsort(descending=True)[:18].tolist()
    assert picked[:18] == top
    assert sorted(picked[18:]) == sorted([i for i in mscore.argsort().tolist() if i not in top][:7])
    for n in picked[:3] + picked[-3:]:
        assert weight(f"key{n}", f"value{n}") == pytest.approx(1.5 * abs(float(a_mlp[n])), rel=TOL)
        expected = abs(float(a_mlp[n])) * float(w_out[n].norm())
        assert weight(f"value{n}", "mlp_output") == pytest.approx(expected, rel=TOL)
        assert weight("mlp_input", f"key{n}") == 7.0
    # biases
    if m.bias is not None:
        assert weight("attn_bias", "attn_output") == pytest.approx(float(m.bias.detach().norm()), rel=TOL)
    b2 = module(lens, layer, "mlp_out").bias
    if b2 is not None:
        assert weight("mlp_out_bias", "mlp_output") == pytest.approx(float(b2.detach().norm()), rel=TOL)


def test_nodes_are_labelled_by_their_projection(run, graphs):
    lens, tr, rec = run
    g, nodes, _ = graphs
    layer, t, d = 1, len(tr) - 1, lens.d_head
    o = rec["o_in"][layer][t]
    for n in (n for n in g["nodes"] if n["kind"] == "head_output"):
        h = n["head"]
        p = full_probs(lens, o[h * d:(h + 1) * d] @ w_o_head(lens, layer, h))
        assert [e["id"] for e in n["top"]] == p.topk(5).indices.tolist()
        assert n["label"] == lens.tokenizer.decode([int(p.argmax())])
        assert n["target_rank"] == int((p > p[tr.target_id]).sum())
        assert n["target_prob"] == pytest.approx(float(p[tr.target_id]), rel=1e-9)
        assert n["entropy"] == pytest.approx(float(-(p * p.log2()).sum()), rel=1e-9)
    w_out = mlp_matrix(lens, layer, "mlp_out")
    values = [n for n in g["nodes"] if n["kind"] == "mlp_value"]
    negative = [n for n in values if n["activation"] < 0]
    assert negative, "the bottom-7 neurons of a random model include negative activations"
    for n in negative:  # labelled by the least probable token of proj(value_n)
        p = full_probs(lens, w_out[n["neuron"]])
        assert n["label"] == lens.tokenizer.decode([int(p.argmin())]) == n["bottom"][0]["token"]
    for n in (n for n in values if n["activation"] > 0):
        assert n["label"] == lens.tokenizer.decode([int(full_probs(lens, w_out[n["neuron"]]).argmax())])
    x = nodes["L1.block_input"]
    assert x["norm"] == pytest.approx(float(rec["block_in"][layer][t].norm()), rel=TOL)


def test_graph_holds_the_requested_layers_and_is_json(run):
    lens, tr, rec = run
    parallel = lens.adapter.is_parallel(lens.model.config)
    g = visit.visit_graph(tr, position=6, layers=[2, 0], n_heads=1, n_memory=3, n_wo_top=2, n_wo_bottom=1,
                          n_mlp_top=3, n_mlp_bottom=2)
    back = json.loads(json.dumps(g, allow_nan=False))
    assert back == g
    assert g["layers"] == [0, 2] and g["position"] == 6 and g["token"] == tr.tokens[6]
    assert {n["layer"] for n in g["nodes"]} == {0, 2}
    ids = [n["id"] for n in g["nodes"]]
    assert len(ids) == len(set(ids))
    assert all(e["source"] in ids and e["target"] in ids for e in g["edges"])
    assert all(e["weight"] >= 0 for e in g["edges"])
    kinds = [n["kind"] for n in g["nodes"]]
    assert kinds.count("head_output") == 2 and kinds.count("memory_value") == 6
    assert kinds.count("wo_neuron") == 6 and kinds.count("mlp_value") == 10
    assert kinds.count("residual_after_attn") == (0 if parallel else 2)
    assert all(n["position"] <= 6 for n in g["nodes"] if n["kind"] in ("memory_key", "memory_value"))
    assert ("L0.block_output", "L2.block_input") in {(e["source"], e["target"]) for e in g["edges"]}
    for n in g["nodes"]:
        assert {"id", "kind", "label", "top", "target_rank", "layer", "head"} <= set(n)
        assert len(n["top"]) == 5 and n["label"] in (n["top"][0]["token"], n.get("bottom", [{}])[0].get("token"))
    approx = [n["approx"] for n in g["nodes"] if n["kind"] in ("qkv", "head_query", "memory_key")]
    assert set(approx) == {lens.adapter.rotary}
    # consecutive layers share the residual node between them
    g2 = visit.visit_graph(tr, layers=[1, 2], n_heads=1)
    ids2 = {n["id"] for n in g2["nodes"]}
    assert "L2.block_input" not in ids2 and ("L1.block_output", "L2.attn_input") in {
        (e["source"], e["target"]) for e in g2["edges"]}
    assert {n["layer"] for n in g2["nodes"]} == {1, 2}


def test_parallel_blocks_feed_both_sublayers_from_the_block_input(tiny_tokenizer):
    lens = lv.Lens(models.build("gpt_neox"), tiny_tokenizer)
    assert lens.adapter.is_parallel(lens.model.config)
    g = visit.visit_graph(lens.trace(PROMPT, target=" Paris"), layers=1, n_heads=1)
    ln = {(e["source"], e["target"]) for e in g["edges"] if e["kind"] == "ln"}
    assert ln == {("L1.block_input", "L1.attn_input"), ("L1.block_input", "L1.mlp_input")}
    into_out = {e["source"] for e in g["edges"] if e["target"] == "L1.block_output"}
    assert into_out == {"L1.block_input", "L1.attn_output", "L1.mlp_output"}


# research §3.3: the LN semantic filter ---------------------------------------------------------------
def test_ln_filter_equals_direct_computation(run):
    lens, tr, rec = run
    f = visit.ln_filter(tr, k=10)
    assert f.jaccard.shape == (lens.n_layers, 2, len(tr))
    tid = tr.target_id
    for layer in range(lens.n_layers):
        for i, (a, b) in enumerate((("ln1_in", "ln1_out"), ("ln2_in", "ln2_out"))):
            p, q = full_probs(lens, rec[a][layer]), full_probs(lens, rec[b][layer])  # [T, V]
            for t in range(len(tr)):
                sp, sq = set(p[t].topk(10).indices.tolist()), set(q[t].topk(10).indices.tolist())
                assert float(f.jaccard[layer, i, t]) == pytest.approx(len(sp & sq) / len(sp | sq), abs=1e-15)
            rank_p = (p > p[:, tid:tid + 1]).sum(-1)
            rank_q = (q > q[:, tid:tid + 1]).sum(-1)
            assert torch.equal(f.rank_in[layer, i], rank_p) and torch.equal(f.rank_out[layer, i], rank_q)
            assert torch.equal(f.rank_change[layer, i], rank_q - rank_p)
            kl = torch.nn.functional.kl_div(q.log(), p, reduction="none").sum(-1)  # KL(p || q)
            assert torch.allclose(f.kl[layer, i], kl, rtol=1e-9, atol=1e-14)
    g = visit.visit_graph(tr, layers=[2], n_heads=1)
    e = next(e for e in g["edges"] if e["kind"] == "ln" and e["target"] == "L2.attn_input")
    assert e["filter"] == f.at(2, "ln1", len(tr) - 1)


def test_neuron_activity_counts_tokens_directly(tiny_tokenizer):
    lens = lv.Lens(models.build("llama"), tiny_tokenizer)
    traces = [lens.trace(PROMPT), lens.trace("The capital of Japan is the city of")]
    act = visit.neuron_activity(traces, 1, tau=0.05, min_freq=0.9, min_sign=0.9)
    a = torch.cat([tr.mlp_activations(1) for tr in traces])
    norms = module(lens, 1, "mlp_out").weight.detach().norm(dim=0)  # down_proj [D, F]: value n = column n
    assert act.n_tokens == a.shape[0] and act.heuristic is True
    assert torch.allclose(act.frequency, (a.abs() > 0.05).double().mean(0), atol=0)
    assert torch.allclose(act.mean_contribution, (a * norms).mean(0).double(), rtol=1e-12)
    expected = []
    for n in range(lens.d_mlp):
        col = a[:, n][a[:, n].abs() > 0.05]
        if len(col) / a.shape[0] > 0.9 and abs(float(torch.sign(col).mean())) >= 0.9:
            expected.append(n)
    assert sorted(act.candidates.tolist()) == expected
    c = act.mean_contribution[act.candidates].abs()
    assert torch.all(c[:-1] >= c[1:])


def test_head_summaries_read_each_head(run):
    lens, tr, rec = run
    layer, t, d = 2, len(tr) - 1, lens.d_head
    out = visit.head_summaries(tr, layer, n_memory=2)
    assert [s["head"] for s in out] == list(range(lens.n_heads))
    json.dumps(out, allow_nan=False)
    ref = oracle.run(lens.model, tr.input_ids, tr.target_id)["A"][layer][0, :, t].detach()
    o = rec["o_in"][layer][t]
    for s in out:
        h = s["head"]
        assert s["o_norm"] == pytest.approx(float(o[h * d:(h + 1) * d].norm()), rel=TOL)
        p = full_probs(lens, o[h * d:(h + 1) * d] @ w_o_head(lens, layer, h))
        assert [e["id"] for e in s["output"]["top"]] == p.topk(5).indices.tolist()
        assert [m["position"] for m in s["memory"]] == ref[h, :t + 1].topk(2).indices.tolist()
        assert s["query"]["approx"] is lens.adapter.rotary


def test_bad_arguments_are_rejected(tiny_tokenizer):
    lens = lv.Lens(models.build("gpt2"), tiny_tokenizer)
    tr = lens.trace(PROMPT)
    with pytest.raises(lv.LensvizError, match="position"):
        visit.visit_graph(tr, position=len(tr))
    with pytest.raises(lv.LensvizError, match="layer"):
        visit.visit_graph(tr, layers=[0, 3])
    with pytest.raises(lv.LensvizError, match="layers"):
        visit.visit_graph(tr, layers=[])
    with pytest.raises(lv.LensvizError, match="n_heads"):
        visit.visit_graph(tr, n_heads=-1)
    with pytest.raises(lv.LensvizError, match="scales"):
        visit.visit_graph(tr, scales={"attn": 3})
    g = visit.visit_graph(tr, layers=-1, n_heads=1, scales={"attention": 20.0})
    assert g["layers"] == [2] and g["scales"]["attention"] == 20.0
    assert all(e["weight"] == max(20 * e["attention"], 0.51) for e in g["edges"]
               if e["kind"] == "attention")


# SmolLM2 (research §5 row 16, float32 column) --------------------------------------------------------
@pytest.mark.slow
def test_smollm2_decompositions_in_float32_and_a_three_layer_graph(smol):
    tr, rec = record(smol, target=" Florence")
    t = len(tr) - 1
    for layer in (0, 15, 29):
        attn, mlp = visit.attention_parts(tr, layer), visit.mlp_parts(tr, layer)
        assert rel(attn.output, rec["attn_out"][layer][t]) < 1e-5
        assert rel(attn.o.reshape(-1), rec["o_in"][layer][t]) < 1e-5
        assert rel(mlp.output, rec["mlp_out"][layer][t]) < 1e-5
        vec = visit.block_vectors(tr, layer, attn=attn, mlp=mlp)
        assert rel(vec["block_input"] + attn.output + mlp.output, rec["block_out"][layer][t]) < 1e-5
    start = time.perf_counter()
    g = visit.visit_graph(tr, layers=[20, 21, 22])
    elapsed = time.perf_counter() - start
    json.dumps(g, allow_nan=False)
    assert {n["layer"] for n in g["nodes"]} == {20, 21, 22}
    assert sum(n["kind"] == "head_output" for n in g["nodes"]) == 27  # n_heads=10 capped at 9 heads
    assert elapsed < 60, f"3-layer graph took {elapsed:.1f} s"
