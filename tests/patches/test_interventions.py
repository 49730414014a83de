"""Head ablation, neuron patches, activation patching, the shift edit and compare, each checked
against an independent edit of a copied model or the plain algebra."""
from __future__ import annotations

import copy

import pytest
import torch

import lensviz as lv
from lensviz.patches import activation_patching_sweep
from tests import models
from tests.conftest import PROMPT

FAMILIES = ("gpt2", "llama", "gpt_neox_seq")
CLEAN = "I visited the city of Paris and"
CORRUPT = "I visited the city of France and"


@pytest.fixture(params=FAMILIES)
def lens(request, tiny_tokenizer):
    return lv.Lens(models.build(request.param), tiny_tokenizer)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_head_ablation_equals_zeroing_the_output_projection_slice(lens):
    layer, heads = 1, [0, 3]
    tr = lens.trace(PROMPT, target=" Paris", patches=(lv.HeadAblation(layer, heads),))
    edited = copy.deepcopy(lens.model)
    o_proj = lens.adapter.part(edited, layer, "o_proj")
    w = lens.adapter.as_in_out(o_proj.weight.data)  # [H*d, D] view
    d = lens.d_head
    with torch.no_grad():
        for h in heads:
            w[h * d:(h + 1) * d] = 0
        ref = edited(tr.input_ids[None]).logits[0]
    assert torch.allclose(tr.logits, ref, atol=1e-12)
    assert torch.all(tr.head_outputs(layer)[heads] == 0)
    assert float(tr.head_outputs(layer)[1].abs().max()) > 0


def test_neuron_off_changes_the_mlp_output_by_minus_m_v(lens):  # methods-2 §1.11 check 2
    layer, neurons = 1, [2, 5]
    base = lens.trace(PROMPT, target=" Paris")
    tr = lens.trace(PROMPT, target=" Paris", patches=(lv.NeuronPatch(layer, neurons, 0.0),))
    assert torch.all(tr.mlp_activations(layer)[:, neurons] == 0)
    assert torch.equal(tr.resid(layer, "mid"), base.resid(layer, "mid"))
    w = lens.adapter.as_in_out(lens.weight(layer, "mlp_out"))  # [F, D]: value vectors v_i are rows
    a = base.mlp_activations(layer)
    expected = -(a[:, neurons] @ w[neurons])
    change = (tr.resid(layer, "post") - tr.resid(layer, "mid")) - (base.resid(layer, "post") - base.resid(layer, "mid"))
    assert rel(change, expected) < 1e-12


def test_neuron_set_scale_positions_and_on_rule(lens):
    base = lens.trace(PROMPT, target=" Paris")
    a0 = base.mlp_activations(0)
    scaled = lens.trace(PROMPT, target=" Paris", patches=(lv.NeuronPatch(0, 4, 3.0, mode="scale", positions=[1, 2]),))
    assert torch.allclose(scaled.mlp_activations(0)[[1, 2], 4], 3 * a0[[1, 2], 4])
    assert torch.equal(scaled.mlp_activations(0)[0], a0[0])
    on = lens.trace(PROMPT, target=" Paris", patches=(lv.NeuronPatch(0, 4, mode="on"),))
    w = lens.adapter.as_in_out(lens.weight(0, "mlp_out"))
    expected = float((a0[-1].abs() * w.norm(dim=-1)).max()) + 0.01
    assert torch.allclose(on.mlp_activations(0)[:, 4], torch.full((len(base),), expected, dtype=a0.dtype))


def test_activation_patching_restores_the_clean_run(lens):
    clean = lens.trace(CLEAN, target=" Paris")
    corrupt = lens.trace(CORRUPT, target=" Paris")
    assert len(clean) == len(corrupt)
    full = lens.trace(CORRUPT, target=" Paris", patches=(lv.ActivationPatch(clean, 0, "pre"),))
    assert torch.allclose(full.logits, clean.logits, atol=1e-12)
    last = lens.trace(CORRUPT, target=" Paris", patches=(lv.ActivationPatch(clean, -1, "post"),))
    assert torch.allclose(last.logits, clean.logits, atol=1e-12)
    mid = lens.trace(CORRUPT, target=" Paris", patches=(lv.ActivationPatch(clean, 1, "mid", positions=[2, 5]),))
    assert torch.allclose(mid.resid(1, "mid")[[2, 5]], clean.resid(1, "mid")[[2, 5]], atol=1e-12)
    assert torch.equal(mid.resid(1, "pre"), corrupt.resid(1, "pre"))
    others = [i for i in range(len(clean)) if i not in (2, 5)]
    assert torch.allclose(mid.resid(1, "mid")[others], corrupt.resid(1, "mid")[others], atol=1e-12)
    pairs = lens.trace(CORRUPT, target=" Paris", patches=(lv.ActivationPatch(clean, 0, "post", positions=[(3, 1)]),))
    assert torch.equal(pairs.resid(1, "pre")[3], clean.resid(0, "post")[1])


def test_sweep_finds_the_differing_token(lens):
    clean = lens.trace(CLEAN, target=" Paris")
    ids_clean, ids_corrupt = clean.input_ids, lens.encode(CORRUPT)[0]
    differ = (ids_clean != ids_corrupt).nonzero().flatten().tolist()
    sweep = activation_patching_sweep(lens, clean, CORRUPT, site="pre", layers=[0])
    effect = sweep["effect"][0]
    assert effect.shape == (len(clean),)
    if len(differ) == 1:
        assert float(effect[differ[0]]) == pytest.approx(1.0, abs=1e-9)
    same = [i for i in range(len(clean)) if i not in differ]
    assert torch.allclose(effect[same], torch.zeros(len(same), dtype=effect.dtype), atol=1e-9)


def test_shift_edit_equals_the_weight_edit_and_leaves_weights_alone(lens):  # research §5 row 21
    layer, eta = 1, 0.3
    base = lens.trace(PROMPT, target=" Paris")
    before = {k: v.clone() for k, v in lens.model.state_dict().items()}
    tr = lens.trace(PROMPT, target=" Paris", patches=(lv.ShiftEdit(layer, eta),))
    for k, v in lens.model.state_dict().items():
        assert torch.equal(v, before[k])
    x_t = base.mlp_activations(layer)[-1]
    e_t = lens.model.get_input_embeddings().weight[base.target_id].detach()
    # delta(mlp_out)_i = eta (a_i . x_T) e_t for the edited layer, at every position
    a = tr.mlp_activations(layer)
    delta = (tr.resid(layer, "post") - tr.resid(layer, "mid")) - base.adapter.as_in_out(
        lens.weight(layer, "mlp_out")).T.matmul(a.T).T - (0 if lens.param(layer, "mlp_out", "bias") is None
                                                           else lens.param(layer, "mlp_out", "bias"))
    assert rel(delta, eta * (a @ x_t)[:, None] * e_t) < 1e-12
    edited = copy.deepcopy(lens.model)
    mod = lens.adapter.part(edited, layer, "mlp_out")
    with torch.no_grad():
        lens.adapter.as_in_out(mod.weight.data).add_(eta * torch.outer(x_t, e_t))
        ref = edited(tr.input_ids[None]).logits[0]
    assert torch.allclose(tr.logits, ref, atol=1e-10)


def test_compare_summarises_the_effect(lens):
    base = lens.trace(PROMPT, target=" Paris")
    same = lv.compare(base, lens.trace(PROMPT, target=" Paris", patches=(lv.AttentionPatch(0.0),)))
    assert same["kl"] == pytest.approx(0.0, abs=1e-12) and not any(any(r) for r in same["changed"])
    patched = lens.trace(PROMPT, target=" Paris", patches=(lv.HeadAblation(0, list(range(lens.n_heads))),))
    c = lv.compare(base, patched)
    p0 = torch.softmax(base.logits[-1].double(), -1)
    p1 = torch.softmax(patched.logits[-1].double(), -1)
    assert c["prob_before"] == pytest.approx(float(p0[base.target_id]))
    assert c["prob_after"] == pytest.approx(float(p1[base.target_id]))
    assert c["rank_after"] == int((p1 > p1[base.target_id]).sum())
    assert c["kl"] == pytest.approx(float((p0 * (p0.log() - p1.log())).sum()), rel=1e-9)
    changed = torch.tensor(c["changed"])
    assert changed.shape == (lens.n_layers, len(base))
    assert len(c["changes"]) == int(changed.sum())
    import json

    json.dumps(c)  # small, plain data for a widget


def test_patches_compose_in_one_run(lens):
    base = lens.trace(PROMPT, target=" Paris")
    both = lens.trace(PROMPT, target=" Paris", patches=(lv.HeadAblation(0, [1]), lv.NeuronPatch(1, [0], 0.0)))
    assert torch.all(both.head_outputs(0)[1] == 0)
    assert torch.all(both.mlp_activations(1)[:, 0] == 0)
    assert both.loss != base.loss


def test_forward_only_reuse_of_the_unpatched_prefix_is_exact(lens):
    base = lens.trace(PROMPT, target=" Paris")
    for patch in (lv.HeadAblation(2, [0]), lv.NeuronPatch(1, [3]), lv.TopKAttention(2, layers=[1, 2]),
                  lv.ActivationPatch(base, 1, "post")):
        full = lens.trace(PROMPT, target=" Paris", patches=(patch,), backward=False)
        fast = lens.trace(PROMPT, target=" Paris", patches=(patch,), backward=False, base=base)
        assert torch.equal(fast.logits, full.logits)
        assert torch.equal(fast.resid(0, "mid"), base.resid(0, "mid"))
