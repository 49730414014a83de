"""The Explorer on mixture-of-experts models: the neuron view and the value search name each neuron's
expert, a neuron toggle sent by the widget patches that expert's neuron (the same run as
lens.trace with NeuronPatch(expert=...)), and the flow graph draws the routed experts' neurons. Tiny
float64 Mixtral / gpt-oss of the conformance suite."""
from __future__ import annotations

import json

import pytest
import torch

import lensviz as lv
from lensviz.lenses.neurons import build_value_index, debugger_view
from lensviz.lenses.visit import mlp_neurons, visit_graph
from lensviz.views.explorer import Explorer
from tests import models
from tests.conftest import PROMPT
from tests.test_conformance import build

TARGET = " Paris"


@pytest.fixture(params=["mixtral", "gpt_oss"])
def ex(request):
    lens = lv.Lens(build(request.param), models.tokenizer())
    return Explorer(lens, PROMPT, target=TARGET)


def test_neuron_view_names_each_sub_updates_expert(ex):
    layer, position = 1, 5
    meta, _ = ex.answer({"what": "neurons", "layer": layer, "position": position, "include": []})
    ref = debugger_view(ex.trace, position=position, k=10, value_k=6, layers=[layer])["layers"][0]["sub_updates"]
    assert [(s["expert"], s["neuron"]) for s in meta["subupdates"]] == [(r["expert"], r["dim"]) for r in ref]
    assert [s["coef"] for s in meta["subupdates"]] == [r["coeff"] for r in ref]


def test_widget_neuron_toggle_patches_that_experts_neuron(ex):
    layer, position = 1, 5
    meta, _ = ex.answer({"what": "neurons", "layer": layer, "position": position, "include": []})
    top = meta["subupdates"][0]
    spec = {"type": "neuron", "layer": layer, "neuron": top["neuron"], "expert": top["expert"], "value": 0, "mode": "set"}
    ex._on_msg(ex, {"type": "run", "patches": [spec], "seq": 1}, [])
    ex.wait()
    assert ex.error == ""
    ref = ex.lens.trace(PROMPT, target=TARGET, patches=(lv.NeuronPatch(layer, [top["neuron"]], 0.0,
                                                                         expert=top["expert"]),))
    torch.testing.assert_close(ex.trace.logits, ref.logits, rtol=0, atol=0)
    assert not torch.equal(ex.trace.logits, ex.base.logits), "switching the top sub-update off changes the run"
    assert "expert=" + str(top["expert"]) in ex.code


def test_widget_neuron_toggle_rejects_a_nonsense_expert(ex):
    spec = {"type": "neuron", "layer": 0, "neuron": 0, "expert": 99, "value": 0, "mode": "set"}
    ex._on_msg(ex, {"type": "run", "patches": [spec], "seq": 2}, [])
    ex.wait()
    assert "expert" in ex.error and ex.done_seq == 2


def test_value_search_hits_carry_their_expert_and_its_tokens(ex):
    meta, _ = ex.answer({"what": "search", "token": TARGET})
    index = build_value_index(ex.lens)
    hits = index.query(TARGET, limit=20)
    assert meta["hits"] and [(h["layer"], h["expert"], h["dim"]) for h in meta["hits"]] == \
        [(h["layer"], h["expert"], h["dim"]) for h in hits]
    first = meta["hits"][0]
    assert first["tokens"] == [t["token"] for t in index.value_tokens(first["layer"], first["dim"],
                                                                      expert=first["expert"])[:6]]


def test_flow_graph_renders_the_routed_experts_neurons(ex):
    """The flow tab on MoE: the VISIT graph's MLP nodes are (expert, neuron) pairs of the experts routed at
    the position, named L{l}E{e} #{n}, in the Explorer's drawing rows."""
    ex.tab = "flow"  # a gradient tab
    ex.wait()
    assert ex.error == ""
    position, layers = 5, [1, 2]
    graph, _ = ex.answer({"what": "flow", "position": position, "layers": layers})
    json.dumps(graph)
    assert {n["layer"] for n in graph["nodes"]} == set(layers)
    ref = visit_graph(ex.trace, position=position, layers=layers, n_heads=4, n_wo_top=4, n_wo_bottom=2,
                      n_mlp_top=6, n_mlp_bottom=3)
    assert [n["id"] for n in graph["nodes"]] == [n["id"] for n in ref["nodes"]]
    for layer in layers:
        routed = ex.trace.router(layer)[0][position].tolist()
        sel = mlp_neurons(ex.trace, layer, position, 6, 3)
        for kind, row in (("mlp_key", 12), ("mlp_value", 13)):
            mlp = [n for n in graph["nodes"] if n["kind"] == kind and n["layer"] == layer]
            assert [(n["expert"], n["neuron"]) for n in mlp] == list(zip(sel.experts.tolist(), sel.neurons.tolist()))
            assert {n["expert"] for n in mlp} <= set(routed) and len(mlp) == 9
            assert all(n["name"] == f"L{layer}E{n['expert']} #{n['neuron']}" for n in mlp)
            assert all(n["row"] == layer * 16 + row for n in mlp)
