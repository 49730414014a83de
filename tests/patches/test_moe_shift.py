"""ShiftEdit(expert=e) on mixture-of-experts models (tiny float64 Mixtral / Qwen3-MoE / gpt-oss of the
conformance suite): the preview equals the model with expert e's FF2 really edited,
W_down,e += eta * x_T e_t^T, where x_T (expert e's FF2 input at the edited position) is read off HF's own
experts module by autograd; nothing is left behind, also after runs that raised."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

import lensviz as lv
from lensviz.lenses import experts as ex
from lensviz.patches.base import Patch
from tests import models
from tests.conftest import PROMPT
from tests.test_conformance import family_lenses

TARGET = " Paris"
MOE = ["mixtral", "qwen3_moe", "gpt_oss"]


@pytest.fixture(scope="module")
def lenses():
    return family_lenses()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def hf_ff2_input(lens, layer, e, x):
    """Expert e's FF2 input (its neuron activations) at one token x [D], from HF's experts module by
    autograd: the output is a @ W_down,e (+ b), so d(output[0]) / d(W_down,e) holds a in its first output slot."""
    module = lens.adapter.blocks_of(lens.model)[layer].get_submodule(lens.adapter.experts)
    down = module.down_proj
    flag = down.requires_grad
    down.requires_grad_(True)
    try:
        out = module(x[None], torch.tensor([[e]]), torch.ones(1, 1, dtype=x.dtype))
        (grad,) = torch.autograd.grad(out[0, 0], down)
    finally:
        down.requires_grad_(flag)
    # Mixtral / Qwen3-MoE down_proj [E, D, F] (row 0 = output 0), gpt-oss [E, F, D] (column 0)
    return grad[e, 0] if lens.adapter.expert_layout == "linear" else grad[e][:, 0]


def edited_model(lens, layer, e, eta, x_t, e_t):
    """A copy of the model with W_down,e += eta * x_T e_t^T (in [in, out] orientation)."""
    model = copy.deepcopy(lens.model)
    down = model.get_submodule(f"{lens.adapter.blocks}.{layer}.{lens.adapter.experts}").down_proj
    with torch.no_grad():
        view = down[e] if lens.adapter.expert_layout == "conv1d" else down[e].T  # [F, D]
        view.add_(eta * torch.outer(x_t, e_t))
    return model


@pytest.mark.parametrize("family", MOE)
def test_expert_shift_edit_equals_the_edited_expert_weights(family, lenses):
    lens = lenses(family)
    layer, eta = 1, 0.7
    base = lens.trace(PROMPT, target=TARGET)
    for position in (-1, 4):
        t = position % len(base)
        e = int(base.router(layer)[0][t, 1])  # the second expert routed at t
        x_t = hf_ff2_input(lens, layer, e, base.mlp_input(layer)[t])
        e_t = lens.model.get_input_embeddings().weight[base.target_id].detach()
        tr = lens.trace(PROMPT, target=TARGET, patches=[lv.ShiftEdit(layer, eta, position, expert=e)])
        with torch.no_grad():
            ref = edited_model(lens, layer, e, eta, x_t, e_t)(tr.input_ids[None], use_cache=False).logits[0]
        assert rel(tr.logits, ref) < 1e-12
        assert rel(tr.logits, base.logits) > 1e-6  # the edit changes the run
        # the edited layer's MLP write changes by w_{i,e} eta (a_{e,i} . x_T) e_t at every token i routed to e
        chosen, weights = tr.router(layer)
        w = torch.where(chosen == e, weights, torch.zeros_like(weights)).sum(-1)
        a = torch.stack([hf_ff2_input(lens, layer, e, x) for x in tr.mlp_input(layer)])
        expect = eta * (w * (a @ x_t))[:, None] * e_t
        write = (tr.resid(layer, "post") - tr.resid(layer, "mid")) - ex.mlp_output(tr, layer)
        assert rel(write, expect) < 1e-12
        assert float(write[w == 0].abs().max()) < 1e-12 * float(write.abs().max())  # rounding only


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_expert_shift_edit_while_decoding_equals_the_edited_model(family, lenses):
    lens = lenses(family)
    layer, eta = 2, 1.5
    base = lens.trace(PROMPT, backward=False)  # what generate gives the patch: no target given, the default one
    e = int(base.router(layer)[0][-1, 0])
    x_t = hf_ff2_input(lens, layer, e, base.mlp_input(layer)[-1])
    e_t = lens.model.get_input_embeddings().weight[base.target_id].detach()
    gen = lens.generate(PROMPT, 4, patches=[lv.ShiftEdit(layer, eta, expert=e)])
    ids = base.input_ids[None]
    with torch.no_grad():
        ref = edited_model(lens, layer, e, eta, x_t, e_t).generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.ids.tolist() == ref[0, ids.shape[1]:].tolist()


def test_expert_shift_edit_refusals(lenses):
    lens = lenses("mixtral")
    base = lens.trace(PROMPT, target=TARGET)
    chosen = base.router(1)[0]
    unrouted = next(e for e in range(4) if e not in chosen[-1].tolist())
    with pytest.raises(lv.LensvizError, match="not routed to expert"):
        lens.trace(PROMPT, target=TARGET, patches=[lv.ShiftEdit(1, 0.5, expert=unrouted)])
    with pytest.raises(lv.LensvizError, match="expert"):
        lens.trace(PROMPT, target=TARGET, patches=[lv.ShiftEdit(1, 0.5, expert=4)])
    with pytest.raises(lv.LensvizError, match="expert"):
        lens.trace(PROMPT, target=TARGET, patches=[lv.ShiftEdit(1, 0.5, expert=-7)])
    with pytest.raises(lv.LensvizError, match="mixture-of-experts"):
        lens.trace(PROMPT, target=TARGET, patches=[lv.ShiftEdit(1, 0.5)])
    dense = lv.Lens(models.build("llama"), models.tokenizer())
    with pytest.raises(lv.LensvizError, match="dense MLP"):
        dense.trace(PROMPT, target=TARGET, patches=[lv.ShiftEdit(1, 0.5, expert=0)])
    dense.trace(PROMPT, target=TARGET, patches=[lv.ShiftEdit(1, 0.5)])  # dense families keep their ShiftEdit
    # Lens.expert_weight, the one path to expert parameters, validates its address
    for call, match in ((lambda: dense.expert_weight(0, 0, "mlp_out"), "dense MLP"),
                        (lambda: lens.expert_weight(0, 4, "mlp_out"), "expert"),
                        (lambda: lens.expert_weight(0, True, "mlp_out"), "expert"),
                        (lambda: lens.expert_weight(9, 0, "mlp_out"), "layer"),
                        (lambda: lens.expert_weight(0, 0, "mlp_gate"), "mlp_in"),
                        (lambda: lens.expert_weight(0, 0, "mlp_out", "scale"), "weight")):
        with pytest.raises(lv.LensvizError, match=match):
            call()
    assert lens.expert_weight(0, 0, "mlp_in", "bias") is None  # Mixtral's experts have no biases


class Boom(RuntimeError):
    pass


@dataclass(frozen=True)
class RaiseInForward(Patch):
    layer: int = 2

    def install(self, ctx):
        def hook(mod, args):
            raise Boom("forward")

        ctx.pre_hook(ctx.block(self.layer), hook)


def _snapshot(model):
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return ({n: tuple(len(getattr(m, a)) for a in names) for n, m in model.named_modules()},
            [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()],
            model.config._attn_implementation)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_expert_shift_edit_leaves_nothing_behind(family, lenses):
    lens = lenses(family)
    model = lens.model
    ids = lens.encode(PROMPT)[0][None]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = _snapshot(model)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits.clone()
    base = lens.trace(PROMPT, target=TARGET)
    e = int(base.router(1)[0][-1, 0])
    unrouted = next(x for x in range(4) if x not in base.router(1)[0][-1].tolist())
    lens.trace(PROMPT, target=TARGET, patches=[lv.ShiftEdit(1, 0.5, expert=e)])
    with pytest.raises(Boom):  # raises mid-forward, after the shift hook is installed
        lens.trace(PROMPT, target=TARGET, patches=[lv.ShiftEdit(1, 0.5, expert=e), RaiseInForward(2)])
    with pytest.raises(lv.LensvizError):
        lens.trace(PROMPT, target=TARGET, patches=[lv.ShiftEdit(1, 0.5, expert=unrouted)])
    lens.generate(PROMPT, 3, patches=[lv.ShiftEdit(1, 0.5, expert=e)])
    with lens.patched(lv.ShiftEdit(1, 0.5, expert=e), base=base), torch.no_grad():
        patched = model(ids, use_cache=False).logits
    assert not torch.equal(patched, logits)
    assert _snapshot(model) == before
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, logits)  # bit-identical
