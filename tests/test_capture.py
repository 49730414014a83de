"""Capture is checked against independent computations (autograd through a plain eager attention,
HF's own eager attention, and the plain algebra of research/methods-ra-bl-visit.md §5) on every
family, in float64. Row numbers refer to that table."""
from __future__ import annotations

import copy

import pytest
import torch

import lensviz as lv
from tests import models, oracle
from tests.conftest import PROMPT

TARGET = " Paris"


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture
def run(tiny):
    """(lens, trace, oracle run) for the tiny model of each family."""
    tr = tiny.trace(PROMPT, target=TARGET)
    ref = oracle.run(tiny.model, tr.input_ids, tr.target_id)
    return tiny, tr, ref


def test_logits_equal_plain_model(tiny):
    tr = tiny.trace(PROMPT, target=TARGET)
    with torch.no_grad():
        plain = tiny.model(tr.input_ids[None]).logits[0]
    assert tr.logits.dtype == torch.float64
    assert torch.allclose(tr.logits, plain, rtol=0, atol=1e-12)  # row 1
    assert tr.loss == pytest.approx(float(-torch.log_softmax(plain[-1], -1)[tr.target_id]), abs=1e-12)


def test_attention_equals_hf_eager(tiny):
    tr = tiny.trace(PROMPT, target=TARGET)
    eager = copy.deepcopy(tiny.model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(tr.input_ids[None], output_attentions=True)
    # HF eager (except GPT-2) runs the softmax in float32 even for float64 models (research §0)
    tol = 1e-12 if tiny.arch == "gpt2" else 1e-6
    for layer in range(tiny.n_layers):
        a = tr.attention(layer)
        assert torch.allclose(a, out.attentions[layer][0], atol=tol, rtol=0)
        assert torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-12)
        assert torch.all(a.triu(1) == 0)


def test_reversed_attention_equals_autograd(run):
    lens, tr, ref = run
    assert tr.loss == pytest.approx(ref["loss"], abs=1e-12)
    for layer in range(lens.n_layers):
        ra = tr.reversed_attention(layer)
        s_grad = ref["S"][layer].grad[0]
        assert rel(ra, s_grad) < 1e-10  # row 2
        assert torch.allclose(tr.attention(layer), ref["A"][layer][0].detach(), atol=1e-12)
        assert float(ra.sum(-1).abs().max()) <= 1e-12 * float(ra.abs().max())  # row 5
        assert torch.all(ra.triu(1) == 0)  # row 6


def test_dL_dA_is_delta_times_values(run):  # row 4 and row 7
    lens, tr, ref = run
    n_rep = lens.n_heads // lens.n_kv_heads
    for layer in range(lens.n_layers):
        delta = tr.head_output_grad(layer)
        v = tr.qkv(layer)[2].repeat_interleave(n_rep, dim=0)
        g = delta @ v.transpose(-1, -2)
        a_grad = ref["A"][layer].grad[0]
        assert torch.allclose(g.tril(), a_grad.tril(), atol=1e-12 * float(a_grad.abs().max()) + 1e-300)
        a, ra = tr.attention(layer), tr.reversed_attention(layer)
        s = tr.attention_scaling(layer)
        inner = (g * ra).sum(dim=(-1, -2))
        mean = (a * g).sum(-1, keepdim=True)
        variance = (a * (g - mean) ** 2).sum(-1).sum(-1)
        assert torch.allclose(inner, s * variance, rtol=1e-10, atol=1e-300)
        assert torch.all(inner >= 0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gqa_guard_indexing_values_by_query_head_fails(family, tiny_tokenizer):  # row 22
    tiny = lv.Lens(models.build(family), tiny_tokenizer)
    assert tiny.n_kv_heads < tiny.n_heads
    tr = tiny.trace(PROMPT, target=TARGET)
    layer = 0
    delta, a = tr.head_output_grad(layer), tr.attention(layer)
    v = tr.qkv(layer)[2]
    wrong_v = torch.stack([v[h % tiny.n_kv_heads] for h in range(tiny.n_heads)])  # values[h], not h // n_rep
    g = delta @ wrong_v.transpose(-1, -2)
    wrong = tr.attention_scaling(layer) * a * (g - (a * g).sum(-1, keepdim=True))
    assert rel(wrong, tr.reversed_attention(layer)) > 0.1


def test_residuals_and_their_gradients_equal_autograd(run):
    lens, tr, ref = run
    hidden = ref["hidden"]  # hidden[l] = block l input; hidden[-1] is after the final norm
    for layer in range(lens.n_layers):
        assert torch.allclose(tr.resid(layer, "pre"), hidden[layer][0].detach(), atol=1e-12)
        assert torch.allclose(tr.resid_grad(layer, "pre"), hidden[layer].grad[0], atol=1e-12)
        if layer + 1 < lens.n_layers:
            assert torch.equal(tr.resid(layer, "post"), tr.resid(layer + 1, "pre"))
            assert torch.allclose(tr.resid_grad(layer, "post"), hidden[layer + 1].grad[0], atol=1e-12)
    # row 14: the final norm of the last block output gives HF's last hidden state and the logits
    final_norm = lens.model.get_submodule(lens.adapter.final_norm)
    unembed = lens.model.get_submodule(lens.adapter.unembed)
    with torch.no_grad():
        normed = final_norm(tr.resid(-1, "post"))
        assert torch.allclose(normed, hidden[-1][0].detach(), atol=1e-12)
        assert torch.allclose(unembed(normed), tr.logits, atol=1e-12)
    # row 13: the gradient at the last block output is J_Nf^T W_U^T (softmax - onehot) at the last position
    x = tr.resid(-1, "post")[-1].clone().requires_grad_(True)
    logits = unembed(final_norm(x))
    (torch.softmax(logits, -1).detach() - torch.nn.functional.one_hot(torch.tensor(tr.target_id), lens.vocab_size)
     ).mul(logits).sum().backward()
    assert torch.allclose(tr.resid_grad(-1, "post")[-1], x.grad, atol=1e-12)
    assert torch.all(tr.resid_grad(-1, "post")[:-1] == 0)


def test_block_decomposes_into_heads_and_mlp(run):  # row 16
    lens, tr, _ = run
    ad = lens.adapter
    for layer in range(lens.n_layers):
        o_bias = ad.part(lens.model, layer, "o_proj").bias
        attn_out = tr.head_outputs(layer).sum(0) + (0 if o_bias is None else o_bias.detach())
        mlp_out_mod = ad.part(lens.model, layer, "mlp_out")
        w = ad.as_in_out(mlp_out_mod.weight.detach())
        mlp_out = tr.mlp_activations(layer) @ w + (0 if mlp_out_mod.bias is None else mlp_out_mod.bias.detach())
        pre, mid, post = (tr.resid(layer, s) for s in ("pre", "mid", "post"))
        assert rel(mid, pre + attn_out) < 1e-12
        assert rel(post, mid + mlp_out) < 1e-12


def test_weight_gradients_rebuilt_from_captured_factors(run):  # rows 9, 10, 11, 12 and the chain at W_O
    lens, tr, _ = run
    model, ad = lens.model, lens.adapter
    oracle.run(model, tr.input_ids, tr.target_id, params_grad=True)
    try:
        for layer in range(lens.n_layers):
            o_proj, mlp_out = ad.part(model, layer, "o_proj"), ad.part(model, layer, "mlp_out")
            o = tr.recording.at("o", layer)  # [T, H*d], the o_proj input
            d_out = tr.resid_grad(layer, "mid") if not ad.is_parallel(model.config) else tr.resid_grad(layer, "post")
            # row 9: W_O grad = O^T delta_out (in [in, out] layout)
            assert rel(ad.as_in_out(o_proj.weight.grad), o.T @ d_out) < 1e-12
            # delta at the head outputs is delta_out pulled back through W_O
            assert rel(tr.head_output_grad(layer).transpose(0, 1).reshape(o.shape), d_out @ ad.as_in_out(o_proj.weight).T.detach()) < 1e-12
            # row 10: W_FF2 grad = sum_i a_i delta_i^T, bias grad = sum_i delta_i
            a, delta = tr.mlp_activations(layer), tr.mlp_output_grad(layer)
            assert rel(ad.as_in_out(mlp_out.weight.grad), a.T @ delta) < 1e-12
            if mlp_out.bias is not None:
                assert rel(mlp_out.bias.grad, delta.sum(0)) < 1e-12
            # row 11: rank <= T; 1 in the last layer for a last-token loss
            rank = int(torch.linalg.matrix_rank(a.T @ delta))
            assert rank <= len(tr)
            if layer == lens.n_layers - 1:
                assert rank == 1
                assert torch.all(delta[:-1] == 0)  # row 12
                assert torch.all(tr.reversed_attention(layer)[:, :-1] == 0)
    finally:
        for p in model.parameters():
            p.grad = None


def test_qkv_weight_gradients_from_reversed_attention(tiny_tokenizer):  # row 8, GPT-2 fused Conv1D
    lens = lv.Lens(models.build("gpt2"), tiny_tokenizer)
    tr = lens.trace(PROMPT, target=TARGET)
    model, ad = lens.model, lens.adapter
    oracle.run(model, tr.input_ids, tr.target_id, params_grad=True)
    try:
        d, n_heads, big_d = lens.d_head, lens.n_heads, lens.d_model
        for layer in range(lens.n_layers):
            x = ad.blocks_of(model)[layer].get_submodule(ad.ln1)(tr.resid(layer, "pre")).detach()
            q, k, _ = tr.qkv(layer)
            ra, a, delta = tr.reversed_attention(layer), tr.attention(layer), tr.head_output_grad(layer)
            grad = ad.part(model, layer, "qkv").weight.grad  # [D, 3D]
            for h in range(n_heads):
                sl = slice(h * d, (h + 1) * d)
                assert rel(grad[:, sl], x.T @ (ra[h] @ k[h])) < 1e-12
                assert rel(grad[:, big_d + h * d:big_d + (h + 1) * d], x.T @ (ra[h].T @ q[h])) < 1e-12
                assert rel(grad[:, 2 * big_d + h * d:2 * big_d + (h + 1) * d], x.T @ (a[h].T @ delta[h])) < 1e-12
    finally:
        for p in model.parameters():
            p.grad = None


def test_forward_only_trace_has_no_gradients(tiny):
    tr = tiny.trace(PROMPT, target=TARGET, backward=False)
    full = tiny.trace(PROMPT, target=TARGET)
    assert torch.equal(tr.logits, full.logits)
    assert torch.allclose(tr.attention(1), full.attention(1))
    assert not tr.has_backward


def test_target_none_explains_the_models_own_prediction(tiny):
    tr = tiny.trace(PROMPT)
    assert tr.target_id == int(tr.logits[-1].argmax())
    assert tr.target == tiny.tokenizer.decode([tr.target_id])


def test_segments_are_kept_and_concatenate_to_the_prompt(tiny):
    parts = ["I like Italy and France.", " I visited the city of"]
    tr = tiny.trace(parts, target=TARGET)
    assert tr.segments[0][0] == 0 and tr.segments[-1][1] == len(tr)
    assert tr.segments[0][1] == tr.segments[1][0]
    assert "".join(tr.tokens) == "".join(parts)


def test_returned_tensors_are_detached_cpu_and_shaped(run):
    lens, tr, _ = run
    t, big_d, n_heads = len(tr), lens.d_model, lens.n_heads
    shapes = {
        "attention": (tr.attention(0), (n_heads, t, t)),
        "reversed_attention": (tr.reversed_attention(0), (n_heads, t, t)),
        "resid": (tr.resid(0, "mid"), (t, big_d)),
        "resid_grad": (tr.resid_grad(0, "mid"), (t, big_d)),
        "head_outputs": (tr.head_outputs(0), (n_heads, t, big_d)),
        "mlp_activations": (tr.mlp_activations(0), (t, lens.d_mlp)),
        "mlp_output_grad": (tr.mlp_output_grad(0), (t, big_d)),
        "logits": (tr.logits, (t, lens.vocab_size)),
    }
    for name, (x, shape) in shapes.items():
        assert tuple(x.shape) == shape, name
        assert x.device.type == "cpu" and not x.requires_grad, name


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_qkv_weight_gradients_through_rope_and_gqa(family, tiny_tokenizer):  # row 8, Linear + RoPE + GQA
    lens = lv.Lens(models.build(family), tiny_tokenizer)
    tr = lens.trace(PROMPT, target=TARGET)
    model, ad = lens.model, lens.adapter
    oracle.run(model, tr.input_ids, tr.target_id, params_grad=True)
    try:
        n_rep, d = lens.n_heads // lens.n_kv_heads, lens.d_head
        positions = torch.arange(len(tr))[None]
        for layer in range(lens.n_layers):
            x = ad.blocks_of(model)[layer].get_submodule(ad.ln1)(tr.resid(layer, "pre")).detach()
            cos, sin = model.model.rotary_emb(x[None], positions)
            cos, sin = cos[0], sin[0]  # [T, d]
            unrope = lambda g: g * cos - _rotate_half(g * sin)  # noqa: E731  transpose of the rotation
            q, k, v = tr.qkv(layer)
            ra, a, delta = tr.reversed_attention(layer), tr.attention(layer), tr.head_output_grad(layer)
            d_q = torch.stack([unrope(ra[h] @ k[h // n_rep]) for h in range(lens.n_heads)])
            d_k = torch.stack([unrope(sum(ra[h].T @ q[h] for h in range(g * n_rep, (g + 1) * n_rep)))
                               for g in range(lens.n_kv_heads)])
            d_v = torch.stack([sum(a[h].T @ delta[h] for h in range(g * n_rep, (g + 1) * n_rep))
                               for g in range(lens.n_kv_heads)])
            for part, dm in (("q_proj", d_q), ("k_proj", d_k), ("v_proj", d_v)):
                flat = dm.transpose(0, 1).reshape(len(tr), -1)  # [T, heads * d]
                module = ad.part(model, layer, part)
                assert rel(module.weight.grad, flat.T @ x) < 1e-12, part
                if module.bias is not None:
                    assert rel(module.bias.grad, flat.sum(0)) < 1e-12, part
    finally:
        for p in model.parameters():
            p.grad = None


def test_authors_transposed_expression_matches(run):  # row 3 (Reversed-Attention exp_ra_utils form)
    lens, tr, _ = run
    n_rep = lens.n_heads // lens.n_kv_heads
    for layer in range(lens.n_layers):
        a, delta = tr.attention(layer), tr.head_output_grad(layer)
        v = tr.qkv(layer)[2]
        for h in range(lens.n_heads):
            rev_logits = delta[h] @ v[h // n_rep].T
            authors = (a[h] * (rev_logits.T - torch.diag(a[h] @ rev_logits.T)).T) * tr.attention_scaling(layer)
            assert torch.allclose(authors, tr.reversed_attention(layer)[h], atol=1e-18, rtol=1e-12)


def test_normed_inputs_feed_the_sublayers(run):
    """The MLP applied to mlp_input gives the MLP's contribution; q/k/v from attn_input match capture."""
    lens, tr, _ = run
    ad = lens.adapter
    for layer in range(lens.n_layers):
        block = ad.blocks_of(lens.model)[layer]
        with torch.no_grad():
            mlp_out = block.get_submodule(ad.mlp)(tr.mlp_input(layer))
        contribution = tr.resid(layer, "post") - tr.resid(layer, "mid")
        assert rel(mlp_out, contribution) < 1e-12
        w = lens.attention_weights(layer)
        v = torch.einsum("td,hde->hte", tr.attn_input(layer), w["v"]) + (0 if w["bv"] is None else w["bv"][:, None])
        assert rel(v, tr.qkv(layer)[2]) < 1e-12
