"""Segment masking (methods-2 §4.9) and layer-causal gradients (methods-2 §6.8)."""
from __future__ import annotations

import copy

import pytest
import torch

import lensviz as lv
from lensviz.patches import chat_segments, segment_mask
from tests import models

FAMILIES = ("gpt2", "llama", "gpt_neox")
PARTS = ["I like Italy and France.", " I visited the city of", " Paris and"]


@pytest.fixture(params=FAMILIES)
def lens(request, tiny_tokenizer):
    return lv.Lens(models.build(request.param), tiny_tokenizer)


def test_mask_is_block_plus_causal():
    m = segment_mask([(1, 3), (4, 6)], 7)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    assert torch.equal(m[0], causal[0]) and torch.equal(m[3], causal[3]) and torch.equal(m[6], causal[6])  # check 5
    assert m[1, 2] and m[4, 5] and not m[1, 4] and not m[3, 4]
    assert torch.equal(m | causal, m)  # never less than causal


def test_single_token_segments_reproduce_the_default_logits(lens):  # check 1 (explicit causal mask)
    base = lens.trace(PARTS, target=" Paris")
    spans = [(i, i + 1) for i in range(len(base))]
    tr = lens.trace(PARTS, target=" Paris", patches=(lv.SegmentMask(spans),))
    assert torch.allclose(tr.logits, base.logits, atol=1e-12)


def test_earlier_segments_do_not_see_later_ones(lens):  # check 2
    tr = lens.trace(PARTS, target=" Paris", patches=(lv.SegmentMask(),))
    changed = PARTS[:2] + [" France and"]
    tr2 = lens.trace(changed, target=" Paris", patches=(lv.SegmentMask(),))
    end = tr.segments[1][1]
    assert tr.segments[:2] == tr2.segments[:2]
    for layer in range(lens.n_layers):
        assert torch.equal(tr.resid(layer, "post")[:end], tr2.resid(layer, "post")[:end])
        a = tr.attention(layer)
        assert torch.all(a[:, :end, end:] == 0)


def test_first_token_of_a_segment_sees_its_last_token(lens):  # check 3
    s, e = lens.trace(PARTS, target=" Paris").segments[1]
    other = PARTS[:1] + [" I visited the city is"] + PARTS[2:]
    a = lens.trace(PARTS, target=" Paris", patches=(lv.SegmentMask(),))
    b = lens.trace(other, target=" Paris", patches=(lv.SegmentMask(),))
    assert a.segments[1] == b.segments[1]
    assert not torch.allclose(a.resid(0, "post")[s], b.resid(0, "post")[s])
    c = lens.trace(PARTS, target=" Paris")
    d = lens.trace(other, target=" Paris")
    assert torch.allclose(c.resid(0, "post")[s], d.resid(0, "post")[s], atol=1e-12)  # causal: no dependence
    assert float(a.attention(0)[:, s, e - 1].min()) > 0


def test_chat_segments_chatml_and_llama3():
    chatml = ["<|im_start|>", "system", "\n", "Be", " brief", "<|im_end|>", "\n", "<|im_start|>", "user", "\n", "Hi",
              "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n", "Hello"]
    assert chat_segments(chatml) == [(0, 6), (7, 12)]
    llama3 = ["<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>", "\n\n", "Hi", "<|eot_id|>",
              "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n", "Yo"]
    assert chat_segments(llama3) == [(1, 7)]
    m = segment_mask(chat_segments(chatml), len(chatml))
    assert torch.equal(m[13:], torch.ones(len(chatml), len(chatml), dtype=torch.bool).tril()[13:])  # check 6


@pytest.mark.slow
def test_chatml_segments_on_smollm2(smol):
    msgs = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Capital of France?"}]
    text = smol.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    tr = smol.trace(text, patches=(lv.SegmentMask("auto"),), backward=False)
    spans = chat_segments(tr.tokens)
    assert len(spans) == 2 and tr.tokens[spans[0][0]] == "<|im_start|>" and tr.tokens[spans[1][1] - 1] == "<|im_end|>"
    a = tr.attention(3)
    s, e = spans[1]
    assert float(a[:, s, e - 1].min()) > 0  # bidirectional inside the user turn
    assert torch.all(a[:, spans[0][1] - 1, spans[1][0]:] == 0)  # the system turn never sees the user turn
    base = smol.trace(text, backward=False)
    kl = torch.nn.functional.kl_div(torch.log_softmax(tr.logits[-1], -1), torch.log_softmax(base.logits[-1], -1),
                                    log_target=True, reduction="sum")
    assert float(kl) > 0.01  # MAS is not a free switch on an un-finetuned model (methods-2 §4.7)


def test_bad_segments_are_rejected(lens):
    with pytest.raises(lv.LensvizError, match="segment"):
        lens.trace(PARTS, patches=(lv.SegmentMask([(5, 2)]),))
    with pytest.raises(lv.LensvizError, match="overlap"):
        lens.trace(PARTS, patches=(lv.SegmentMask([(0, 4), (3, 6)]),))
    with pytest.raises(lv.LensvizError, match="no segments"):
        lens.trace("I visited the city of", patches=(lv.SegmentMask(),))


# --- layer-causal gradients -----------------------------------------------------------------------------
PROMPT = "I like Italy and France. I visited the city of"


def _own_loss_grad(lens, ids, target_id, layer):
    """Independent: dCE_l/d(block l input) with every block input detached, via a hand-made hook."""
    blocks = lens.adapter.blocks_of(lens.model)
    leaves, outs, handles = {}, {}, []

    def pre(mod, args, kwargs, i):
        x = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
        leaves[i] = x
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    def post(mod, args, out, i):
        outs[i] = out

    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(lambda m, a, k, i=i: pre(m, a, k, i), with_kwargs=True))
        handles.append(b.register_forward_hook(lambda m, a, o, i=i: post(m, a, o, i)))
    try:
        for p in lens.model.parameters():
            p.requires_grad_(False)
        lens.model(ids[None])
        h = outs[layer][0, -1]
        logits = lens.unembed_module(lens.final_norm_module(h))
        (-torch.log_softmax(logits, -1)[target_id]).backward()
        return leaves[layer].grad[0]
    finally:
        for hd in handles:
            hd.remove()


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_layer_causal_gradient_is_each_layers_own_loss(family, tiny_tokenizer):  # §6.8 checks 1, 2
    lens = lv.Lens(models.build(family), tiny_tokenizer)
    std = lens.trace(PROMPT, target=" Paris")
    lc = lens.trace(PROMPT, target=" Paris", gradient="layer_causal")
    assert torch.equal(lc.logits, std.logits)  # detaching changes no value
    assert lc.layer_losses[-1] == pytest.approx(std.loss)
    assert len(lc.layer_losses) == lens.n_layers
    for layer in range(lens.n_layers):
        own = _own_loss_grad(lens, lc.input_ids, lc.target_id, layer)
        assert torch.allclose(lc.resid_grad(layer, "pre"), own, atol=1e-12)
        ll = lens.project(lc.resid(layer, "post")[-1], k=1, target=lc.target_id)
        assert lc.layer_losses[layer] == pytest.approx(
            float(-torch.log_softmax(lens.unembed_module(lens.final_norm_module(lc.resid(layer, "post")[-1])), -1)[
                lc.target_id]), abs=1e-10)
        assert ll.target_rank is not None
    assert torch.equal(lc.resid_grad(-1, "post"), std.resid_grad(-1, "post"))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_perturbing_a_higher_layer_leaves_layer_causal_gradients_unchanged(family, tiny_tokenizer):  # §6.8 check 3
    lens = lv.Lens(models.build(family), tiny_tokenizer)
    other = lv.Lens(copy.deepcopy(lens.model), tiny_tokenizer)
    with torch.no_grad():
        for p in lens.adapter.blocks_of(other.model)[2].parameters():
            p.add_(0.05 * torch.randn_like(p))
    a = lens.trace(PROMPT, target=" Paris", gradient="layer_causal")
    b = other.trace(PROMPT, target=" Paris", gradient="layer_causal")
    assert torch.equal(a.resid_grad(0, "pre"), b.resid_grad(0, "pre"))
    assert torch.equal(a.resid_grad(1, "mid"), b.resid_grad(1, "mid"))
    std_a = lens.trace(PROMPT, target=" Paris")
    std_b = other.trace(PROMPT, target=" Paris")
    assert float((std_a.resid_grad(0, "pre") - std_b.resid_grad(0, "pre")).abs().max()) > 1e-6
