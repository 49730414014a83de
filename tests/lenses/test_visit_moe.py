"""VISIT on mixture-of-experts models (tiny float64 Mixtral / Qwen3-MoE / gpt-oss of the conformance suite):
the MLP nodes are the (expert, neuron) pairs of the experts routed at the position. Checked against HF's
own modules: the MoE block's recorded output, the experts module run per expert, each expert's FF2 input
read off that module by autograd, and the raw expert weights read by their HF layout; the neuron selection
and edge widths against a brute force over every routed neuron."""
from __future__ import annotations

import json

import pytest
import torch

import lensviz as lv
from lensviz.lenses import experts as ex, visit
from tests import models
from tests.conftest import PROMPT
from tests.test_conformance import build

TARGET = " Paris"
TOL = 1e-12


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe", "gpt_oss"])
def run(request):
    """(lens, trace, rec): rec holds what HF's modules saw in the same run, per layer: the MoE block's output
    and the experts module's inputs (hidden states, chosen experts, router weights)."""
    lens = lv.Lens(build(request.param), models.tokenizer())
    ad, rec, handles = lens.adapter, {"moe_out": {}, "experts_in": {}}, []
    for layer, block in enumerate(ad.blocks_of(lens.model)):
        def moe(mod, args, out, layer=layer):
            rec["moe_out"][layer] = (out[0] if isinstance(out, tuple) else out)[0].detach().clone()

        def experts(mod, args, out, layer=layer):
            rec["experts_in"][layer] = tuple(a.detach().clone() for a in args[:3])

        handles.append(block.get_submodule(ad.mlp).register_forward_hook(moe))
        handles.append(block.get_submodule(ad.experts).register_forward_hook(experts))
    try:
        tr = lens.trace(PROMPT, target=TARGET)
    finally:
        for h in handles:
            h.remove()
    return lens, tr, rec


def experts_module(lens, layer):
    return lens.adapter.blocks_of(lens.model)[layer].get_submodule(lens.adapter.experts)


def hf_activation(lens, layer, e, x):
    """Expert e's FF2 input a_e(x) at one token x [D], from HF's experts module by autograd (its output is
    a @ W_down,e (+ b), so d output[0] / d W_down,e holds a in the slot of output 0)."""
    down = experts_module(lens, layer).down_proj
    flag = down.requires_grad
    down.requires_grad_(True)
    try:
        out = experts_module(lens, layer)(x[None], torch.tensor([[e]]), torch.ones(1, 1, dtype=x.dtype))
        (grad,) = torch.autograd.grad(out[0, 0], down)
    finally:
        down.requires_grad_(flag)
    # Mixtral / Qwen3-MoE down_proj [E, D, F] (row 0 = output 0); gpt-oss (the one with biases) [E, F, D]
    return grad[e][:, 0] if hasattr(experts_module(lens, layer), "down_proj_bias") else grad[e, 0]


def raw_expert(lens, layer, e):
    """(values [F, D], up keys [F, D], gate keys [F, D], up bias [F] or None, out bias [D] or None) of expert e,
    read off the HF parameters by their layout: Mixtral / Qwen3-MoE gate_up_proj [E, 2F, D] (gate rows, then
    up rows), down_proj [E, D, F]; gpt-oss gate_up_proj [E, D, 2F] (gate = even, up = odd columns) with
    biases, down_proj [E, F, D]."""
    m = experts_module(lens, layer)
    gu, down = m.gate_up_proj.detach()[e], m.down_proj.detach()[e]
    if hasattr(m, "gate_up_proj_bias"):
        return (down, gu[:, 1::2].T, gu[:, ::2].T, m.gate_up_proj_bias.detach()[e][1::2],
                m.down_proj_bias.detach()[e])
    f = gu.shape[0] // 2
    return down.T, gu[f:], gu[:f], None, None


def full_probs(lens, v):
    with torch.no_grad():
        return torch.softmax(lens.unembed_module(lens.final_norm_module(v)).double(), -1)


@pytest.mark.parametrize("position", [-1, 4])
def test_expert_mlp_parts_equal_hfs_modules(run, position):
    lens, tr, rec = run
    layer = 1
    t = position % len(tr)
    x, idx, w = rec["experts_in"][layer]
    p = visit.mlp_parts(tr, layer, position)
    f = lens.d_mlp
    assert p.keys.shape == p.values.shape == p.gate_keys.shape == (2 * f, lens.d_model)
    assert rel(p.output, rec["moe_out"][layer][t]) < TOL  # the MoE block's real output
    assert torch.equal(p.experts, idx[t].repeat_interleave(f)) and torch.equal(p.neurons, torch.arange(f).repeat(2))
    module = experts_module(lens, layer)
    for i, e in enumerate(idx[t].tolist()):
        rows = slice(i * f, (i + 1) * f)
        values, up, gate, b_up, b_out = raw_expert(lens, layer, e)
        assert rel(p.activation[rows], hf_activation(lens, layer, e, x[t])) < TOL
        assert rel(p.values[rows], w[t, i] * values) < TOL  # router weight folded in
        assert torch.equal(p.keys[rows], up) and torch.equal(p.gate_keys[rows], gate)
        assert torch.equal(p.weights[rows], w[t, i].expand(f).to(p.weights.dtype))
        if b_up is not None:
            assert torch.equal(p.bias_in[rows], b_up)
        # the expert's neurons with its bias give its real (weighted) output, computed by HF's module
        with torch.no_grad():
            real = module(x[t][None], idx[t][None, i:i + 1], w[t][None, i:i + 1])[0]
        part = p.activation[rows] @ p.values[rows] + (0 if b_out is None else w[t, i] * b_out)
        assert rel(part, real) < TOL
    assert (p.bias_out is None) == (b_out is None)
    # block decomposition: input + attention + MLP == output
    v = visit.block_vectors(tr, layer, position)
    assert rel(v["block_input"] + v["attn_output"] + v["mlp_output"], v["block_output"]) < TOL


def test_expert_neurons_in_the_graph_follow_a_brute_force(run):
    lens, tr, rec = run
    layer, t, n_top, n_bottom = 1, len(tr) - 1, 5, 3
    x, idx, w = rec["experts_in"][layer]
    brute = []  # (score, expert, neuron, a, w v) over every neuron of the routed experts
    for i, e in enumerate(idx[t].tolist()):
        a = hf_activation(lens, layer, e, x[t])
        values = raw_expert(lens, layer, e)[0]
        for n in range(lens.d_mlp):
            wv = w[t, i] * values[n]
            brute.append((float(a[n] * wv.norm()), e, n, float(a[n]), wv))
    order = sorted(brute, key=lambda b: -b[0])
    top, bottom = order[:n_top], sorted(order[n_top:], key=lambda b: b[0])[:n_bottom]
    g = visit.visit_graph(tr, position=t, layers=[layer], n_mlp_top=n_top, n_mlp_bottom=n_bottom)
    json.dumps(g)
    values = [n for n in g["nodes"] if n["kind"] == "mlp_value"]
    keys = [n for n in g["nodes"] if n["kind"] == "mlp_key"]
    got = [(n["expert"], n["neuron"]) for n in values]
    assert got[:n_top] == [(e, n) for _, e, n, _, _ in top]
    assert sorted(got[n_top:]) == sorted((e, n) for _, e, n, _, _ in bottom)
    assert [(n["expert"], n["neuron"]) for n in keys] == got
    edges = {(e["source"], e["target"]): e for e in g["edges"]}
    parts = ex.expert_parts(tr, layer, t)
    by = {(b[1], b[2]): b for b in brute}
    for node in values:
        score, e, n, a, wv = by[(node["expert"], node["neuron"])]
        i = idx[t].tolist().index(e)
        q = f"L{layer}.E{e}."
        assert node["id"] == f"{q}value{n}" and node["name"] == f"L{layer}E{e} #{n}"
        assert node["router_weight"] == pytest.approx(float(w[t, i]), rel=1e-15)
        assert node["activation"] == pytest.approx(a, rel=1e-12)
        assert node["score"] == pytest.approx(score, rel=1e-12)
        assert edges[(f"{q}key{n}", f"{q}value{n}")]["weight"] == pytest.approx(1.5 * abs(a), rel=1e-12)
        assert edges[(f"L{layer}.mlp_input", f"{q}key{n}")]["weight"] == 7.0
        out = edges[(f"{q}value{n}", f"L{layer}.mlp_output")]
        assert out["weight"] == pytest.approx(abs(score), rel=1e-12) and out["sign"] == (1 if a >= 0 else -1)
        # the edge width is the norm of the neuron's sub-update w_e a_{e,n} value_{e,n}
        sub = parts.sub_updates[i, n]
        assert out["weight"] == pytest.approx(float(sub.norm()), rel=1e-12)
        p = full_probs(lens, wv)
        assert [x["id"] for x in node["top"]] == p.topk(5).indices.tolist()
        assert node["label"] == lens.tokenizer.decode([int(p.argmin() if a < 0 else p.argmax())])
        assert node["norm"] == pytest.approx(float(wv.norm()), rel=1e-12)
    assert any(b[3] < 0 for b in bottom), "the bottom neurons of a random model include negative activations"
    for node in keys:
        up = raw_expert(lens, layer, node["expert"])[1][node["neuron"]]
        assert [x["id"] for x in node["top"]] == full_probs(lens, up).topk(5).indices.tolist()
    b_out = raw_expert(lens, layer, int(idx[t, 0]))[4]
    bias = [n for n in g["nodes"] if n["kind"] == "bias" and n.get("part") == "mlp_out"]
    if b_out is None:
        assert not bias
    else:
        expect = sum(w[t, i] * raw_expert(lens, layer, e)[4] for i, e in enumerate(idx[t].tolist()))
        assert bias[0]["norm"] == pytest.approx(float(expect.norm()), rel=1e-12)


def test_whole_graph_on_moe_is_json_and_chains_the_layers(run):
    lens, tr, _ = run
    g = visit.visit_graph(tr)
    json.loads(json.dumps(g))
    assert g["layers"] == list(range(lens.n_layers))
    for layer in range(lens.n_layers):
        routed = set(tr.router(layer)[0][-1].tolist())
        mlp = [n for n in g["nodes"] if n["kind"] == "mlp_value" and n["layer"] == layer]
        assert len(mlp) == 25 and {n["expert"] for n in mlp} <= routed
        assert all(n["name"] == f"L{layer}E{n['expert']} #{n['neuron']}" for n in mlp)
    sel = visit.mlp_neurons(tr, 0, n_top=4, n_bottom=0)
    assert sel.experts is not None and sel.experts.shape == sel.neurons.shape == (4,)
