"""Conformance suite: every supported family, as a tiny random float64 model with its maths quirks turned
on (sliding windows shorter than the prompt, soft-capping, sinks, q/k norms, post-norms, multipliers,
parallel blocks, partial / interleaved rotary, learned positions, fused projections, experts), checked
against independent references: HF's own forward and eager attention, autograd through a plain
attention function written here (it shares no code with lensviz), and the identities of
research/methods-ra-bl-visit.md §5 (row numbers in comments).

Adding a family = one adapter file + one entry in CONFIGS.
"""
from __future__ import annotations

import copy

import pytest
import torch

import lensviz as lv
from lensviz.lenses import backward as bl
from tests import models, oracle

PROMPT = "I like Italy and France. I visited the city of"
TARGET = " Paris"
WINDOW = 4  # sliding windows shorter than the prompt (12 tokens)
T32 = 2e-6  # HF computes RMSNorm / LayerNorm of these families in float32 even for float64 models


def _common(**kw):
    v = models.tokenizer().vocab_size
    base = dict(vocab_size=v, bos_token_id=0, eos_token_id=0, pad_token_id=None, max_position_embeddings=64,
                hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, initializer_range=0.15, tie_word_embeddings=False)
    base.update(kw)
    return base


def _layer_types(*kinds):
    return [{"s": "sliding_attention", "f": "full_attention"}[k] for k in kinds]


def _cfg(family: str):
    import transformers as tf

    if family in ("gpt2", "qwen2", "gpt_neox"):
        return models.config(family)
    if family == "llama3":  # Llama 3.x rope scaling
        return tf.LlamaConfig(**_common(rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}))
    if family == "mistral":
        return tf.MistralConfig(**_common(sliding_window=WINDOW, head_dim=8))
    if family == "qwen3":
        return tf.Qwen3Config(**_common(head_dim=8, use_sliding_window=True, sliding_window=WINDOW,
                                        layer_types=_layer_types("s", "f", "s")))
    if family == "smollm3":
        return tf.SmolLM3Config(**_common(no_rope_layers=[1, 0, 1], use_sliding_window=False))
    if family == "starcoder2":
        return tf.Starcoder2Config(**_common(sliding_window=WINDOW, use_bias=True, hidden_act="gelu_pytorch_tanh",
                                             residual_dropout=0.0, embedding_dropout=0.0, attention_dropout=0.0))
    if family == "olmo":
        return tf.OlmoConfig(**_common())
    if family == "olmo2":
        return tf.Olmo2Config(**_common())
    if family == "gemma":
        return tf.GemmaConfig(**_common(head_dim=8, tie_word_embeddings=True))
    if family == "gemma2":
        return tf.Gemma2Config(**_common(head_dim=8, query_pre_attn_scalar=8, attn_logit_softcapping=3.0,
                                         final_logit_softcapping=2.0, sliding_window=WINDOW,
                                         layer_types=_layer_types("s", "f", "s"), tie_word_embeddings=True))
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**_common(head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=2.0,
                                             sliding_window=WINDOW, layer_types=_layer_types("s", "f", "s"),
                                             tie_word_embeddings=True))
    if family == "gemma3":  # a Gemma 3 (vision + text) checkpoint: the text model under model.language_model
        vision = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=28, patch_size=14)
        return tf.Gemma3Config(text_config=_cfg("gemma3_text").to_dict(), vision_config=vision.to_dict(),
                               mm_tokens_per_image=4, image_token_index=5, boi_token_index=6, eoi_token_index=7)
    if family == "granite":
        return tf.GraniteConfig(**_common(embedding_multiplier=2.0, attention_multiplier=0.3,
                                          residual_multiplier=0.5, logits_scaling=4.0))
    if family == "cohere":
        return tf.CohereConfig(**_common(logit_scale=0.5, use_qk_norm=True, tie_word_embeddings=True))
    if family == "phi":
        return tf.PhiConfig(**_common(qk_layernorm=True, partial_rotary_factor=0.5, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attention_dropout=0.0))
    if family == "phi3":
        return tf.Phi3Config(**_common(sliding_window=WINDOW, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attention_dropout=0.0))
    if family == "stablelm":
        return tf.StableLmConfig(**_common(qk_layernorm=True, use_qkv_bias=True, partial_rotary_factor=0.25,
                                           num_key_value_heads=4, hidden_dropout=0.0, attention_dropout=0.0))
    if family == "gptj":
        v = models.tokenizer().vocab_size
        return tf.GPTJConfig(vocab_size=v, n_positions=64, n_embd=32, n_layer=3, n_head=4, rotary_dim=4,
                             bos_token_id=0, eos_token_id=0, initializer_range=0.15, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0)
    if family == "opt":
        v = models.tokenizer().vocab_size
        return tf.OPTConfig(vocab_size=v, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=48,
                            max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=True,
                            bos_token_id=0, eos_token_id=0, pad_token_id=1, dropout=0.0, attention_dropout=0.0,
                            init_std=0.15)
    if family == "opt350":  # facebook/opt-350m's layout: post-LN blocks, project_in / project_out, no final norm
        v = models.tokenizer().vocab_size
        return tf.OPTConfig(vocab_size=v, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=48,
                            max_position_embeddings=64, word_embed_proj_dim=16, do_layer_norm_before=False,
                            bos_token_id=0, eos_token_id=0, pad_token_id=1, dropout=0.0, attention_dropout=0.0,
                            init_std=0.15)
    if family == "mixtral":
        return tf.MixtralConfig(**_common(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
                                          intermediate_size=16))
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**_common(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                           head_dim=8, norm_topk_prob=True, decoder_sparse_step=1,
                                           mlp_only_layers=[]))
    if family == "gpt_oss":
        return tf.GptOssConfig(**_common(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16,
                                         head_dim=8, sliding_window=WINDOW, layer_types=_layer_types("s", "f", "s"),
                                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    raise KeyError(family)


# family -> what the suite expects of it (besides the checks every family passes)
CONFIGS = {
    "gpt2": {"quirks": "Conv1D, fused [q|k|v], learned positions, scale_attn_by_inverse_layer_idx"},
    "llama3": {"quirks": "Llama 3.x rope scaling (rope_type llama3), GQA"},
    "mistral": {"window": True, "quirks": "sliding window 4 < prompt"},
    "qwen2": {"quirks": "q/k/v biases, tied embeddings"},
    "gpt_neox": {"quirks": "per-head fused qkv, partial rotary 0.5, parallel residual"},
    "qwen3": {"window": True, "quirks": "q/k norms, sliding/full layer_types"},
    "smollm3": {"quirks": "layers without RoPE (no_rope_layers)"},
    "starcoder2": {"window": True, "quirks": "LayerNorm, ungated MLP, biases, sliding window"},
    "olmo": {"quirks": "non-parametric LayerNorm"},
    "olmo2": {"post_norm": True, "quirks": "no pre-norms, post-attention / post-MLP RMSNorms, q/k norms"},
    "gemma": {"quirks": "(1 + w) RMSNorm, sqrt(d) embedding scale, GeGLU, tied"},
    "gemma2": {"window": True, "post_norm": True, "softcap": True,
               "quirks": "attention-logit soft-capping 3, final-logit soft-capping 2, sliding/full layer_types, "
                         "post-norms, query_pre_attn_scalar"},
    "gemma3_text": {"window": True, "post_norm": True,
                    "quirks": "q/k norms, final-logit soft-capping, sliding/full layer_types, post-norms"},
    "gemma3": {"window": True, "post_norm": True,
               "quirks": "Gemma3ForConditionalGeneration (vision tower present, text prompts), as gemma3_text"},
    "granite": {"quirks": "embedding 2, attention 0.3, residual 0.5 multipliers, logits_scaling 4"},
    "cohere": {"quirks": "parallel block, bias-free LayerNorm, q/k LayerNorms, interleaved RoPE, logit_scale 0.5"},
    "phi": {"quirks": "parallel block, partial rotary 0.5, qk_layernorm, lm_head bias"},
    "phi3": {"window": True, "quirks": "fused qkv_proj (GQA), fused gate_up_proj, sliding window"},
    "stablelm": {"quirks": "LayerNorm, per-head q/k LayerNorms, qkv bias, partial rotary 0.25"},
    "gptj": {"quirks": "parallel block, partial interleaved rotary (rotary_dim 4), lm_head bias"},
    "opt": {"quirks": "learned positions (offset 2), block-level flattened MLP, pre-scaled query, ReLU"},
    "opt350": {"post_ln": True,
               "quirks": "post-LayerNorm blocks (the residual renormalised), project_in / project_out "
                         "(word_embed_proj_dim 16 != hidden 32), no final norm"},
    "mixtral": {"window": True, "moe": True, "quirks": "4 experts top-2 (eager experts), sliding window"},
    "qwen3_moe": {"moe": True, "quirks": "4 experts top-2, q/k norms, norm_topk_prob"},
    "gpt_oss": {"window": True, "moe": True, "sinks": True,
                "quirks": "attention sinks, sliding/full layer_types, 4 experts top-2 with biases"},
}
FAMILIES = list(CONFIGS)


def build(family: str, dtype=torch.float64, seed: int = 0):
    """A tiny random model of `family` in eval mode; norm weights, biases and sinks perturbed so that no
    quirk hides behind an initial value of 0 or 1."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = {"experts_implementation": "eager"} if CONFIGS[family].get("moe") else {}
    model = AutoModelForCausalLM.from_config(_cfg(family), dtype=dtype, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln" in name or name.startswith("ln"):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("bias") or name.endswith("sinks"):
                p.add_(0.3 * torch.randn_like(p))
            elif "experts" in name:
                p.normal_(0, 0.15)
    return model.eval()


def family_lenses():
    """family -> Lens of the family's tiny float64 model, each built once (the `lenses` fixtures)."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = lv.Lens(build(family), models.tokenizer())
        return cache[family]

    return get


@pytest.fixture(scope="module")
def lenses():
    return family_lenses()


@pytest.fixture(scope="module")
def runs(lenses):
    """(lens, trace, reference run) per family, computed once."""
    cache = {}

    def get(family):
        if family not in cache:
            lens = lenses(family)
            tr = lens.trace(PROMPT, target=TARGET)
            cache[family] = (lens, tr, reference(lens.model, tr.input_ids, tr.target_id))
        return cache[family]

    return get


# the reference: autograd through a plain attention function --------------------------------------
_REF = "lensviz_conformance_reference"
_state: dict = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                         s_aux=None, **kwargs):
    """Eager attention written from the families' definitions: S = Q K^T (kept for its gradient),
    scores = softcap(s * S) + mask, softmax (with the sink logit per head appended, then dropped)."""
    n_rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(n_rep, dim=1)
    v = value.repeat_interleave(n_rep, dim=1)
    s = query @ k.transpose(-1, -2)
    s.retain_grad()
    scores = s * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : k.shape[-2]]
    if s_aux is not None:
        sink = s_aux.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        a = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        a = torch.softmax(scores, dim=-1)
    a.retain_grad()
    _state.setdefault("S", []).append(s)
    _state.setdefault("A", []).append(a)
    return (a @ v).transpose(1, 2), a


def reference(model, input_ids, target_id, params_grad=False):
    """Forward + backward of L = -log softmax(logits[-1])[target] through `_reference_attention`
    (HF's eager masks: additive, with the sliding windows). Returns S, A per layer (retained grads),
    the hidden states (retained grads), logits and loss; with params_grad, parameters keep .grad."""
    return oracle.run_with(model, input_ids, target_id, _REF, _reference_attention, _state, params_grad)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def tol(family):
    """Identities that pass through a family's norm modules hold to float32 (HF computes them in float32)."""
    return T32 if CONFIGS[family].get("post_norm") else 1e-12


# the checks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_hf_and_the_last_logit_lens_layer(family, runs):  # row 1, row 14
    lens, tr, ref = runs(family)
    assert tr.logits.dtype == torch.float64
    assert rel(tr.logits, ref["logits"]) < 1e-12
    with torch.no_grad():
        plain = lens.model(tr.input_ids[None], use_cache=False).logits[0]  # HF's own attention implementation
    assert rel(tr.logits, plain) < 1e-5  # HF eager softmax runs in float32 (research §0)
    assert tr.loss == pytest.approx(ref["loss"], abs=1e-10)
    # the vocabulary projection of the last block output is the model's own output distribution
    top = tr.logit_lens(k=5)
    probs = torch.softmax(tr.logits, -1)
    assert torch.equal(top.ids[-1], probs.topk(5, -1).indices)
    assert torch.allclose(top.probs[-1].double(), probs.topk(5, -1).values, atol=1e-6, rtol=0)  # probs are float32
    assert torch.equal(top.target_rank[-1], (probs > probs[:, tr.target_id:tr.target_id + 1]).sum(-1))


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_equals_hf_eager(family, runs):
    lens, tr, ref = runs(family)
    eager = copy.deepcopy(lens.model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(tr.input_ids[None], output_attentions=True, use_cache=False)
    t = len(tr)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    windowed = causal & ~torch.ones(t, t, dtype=torch.bool).tril(-WINDOW)
    n_windowed = 0
    for layer in range(lens.n_layers):
        a = tr.attention(layer)
        assert torch.allclose(a, out.attentions[layer][0], atol=1e-6, rtol=0)  # HF eager: float32 softmax
        assert torch.allclose(a, ref["A"][layer][0].detach(), atol=1e-12, rtol=0)
        assert torch.all(a[:, ~causal] == 0)
        if CONFIGS[family].get("window") and bool(torch.all(a[:, ~windowed] == 0)):
            n_windowed += 1
        rows = a.sum(-1)
        if CONFIGS[family].get("sinks"):
            assert torch.all(rows < 1) and torch.all(rows > 0)  # the sink takes its share of every row
        else:
            assert torch.allclose(rows, torch.ones_like(rows), atol=1e-12)
    if CONFIGS[family].get("window"):
        assert n_windowed >= 1  # at least one layer attends only inside the window, shorter than the prompt
        assert n_windowed < lens.n_layers or family in ("mistral", "starcoder2", "phi3", "mixtral")


@pytest.mark.parametrize("family", FAMILIES)
def test_reversed_attention_equals_autograd(family, runs):  # rows 2, 4, 5, 6, 7
    lens, tr, ref = runs(family)
    n_rep = lens.n_heads // lens.n_kv_heads
    for layer in range(lens.n_layers):
        ra = tr.reversed_attention(layer)
        assert rel(ra, ref["S"][layer].grad[0]) < 1e-10  # row 2: dL/d(QK^T), through soft-capping and sinks
        assert torch.all(ra.triu(1) == 0)  # row 6
        delta = tr.head_output_grad(layer)
        v = tr.qkv(layer)[2].repeat_interleave(n_rep, dim=0)
        g = delta @ v.transpose(-1, -2)
        a_grad = ref["A"][layer].grad[0]
        assert torch.allclose(g.tril(), a_grad.tril(), atol=1e-12 * float(a_grad.abs().max()))  # row 4
        if not (CONFIGS[family].get("sinks") or CONFIGS[family].get("softcap")):  # (the tanh reweights RA)
            assert float(ra.sum(-1).abs().max()) <= 1e-12 * float(ra.abs().max())  # row 5
        if not (CONFIGS[family].get("sinks") or CONFIGS[family].get("softcap")):  # row 7 (plain softmax only)
            a, s = tr.attention(layer), tr.attention_scaling(layer)
            mean = (a * g).sum(-1, keepdim=True)
            variance = (a * (g - mean) ** 2).sum(-1).sum(-1)
            inner = (g * ra).sum(dim=(-1, -2))
            assert torch.allclose(inner, s * variance, rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("family", FAMILIES)
def test_residuals_and_gradients_equal_autograd(family, runs):  # rows 12, 13, 14
    lens, tr, ref = runs(family)
    hidden = ref["hidden"]
    for layer in range(lens.n_layers):
        assert rel(tr.resid(layer, "pre"), hidden[layer][0].detach()) < 1e-12
        assert rel(tr.resid_grad(layer, "pre"), hidden[layer].grad[0]) < 1e-10
    final = lens.model.get_submodule(lens.adapter.final_input)  # the final norm (or what reads the last block)
    with torch.no_grad():
        logits = lens.adapter.vocab_logits(lens.model, tr.resid(-1, "post"))
    assert rel(logits, tr.logits) < 1e-12  # row 14, with the family's head projection and logit transform
    x = tr.resid(-1, "post")[-1].clone().requires_grad_(True)
    lg = lens.adapter.vocab_logits(lens.model, x)
    (-torch.log_softmax(lg, -1)[tr.target_id]).backward()
    assert rel(tr.resid_grad(-1, "post")[-1], x.grad) < 1e-10  # row 13
    assert torch.all(tr.resid_grad(-1, "post")[:-1] == 0)  # row 12
    assert final is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_block_decomposes_into_head_and_neuron_writes(family, runs):  # row 16, frozen-scale post-norms
    lens, tr, _ = runs(family)
    ad, model = lens.adapter, lens.model
    for layer in range(lens.n_layers):
        pre, mid, post = (tr.resid(layer, s) for s in ("pre", "mid", "post"))
        o_bias = ad.part(model, layer, "o_proj").bias
        attn_write = tr.head_outputs(layer).sum(0)
        if o_bias is not None:
            attn_write = attn_write + tr.write(layer, "attn", o_bias.detach().expand(len(tr), -1))
        carried = tr.carried(layer, "attn")  # the residual itself, or (post-LN) its frozen-LayerNorm image
        assert torch.equal(carried, pre) != bool(CONFIGS[family].get("post_ln"))
        assert rel(carried + attn_write, mid) < tol(family)  # the parts sum to the real write
        if CONFIGS[family].get("moe"):
            with torch.no_grad():
                mlp_out = ad.mlp_module(ad.blocks_of(model)[layer])(tr.mlp_input(layer)[None])
            mlp_out = (mlp_out[0] if isinstance(mlp_out, tuple) else mlp_out)[0]
            assert rel(mid + mlp_out, post) < 1e-12
            experts, weights = tr.router(layer)
            assert experts.shape == weights.shape == (len(tr), model.config.num_experts_per_tok)
            assert torch.all(weights > 0)
            with pytest.raises(lv.LensvizError, match="mixture-of-experts"):
                tr.mlp_activations(layer)
            continue
        w = ad.as_in_out(ad.part(model, layer, "mlp_out").weight.detach())
        b = ad.part(model, layer, "mlp_out").bias
        sub = tr.mlp_activations(layer) @ w + (0 if b is None else b.detach())  # sum_n a_n value_n + b
        assert rel(tr.carried(layer, "mlp") + tr.write(layer, "mlp", sub), post) < tol(family)
        with torch.no_grad():  # the MLP run on mlp_input gives the same raw output
            raw = ad.mlp_module(ad.blocks_of(model)[layer])(tr.mlp_input(layer))
        assert rel(raw, sub) < 1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_gradients_equal_autograd(family, runs):  # rows 9, 10, 11 and W_v from A, delta
    lens, tr, _ = runs(family)
    model, ad, dims = lens.model, lens.adapter, lens.dims
    reference(model, tr.input_ids, tr.target_id, params_grad=True)
    try:
        for layer in range(lens.n_layers):
            block = ad.blocks_of(model)[layer]
            # W_v (no RoPE, no norm on v in any family): dL/dV_g = sum over g's query heads of A_h^T delta_h
            a, delta = tr.attention(layer), tr.head_output_grad(layer)
            n_rep = lens.n_heads // lens.n_kv_heads
            d_v = torch.stack([sum(a[h].T @ delta[h] for h in range(g * n_rep, (g + 1) * n_rep))
                               for g in range(lens.n_kv_heads)]).transpose(0, 1).reshape(len(tr), -1)
            x = tr.attn_input(layer)
            v_slices = [s for s in ad.proj_slices(dims, "v") if s.name == "weight"]
            for s in v_slices:
                grad = block.get_submodule(s.path).weight.grad
                grad = grad if s.index is None else grad.index_select(s.dim, s.index)
                expect = x.T @ d_v  # [in, out]
                assert rel(grad, expect if ad.weight_layout == "conv1d" else expect.T) < 1e-10
            # W_O: dL/dW_O = O^T dL/d(o_proj output), pulled back through the post-norm / multiplier
            o = tr.recording.at("o", layer)
            d_out = tr.resid_grad(layer, "post" if ad.is_parallel(model.config) else "mid")
            if ad.post_attn_norm is not None:
                norm = block.get_submodule(ad.post_attn_norm)
                norm_in = tr.recording.at("attn_y", layer)  # post-LN: the norm reads pre + attention output
                norm_in = norm_in + tr.resid(layer, "pre") if ad.post_ln else norm_in
                _, vjp = torch.func.vjp(norm, norm_in)
                d_out = vjp(d_out)[0]
            d_out = d_out * ad.multiplier(model.config)
            assert rel(ad.as_in_out(ad.part(model, layer, "o_proj").weight.grad), o.T @ d_out) < 1e-10  # row 9
            if CONFIGS[family].get("moe"):
                with pytest.raises(lv.LensvizError, match="mixture-of-experts"):
                    bl.weight_gradient(tr, layer, "mlp_out")
                _check_expert_weight_gradients(tr, layer)
                continue
            for part in bl.FF_PARTS:  # row 10: the Backward Lens rebuilds every MLP matrix's gradient
                if getattr(ad, part) is None:
                    continue
                wg = bl.weight_gradient(tr, layer, part)
                module = ad.part(model, layer, part)
                assert rel(wg.weight, module.weight.grad) < 1e-10, part
                if module.bias is not None:
                    assert rel(wg.bias, module.bias.grad) < 1e-10, part
                assert int(torch.linalg.matrix_rank(wg.weight)) <= len(tr)  # row 11
    finally:
        for p in model.parameters():
            p.grad = None


def _check_expert_weight_gradients(tr, layer):
    """Row 10 per expert: the Backward Lens rebuilds every expert's FF1 (fused gate/up) and FF2 (down)
    gradient, and its biases, from the expert's own factors; experts no token was routed to get 0."""
    from lensviz.lenses import experts as ex

    lens, ad = tr.lens, tr.adapter
    module = ex.experts_of(lens, layer)
    chosen = tr.router(layer)[0]
    for e in range(ex.n_experts(lens)):
        n_routed = int(chosen.eq(e).any(-1).sum())
        for part, (w_name, b_name) in (("mlp_in", ad.expert_params[:2]), ("mlp_out", ad.expert_params[2:])):
            wg = bl.weight_gradient(tr, layer, part, expert=e)
            grad = getattr(module, w_name).grad[e]
            assert wg.weight.shape == grad.shape and wg.expert == e
            if n_routed == 0:
                assert torch.all(wg.weight == 0) and torch.all(grad == 0)
                continue
            assert rel(wg.weight, grad) < 1e-10, (part, e)
            if b_name is not None:
                assert rel(wg.bias, getattr(module, b_name).grad[e]) < 1e-10, (part, e)
            assert int(torch.linalg.matrix_rank(wg.weight)) <= n_routed  # row 11: one factor per routed token
            assert torch.all(wg.vjps[~chosen.eq(e).any(-1)] == 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_runs_equal_hand_patched_references(family, lenses):
    lens = lenses(family)
    ad, model = lens.adapter, lens.model
    layer, heads = 1, [0, 2]
    ids, _ = lens.encode(PROMPT)
    d = lens.d_head

    def zero_heads(mod, args):
        x = args[0].clone()
        for h in heads:
            x[..., h * d:(h + 1) * d] = 0
        return (x,)

    handle = ad.part(model, layer, "o_proj").register_forward_pre_hook(zero_heads)
    try:
        with torch.no_grad():
            expect = model(ids[None], use_cache=False).logits[0]
    finally:
        handle.remove()
    tr = lens.trace(PROMPT, target=TARGET, patches=[lv.HeadAblation(layer, heads)])
    assert rel(tr.logits, expect) < 1e-5  # HF's own attention (float32 eager softmax where it has no SDPA)
    assert torch.all(tr.head_values(layer)[heads] == 0)
    zero = lens.trace(PROMPT, target=TARGET, patches=[lv.AttentionPatch(0.0)])  # row 18
    assert torch.equal(zero.logits, lens.trace(PROMPT, target=TARGET).logits)
    if CONFIGS[family].get("moe"):
        with pytest.raises(lv.LensvizError, match="mixture-of-experts"):
            lens.trace(PROMPT, target=TARGET, patches=[lv.NeuronPatch(layer, [1, 3])])
        return
    neurons = [1, 3]

    def zero_neurons(mod, args):
        a = args[0].clone()
        a[..., neurons] = 0
        return (a,)

    handle = ad.part(model, layer, "mlp_out").register_forward_pre_hook(zero_neurons)
    try:
        with torch.no_grad():
            expect = model(ids[None], use_cache=False).logits[0]
    finally:
        handle.remove()
    tr = lens.trace(PROMPT, target=TARGET, patches=[lv.NeuronPatch(layer, neurons)])
    assert rel(tr.logits, expect) < 1e-5
    assert torch.all(tr.mlp_activations(layer)[:, neurons] == 0)


def _hook_counts(model):
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return {n: tuple(len(getattr(m, a)) for a in names) for n, m in model.named_modules()}


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_lost(family, lenses):
    lens = lenses(family)
    model = lens.model
    before = ({k: v.clone() for k, v in model.state_dict().items()}, _hook_counts(model),
              model.config._attn_implementation, [p.requires_grad for p in model.parameters()])
    lens.trace(PROMPT, target=TARGET)
    lens.trace(PROMPT, patches=[lv.HeadAblation(0, 1), lv.TopKAttention(3)], backward=False)
    with lens.patched(lv.HeadAblation(0, 1)), torch.no_grad():
        model(lens.encode(PROMPT)[0][None], use_cache=False)
    state, hooks, impl, flags = before
    assert _hook_counts(model) == hooks
    assert model.config._attn_implementation == impl
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_finite(family, dtype):
    lens = lv.Lens(build(family, dtype=dtype), models.tokenizer())
    tr = lens.trace(PROMPT, target=TARGET)
    assert torch.isfinite(tr.logits).all() and tr.logits.dtype == dtype
    for layer in range(lens.n_layers):
        assert torch.isfinite(tr.attention(layer)).all()
        assert torch.isfinite(tr.reversed_attention(layer)).all()
        assert torch.isfinite(tr.resid_grad(layer, "pre")).all()
    assert torch.isfinite(tr.logit_lens(k=3).probs).all()


def _lens_calls(lens, tr):
    """Every lens and view payload, called with defaults on layer 0 / head 0 / the last position."""
    from lensviz.lenses import composition, embedding_space, neurons, reversed, visit
    from lensviz.views import payload

    return {
        "rank_heads": lambda: reversed.rank_heads(tr),
        "backward_lens": lambda: bl.backward_lens(tr),
        "shift_tokens": lambda: bl.shift_tokens(tr, 0),
        "imprint_tokens": lambda: bl.imprint_tokens(tr, 0),
        "top_sub_updates": lambda: neurons.top_sub_updates(tr),
        "debugger_view": lambda: neurons.debugger_view(tr),
        "project_values": lambda: neurons.project_values(lens, 0, [0, 1]),
        "layer_predictions": lambda: neurons.layer_predictions(tr),
        "visit_graph": lambda: visit.visit_graph(tr),
        "head_summaries": lambda: visit.head_summaries(tr, 0),
        "ln_filter": lambda: visit.ln_filter(tr),
        "qk_forms": lambda: visit.qk_forms(tr, 0),
        "composition_scores": lambda: composition.composition_scores(lens),
        "ov_svd": lambda: composition.ov_svd(lens, 0),
        "qk_svd": lambda: composition.qk_svd(lens, 0),
        "head_top_pairs": lambda: embedding_space.head_top_pairs(lens, 0, 0, "ov", k=5),
        "ffn_projections": lambda: embedding_space.ffn_projections(lens, 0, k=5),
        "head_projections": lambda: embedding_space.head_projections(lens, 0, 0, k=5),
        "payload_neurons": lambda: payload.neurons(tr, 0, len(tr) - 1),
        "payload_backward": lambda: payload.backward_table(tr),
        "payload_flow": lambda: payload.flow_graph(tr, len(tr) - 1),
        "payload_value_search": lambda: payload.value_search(lens, " Paris"),
        "compare": lambda: lv.compare(tr, lens.trace(PROMPT, target=TARGET, patches=[lv.HeadAblation(0, 0)])),
        "shift_edit": lambda: lens.trace(PROMPT, target=TARGET, patches=[lv.ShiftEdit(1, 0.5)]),
        "activation_patch": lambda: lens.trace(PROMPT, target=TARGET, patches=[lv.ActivationPatch(tr, 1, "mid")]),
        "self_patching": lambda: lens.trace(PROMPT, target=TARGET, patches=[lv.AttentionPatch(-1.0)], base=tr),
        "layer_causal": lambda: lens.trace(PROMPT, target=TARGET, gradient="layer_causal"),
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_every_lens_works_or_names_what_blocks_it(family, runs):
    from lensviz.lenses import embedding_space, neurons

    lens, tr, _ = runs(family)
    refused = {}
    for name, call in _lens_calls(lens, tr).items():
        try:
            call()
        except lv.LensvizError as err:
            refused[name] = str(err)
    parallel = lens.adapter.is_parallel(lens.model.config)
    if parallel:  # "mid" is not a tensor of a parallel block: ActivationPatch at "mid" is refused, saying so
        assert "parallel" in refused.pop("activation_patch")
    if CONFIGS[family].get("moe"):
        assert refused and all("mixture-of-experts" in m for m in refused.values()), refused
        # what still needs one MLP matrix: the calls above that name no expert (each has a per-expert form);
        # VISIT's MLP nodes, the Explorer's flow graph and value search work per routed expert
        assert set(refused) == {"imprint_tokens", "project_values", "ffn_projections", "shift_edit"}, refused
        e = int(tr.router(0)[0][-1, 0])
        e1 = int(tr.router(1)[0][-1, 0])  # routed at the last position of layer 1 (ShiftEdit's x_T)
        for name, call in {"imprint_tokens": lambda: bl.imprint_tokens(tr, 0, expert=e),
                           "project_values": lambda: neurons.project_values(lens, 0, [0, 1], expert=e),
                           "ffn_projections": lambda: embedding_space.ffn_projections(lens, 0, k=5, expert=e),
                           "backward_lens": lambda: bl.backward_lens(tr, expert=e),
                           "shift_tokens": lambda: bl.shift_tokens(tr, 0, expert=e),
                           "shift_edit": lambda: lens.trace(PROMPT, target=TARGET,
                                                            patches=[lv.ShiftEdit(1, 0.5, expert=e1)])}.items():
            call()  # the per-expert forms work
    else:
        assert refused == {}


@pytest.mark.parametrize("family", FAMILIES)
def test_visit_parts_sum_to_the_block(family, runs):  # row 16 through the VISIT decomposition
    from lensviz.lenses import visit

    lens, tr, _ = runs(family)
    k = lens.model.config.num_experts_per_tok if CONFIGS[family].get("moe") else 1  # MoE: the routed experts' neurons
    for layer in range(lens.n_layers):
        v = visit.block_vectors(tr, layer)
        assert rel(v["mlp_carried"] + v["mlp_output"], v["block_output"]) < tol(family)
        if not lens.adapter.is_parallel(lens.model.config):
            assert rel(v["attn_carried"] + v["attn_output"], v["residual_after_attn"]) < tol(family)
        if not CONFIGS[family].get("post_ln"):  # additive blocks: the carried vectors are the residual itself
            total = v["block_input"] + v["attn_output"] + v["mlp_output"]
            assert rel(total, v["block_output"]) < tol(family)
        mlp = visit.mlp_parts(tr, layer)
        assert mlp.keys.shape == mlp.values.shape == (k * lens.d_mlp, lens.d_model)
        assert (mlp.experts is None) == (k == 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_qk_forms_are_exact_only_without_rope_and_qk_norms(family, runs):
    from lensviz.lenses import visit

    lens, tr, _ = runs(family)
    qk = visit.qk_forms(tr, 1)
    normed = lens.adapter.qk_normed(lens.model)
    assert normed == any(k in family for k in ("qwen3", "olmo2", "gemma3", "cohere", "phi", "stablelm")) - (
        family == "phi3")
    assert qk.approx == (lens.adapter.rotary or normed)
    if not qk.approx:  # exact: the forms give the model's scores
        q, k, _ = tr.qkv(1)
        g = torch.arange(lens.n_heads) // (lens.n_heads // lens.n_kv_heads)
        expect = torch.einsum("hd,hjd->hj", q[:, qk.position], k[g])
        assert rel(qk.scores, expect) < 1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_through_lensviz_attention_equals_hf(family, lenses):
    """Decoding with the KV cache through lensviz's attention function (soft-capping, sinks and sliding
    windows on one-token steps) picks the tokens HF's own implementation picks."""
    lens = lenses(family)
    ids, _ = lens.encode(PROMPT)
    gen = lens.generate(PROMPT, 4)
    with torch.no_grad():
        hf = lens.model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=4,
                                 do_sample=False, pad_token_id=0)
    assert gen.ids.tolist() == hf[0, len(ids):].tolist()
    with torch.no_grad():  # the last step's logits equal a full forward over prompt + generated tokens
        full = lens.model(hf[:, :-1], use_cache=False).logits[0, -1]
    assert rel(gen.logits[-1], full) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_top_k_attention_and_segment_mask(family, lenses):
    lens = lenses(family)
    tr = lens.trace(PROMPT, target=TARGET, patches=[lv.TopKAttention(2)])
    for layer in range(lens.n_layers):
        a = tr.attention(layer)
        assert int((a > 0).sum(-1).max()) <= 2
        assert torch.isfinite(tr.reversed_attention(layer)).all()
    parts = ["I like Italy and France.", " I visited the city of"]
    seg = lens.trace(parts, target=TARGET, patches=[lv.SegmentMask()])
    (s0, e0), (s1, e1) = seg.segments
    for layer in range(lens.n_layers):
        a = seg.attention(layer)
        assert torch.all(a[:, s0:e0, s1:e1] == 0)  # the first segment never sees the second
    assert torch.isfinite(seg.logits).all()


MOE = [f for f in FAMILIES if CONFIGS[f].get("moe")]


@pytest.mark.parametrize("family", MOE)
def test_expert_sub_updates_sum_to_the_moe_output(family, runs):
    """sub-update = router weight x activation x value vector; with the experts' biases they sum to the
    MLP output (post - mid) at every position."""
    from lensviz.lenses import experts as ex

    lens, tr, _ = runs(family)
    for layer in range(lens.n_layers):
        for t in range(len(tr)):
            p = ex.expert_parts(tr, layer, t)
            assert torch.equal(p.experts, tr.router(layer)[0][t])
            assert rel(p.sub_updates, p.weights[:, None, None] * p.activations[:, :, None] * p.values) < 1e-15
            write = tr.resid(layer, "post")[t] - tr.resid(layer, "mid")[t]
            assert rel(p.output, write) < 1e-12


@pytest.mark.parametrize("family", MOE)
def test_expert_neuron_patch_equals_zeroed_value_vectors(family, lenses):
    """NeuronPatch(expert=e, neurons, 0) == the model with expert e's value vectors of those neurons zeroed."""
    lens = lenses(family)
    layer, e, neurons = 1, 2, [0, 3, 5]
    experts = lens.adapter.blocks_of(lens.model)[layer].get_submodule(lens.adapter.experts)
    down = experts.down_proj
    saved = down.detach().clone()
    ids, _ = lens.encode(PROMPT)
    try:
        with torch.no_grad():
            if family == "gpt_oss":  # down_proj [E, F, D]: rows are value vectors
                down[e, neurons] = 0
            else:  # [E, D, F]: columns are value vectors
                down[e][:, neurons] = 0
            expect = lens.model(ids[None], use_cache=False).logits[0]
    finally:
        with torch.no_grad():
            down.copy_(saved)
    tr = lens.trace(PROMPT, target=TARGET, patches=[lv.NeuronPatch(layer, neurons, expert=e)])
    assert rel(tr.logits, expect) < 1e-5  # HF sdpa / eager vs lensviz's attention
    base = lens.trace(PROMPT, target=TARGET)
    assert not torch.equal(tr.logits, base.logits)  # expert e is used at this layer
    scaled = lens.trace(PROMPT, target=TARGET, patches=[lv.NeuronPatch(layer, neurons, value=1.0, mode="scale",
                                                                         expert=e)])
    assert torch.allclose(scaled.logits, base.logits, atol=1e-12, rtol=0)  # scaling by 1 changes nothing
    with pytest.raises(lv.LensvizError, match="expert"):
        lens.trace(PROMPT, patches=[lv.NeuronPatch(layer, neurons, expert=99)])


def _hf_expert_output(module, x, e, w):
    """w * expert e's output on rows x [n, D], computed by HF's own experts module (every row routed to e
    alone with router weight w [n])."""
    idx = torch.full((x.shape[0], 1), e, dtype=torch.long)
    with torch.no_grad():
        return module(x, idx, w[:, None].to(x.dtype))


@pytest.mark.parametrize("family", MOE)
def test_expert_sub_updates_sum_to_each_experts_real_output(family, runs):
    """sum over neurons of sub_updates(expert=e) + w_e b_e = w_e * (expert e's real output), computed by
    HF's experts module; summed over experts it is the MoE block's output post - mid."""
    from lensviz.lenses import experts as ex, neurons

    lens, tr, _ = runs(family)
    for layer in range(lens.n_layers):
        module = ex.experts_of(lens, layer)
        x = tr.mlp_input(layer)
        total = torch.zeros_like(x)
        for e in range(ex.n_experts(lens)):
            w = ex.routing_weight(tr, layer, e)
            subs = neurons.sub_updates(tr, layer, list(range(lens.d_mlp)), expert=e)  # [T, F, D]
            bias = neurons.value_bias(lens, layer, expert=e)
            part = subs.sum(1) + (0 if bias is None else w[:, None].to(x.dtype) * bias)
            assert rel(part, _hf_expert_output(module, x, e, w)) < 1e-12
            assert torch.all(subs[w == 0] == 0)  # positions not routed to e get nothing from it
            total += part
        assert rel(total, tr.resid(layer, "post") - tr.resid(layer, "mid")) < 1e-12
        assert rel(neurons.mlp_output(tr, layer), total) < 1e-12


@pytest.mark.parametrize("family", MOE)
def test_expert_top_sub_updates_and_value_search(family, runs, tmp_path):
    from lensviz.lenses import experts as ex, neurons

    lens, tr, _ = runs(family)
    subs = neurons.top_sub_updates(tr, 6, positions=[-1, 3])
    for j, layer in enumerate(subs.layers):
        for p, t in enumerate(subs.positions):
            brute = []  # every (expert, neuron) of the experts routed at t, scored |w a| ||v||
            for e in tr.router(layer)[0][t].tolist():
                m = neurons.sub_updates(tr, layer, list(range(lens.d_mlp)), positions=[t], expert=e)[0]  # [F, D]
                brute += [(float(m[n].norm()), e, n) for n in range(lens.d_mlp)]
            brute.sort(reverse=True)
            got = list(zip(subs.experts[j, p].tolist(), subs.dims[j, p].tolist()))
            assert got == [(e, n) for _, e, n in brute[:6]]
            assert torch.allclose(subs.scores[j, p], torch.tensor([b for b, _, _ in brute[:6]], dtype=subs.scores.dtype),
                                  rtol=1e-10, atol=0)
    assert subs.labels()[0][0][0] == f"L{subs.layers[0]}E{int(subs.experts[0, 0, 0])}D{int(subs.dims[0, 0, 0])}"
    view = neurons.debugger_view(tr, k=3)
    first = view["layers"][1]["sub_updates"][0]
    proj = neurons.project_values(lens, 1, [first["dim"]], 10, signs=[first["coeff"]], expert=first["expert"])
    assert [t["id"] for t in first["tokens"]] == proj.ids[0].tolist()
    # the value index covers every expert: its hits are exactly the brute-force top-k memberships
    index = neurons.build_value_index(lens, k=8, cache_dir=tmp_path)
    assert len(index) == lens.n_layers * ex.n_experts(lens) * lens.d_mlp
    tid = lens.token_id(" Paris")
    expect = set()
    for layer in range(lens.n_layers):
        for e in range(ex.n_experts(lens)):
            logits = neurons.value_vectors(lens, layer, expert=e) @ lens.unembed_module.weight.detach().T
            top = logits.topk(8, dim=-1).indices
            expect |= {(layer, e, n) for n in range(lens.d_mlp) if tid in top[n].tolist()}
    hits = index.query(tid, limit=None)
    assert {(h["layer"], h["expert"], h["dim"]) for h in hits} == expect and expect
    h = hits[0]
    assert h["label"] == f"L{h['layer']}E{h['expert']}D{h['dim']}"
    assert index.value_tokens(h["layer"], h["dim"], expert=h["expert"])[h["rank"]]["id"] == tid
    with pytest.raises(lv.LensvizError, match="expert"):
        index.value_tokens(h["layer"], h["dim"])


@pytest.mark.parametrize("family", MOE)
def test_expert_backward_lens_tables_and_readouts(family, runs):
    from lensviz.lenses import embedding_space as es, experts as ex

    lens, tr, _ = runs(family)
    e = int(tr.router(1)[0][-1, 0])  # routed at the last position of layer 1
    table = bl.backward_lens(tr, k=3, expert=e)
    w = torch.stack([ex.routing_weight(tr, layer, e) for layer in range(lens.n_layers)])
    assert torch.equal(table.routed, w != 0)
    delta = torch.stack([tr.mlp_output_grad(layer) for layer in range(lens.n_layers)])
    assert torch.allclose(table.ff2.norm, (w[..., None].to(delta.dtype) * delta).norm(dim=-1).to(table.ff2.norm.dtype))
    assert torch.all(table.ff1.norm[~table.routed] == 0)
    # FF1 VJPs: the expert's fused gate/up gradient is x^T dL/dh (checked against autograd above), and
    # the imprint of a neuron is minus its key's gradient row
    grads = bl.ff1_output_grads(tr, 1, expert=e)["mlp_in"]
    imprint = bl.imprint_tokens(tr, 1, expert=e, top=3)
    wg = bl.weight_gradient(tr, 1, "mlp_in", expert=e)
    rows = ex.expert_keys(lens, 1, e).shape[0]
    assert grads.shape == (len(tr), rows)
    key_grads = wg.weight if lens.adapter.expert_layout == "linear" else wg.weight.T  # [F1, D]
    assert torch.allclose(imprint.update_norm, key_grads[imprint.neurons].norm(dim=-1), rtol=1e-10)
    shift = bl.shift_tokens(tr, 1, -1, k=5, expert=e)
    assert torch.equal(shift.ids, lens.project(-w[1, -1].to(delta.dtype) * delta[1, -1], 5).ids)
    # FFN keys of the expert: h = x @ keys^T (+ bias) reproduces the expert's FF1 outputs
    f = ex.expert_factors(tr, 1, e)
    keys = torch.cat(lens.adapter.split_gate_up(ex.expert_keys(lens, 1, e).T), dim=-1)  # [D, 2F] gate | up
    gate, up = es.ffn_keys(lens, 1, "mlp_gate", expert=e), es.ffn_keys(lens, 1, "mlp_in", expert=e)
    assert torch.equal(keys, torch.cat([gate.T, up.T], dim=-1))
    b = lens.expert_weight(1, e, "mlp_in", "bias")
    h = f.x @ ex.expert_keys(lens, 1, e).T + (0 if b is None else b.detach())
    assert rel(h, f.h) < 1e-12
    # dense-only calls name the property; dense families refuse expert=
    for call in (lambda: bl.weight_gradient(tr, 1, "mlp_in"), lambda: es.ffn_keys(lens, 1),
                 lambda: bl.weight_gradient(tr, 1, "mlp_gate", expert=e)):
        with pytest.raises(lv.LensvizError, match="mixture-of-experts|expert"):
            call()


def test_dense_families_refuse_expert(runs):
    from lensviz.lenses import neurons

    lens, tr, _ = runs("llama3")
    for call in (lambda: bl.weight_gradient(tr, 0, "mlp_out", expert=0),
                 lambda: neurons.value_vectors(lens, 0, expert=0), lambda: bl.backward_lens(tr, expert=0)):
        with pytest.raises(lv.LensvizError, match="dense MLP"):
            call()


@pytest.mark.parametrize("family", MOE)
def test_expert_neuron_patch_equals_a_hand_written_hook(family, lenses):
    """NeuronPatch(expert=e, mode="scale", positions=P): the reference hook re-runs HF's own experts forward
    at the positions P with expert e's value vectors of those neurons scaled, and swaps that in."""
    lens = lenses(family)
    layer, neurons, value, positions = 1, [1, 4], 2.5, [2, 7, 11]
    ad = lens.adapter
    module = ex_module = ad.blocks_of(lens.model)[layer].get_submodule(ad.experts)
    ids, _ = lens.encode(PROMPT)
    base = lens.trace(PROMPT, target=TARGET)
    chosen = base.router(layer)[0]
    e = next(int(x) for x in chosen[positions].reshape(-1))  # an expert routed at one of the positions
    down = module.down_proj

    def scaled_values():
        w = down.detach().clone()
        if ad.expert_layout == "conv1d":
            w[e, neurons] *= value
        else:
            w[e][:, neurons] *= value
        return w

    def hook(mod, args, output):
        x, idx, wts = args[:3]
        rows = torch.tensor(positions)
        with torch.no_grad():
            before = mod.forward(x[rows], idx[rows], wts[rows])
            saved = down.detach().clone()
            down.copy_(scaled_values())
            try:
                after = mod.forward(x[rows], idx[rows], wts[rows])
            finally:
                down.copy_(saved)
        return output.index_add(0, rows, after - before)

    handle = ex_module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            expect = lens.model(ids[None], use_cache=False).logits[0]
    finally:
        handle.remove()
    tr = lens.trace(PROMPT, target=TARGET, patches=[lv.NeuronPatch(layer, neurons, value=value, mode="scale",
                                                                     expert=e, positions=positions)])
    assert rel(tr.logits, expect) < 1e-5  # HF sdpa / eager vs lensviz's attention
    assert not torch.allclose(tr.logits, base.logits, atol=1e-9, rtol=0)
    assert torch.equal(tr.logits[:positions[0]], base.logits[:positions[0]])  # nothing before the first position


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_paths_and_sizes_match_the_module_tree(family, lenses):
    from tests.test_adapters import BLOCK_PARTS

    lens = lenses(family)
    ad, model, dims = lens.adapter, lens.model, lens.dims
    for path in (ad.embed, ad.blocks, ad.final_norm, ad.unembed, ad.embed_proj, ad.unembed_proj):
        if path is not None:
            model.get_submodule(path)
    assert (ad.final_norm is None) == bool(CONFIGS[family].get("post_ln"))  # post-LN OPT: no final norm
    assert len(ad.blocks_of(model)) == dims.n_layers
    for layer in range(dims.n_layers):
        for name in BLOCK_PARTS + ("post_attn_norm", "post_mlp_norm", "router", "experts"):
            if getattr(ad, name) is not None:
                ad.blocks_of(model)[layer].get_submodule(getattr(ad, name))
    w = lens.attention_weights(0)
    assert w["q"].shape == (dims.n_heads, dims.d_model, dims.d_head)
    assert w["k"].shape == w["v"].shape == (dims.n_kv_heads, dims.d_model, dims.d_head)
    assert w["o"].shape == (dims.n_heads, dims.d_head, dims.d_model)
    if not ad.moe:
        assert ad.as_in_out(lens.weight(0, "mlp_out")).shape == (dims.d_mlp, dims.d_model)
        ff1 = ad.as_in_out(lens.weight(0, "mlp_in")).shape
        assert ff1 == (dims.d_model, (2 if ad.gate_up else 1) * dims.d_mlp)
    assert model.get_submodule(ad.unembed).weight.shape[0] == dims.vocab_size


QK_NORMED = [f for f in FAMILIES if any(k in f for k in ("qwen3", "olmo2", "gemma3", "cohere", "stablelm"))
             or f == "phi"]
POST_NORMED = [f for f in FAMILIES if CONFIGS[f].get("post_norm") or CONFIGS[f].get("post_ln")]


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


@pytest.mark.parametrize("family", QK_NORMED)
def test_weight_lenses_fold_the_qk_norms(family, runs):
    """circuit_weights' W_Q M_h (W_K M_g) is the q (k) norm's output direction: the norm module's real
    output minus its bias is a positive multiple of x W_Q M + b_Q M (captured from the model's run)."""
    from lensviz.lenses import embedding_space as es

    lens, tr, _ = runs(family)
    layer, t, dims = 1, len(tr), lens.dims
    attn = lens.adapter.blocks_of(lens.model)[layer].get_submodule(lens.adapter.attn)
    seen = {}
    handles = []
    for side in "qk":
        norm = next(getattr(attn, n) for n in (f"{side}_norm", f"{side}_layernorm") if getattr(attn, n, None) is not None)
        def keep(mod, args, out, side=side):
            seen.setdefault(side, (args[0].detach(), out.detach(), mod))

        handles.append(norm.register_forward_hook(keep))
    try:
        with torch.no_grad():
            lens.model(tr.input_ids[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    raw, folded = lens.attention_weights(layer), es.circuit_weights(lens, layer)
    maps = lens.adapter.qk_norm_maps(lens.model, layer, dims)
    x = tr.attn_input(layer)
    for side, n in (("q", dims.n_heads), ("k", dims.n_kv_heads)):
        inp, out, norm = seen[side]
        as_thd = (lambda z: z[0].transpose(0, 1)) if inp.dim() == 4 and inp.shape[1] == n else \
            (lambda z: z[0].reshape(t, n, dims.d_head))
        b = raw["b" + side]
        pre = torch.einsum("tD,hDd->thd", x, raw[side]) + (0 if b is None else b)
        assert rel(as_thd(inp), pre) < 1e-12  # the norm's input is the raw projection
        lin = torch.einsum("tD,hDd->thd", x, folded[side]) + (0 if b is None else torch.einsum("hd,hde->he", b, maps[side]))
        bias = getattr(norm, "bias", None)
        target = as_thd(out) - (0 if bias is None else bias.detach())
        assert float((_cos(target, lin) - 1).abs().max()) < 1e-6  # same direction, positive factor
        ratio = target.norm(dim=-1) / lin.norm(dim=-1)
        assert torch.all(ratio > 0)
    with pytest.raises(lv.LensvizError, match="q/k"):
        es.head_attention(tr, layer)


@pytest.mark.parametrize("family", POST_NORMED)
def test_weight_lenses_fold_the_post_norms(family, runs):
    """circuit_weights' W_O g (post-LN OPT: W_O P g, P the centring): head h's write to the residual
    (frozen-scale decomposition) is c_t O_h W_O g with c_t = 1 / rms of the summed attention output (post-LN:
    1 / std of pre + attention output), the same positive factor for every head at t; FFN value projections
    carry the post-MLP map; an OV component edit acts on the folded W_O."""
    from lensviz.lenses import composition, embedding_space as es

    lens, tr, _ = runs(family)
    layer = 1
    folded = es.circuit_weights(lens, layer)
    o = tr.head_values(layer)  # [H, T, d]
    pred = torch.matmul(o, folded["o"].to(o.dtype))  # [H, T, D]
    y = tr.recording.at("attn_y", layer)
    norm = lens.adapter.blocks_of(lens.model)[layer].get_submodule(lens.adapter.post_attn_norm)
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon")
    layer_norm = CONFIGS[family].get("post_ln")  # post-LN OPT: a LayerNorm of pre + attention output
    if layer_norm:
        x = y + tr.resid(layer, "pre")
        c = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)  # [T, 1]
    else:
        c = torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)  # [T, 1]
    assert rel(tr.head_outputs(layer), c * pred) < T32
    gain = lens.adapter.post_norm_gain(lens.model, layer, "mlp")
    values = lens.adapter.as_in_out(lens.weight(layer, "mlp_out"))[:3]
    values = ((values - values.mean(-1, keepdim=True)) if layer_norm else values) * gain  # P v diag(g)
    got = es.ffn_projections(lens, layer, "value", [0, 1, 2], k=5)
    assert torch.equal(got.ids, es.project_write(lens, values, 5).ids)
    before = composition.head_weights(lens, layer)
    svd = composition.factored_svd(before["v"][0].double(), before["o"][0].double())
    with composition.edited_component(lens, layer, 0, 0, alpha=0.0):
        after = composition.head_weights(lens, layer)
    expect = svd.matrix() - svd.S[0] * svd.U[:, :1] @ svd.V[:, :1].T
    assert rel(after["v"][0].double() @ after["o"][0].double(), expect) < 1e-10


@pytest.mark.parametrize("family", MOE)
def test_expert_neuron_patch_on_mode(family, lenses):
    """mode "on" with expert=e sets a_{e,i} to the layer's largest sub-update score at the last position
    (over the experts routed there, brute force) + 0.01."""
    from lensviz.lenses import neurons

    lens = lenses(family)
    layer, cells = 1, [0, 2]
    base = lens.trace(PROMPT, target=TARGET)
    e = int(base.router(layer)[0][-1, 0])
    best = max(float(neurons.sub_updates(base, layer, list(range(lens.d_mlp)), positions=[-1], expert=x)[0]
                     .norm(dim=-1).max()) for x in base.router(layer)[0][-1].tolist())
    on = lens.trace(PROMPT, target=TARGET, patches=[lv.NeuronPatch(layer, cells, mode="on", expert=e)], base=base)
    st = lens.trace(PROMPT, target=TARGET, patches=[lv.NeuronPatch(layer, cells, value=best + 0.01, expert=e)])
    assert torch.allclose(on.logits, st.logits, atol=1e-12, rtol=0)
    assert not torch.allclose(on.logits, base.logits, atol=1e-9, rtol=0)


POST_LN = [f for f in FAMILIES if CONFIGS[f].get("post_ln")]


@pytest.mark.parametrize("family", POST_LN)
def test_post_ln_sites_maps_and_patches_equal_hand_written_hooks(family, runs):
    """Post-LayerNorm OPT (opt-350m layout): the recorded pre / mid / post residuals are HF's own block
    input, post-attention LayerNorm output and block output (forward hooks written here); the frozen-scale
    map is LN(r + y) = (g / s) P r + (g / s) P y + b with s the std of the norm's real input; the
    vocabulary projection is project_out then lm_head; the embedding-space matrices are the plain
    products W_U W_out and W_E W_in^T; patched runs equal hand-patched HF runs."""
    from lensviz.lenses import embedding_space as es

    lens, tr, _ = runs(family)
    model = lens.model
    dec = model.model.decoder
    seen, handles = {}, []
    for layer, block in enumerate(dec.layers):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, kw, layer=layer: seen.__setitem__(("pre", layer), (a[0] if a else kw["hidden_states"])[0].clone()),
            with_kwargs=True))
        for name, site in (("self_attn_layer_norm", "mid"), ("final_layer_norm", "post")):
            handles.append(getattr(block, name).register_forward_hook(
                lambda m, a, o, layer=layer, site=site: seen.__setitem__((site, layer), (a[0].clone(), o[0].clone()))))
    handles.append(dec.project_out.register_forward_pre_hook(lambda m, a: seen.__setitem__("final", a[0][0].clone())))
    try:
        with torch.no_grad():
            logits = model(tr.input_ids[None], use_cache=False).logits[0]
    finally:
        for h in handles:
            h.remove()
    assert dec.final_layer_norm is None and dec.project_in is not None
    for layer in range(lens.n_layers):
        assert rel(tr.resid(layer, "pre"), seen[("pre", layer)]) < 1e-12
        for site, sublayer, before in (("mid", "attn", "pre"), ("post", "mlp", "mid")):
            x, out = seen[(site, layer)]  # the norm's input r + y and its output
            assert rel(tr.resid(layer, site), out) < 1e-12
            norm = getattr(dec.layers[layer], "self_attn_layer_norm" if site == "mid" else "final_layer_norm")
            s = (x.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()  # this run's std
            assert rel(tr.write_scale(layer, sublayer), norm.weight.detach() / s) < 1e-12
            r = tr.resid(layer, before)
            centred = r - r.mean(-1, keepdim=True)
            expect = norm.weight.detach() / s * centred + norm.bias.detach()  # (g / s) P r + b
            assert rel(tr.carried(layer, sublayer), expect) < 1e-12
            u = torch.randn(lens.d_model, dtype=torch.float64)  # carry_back is the carried map's transpose
            t = 5
            jac = torch.autograd.functional.jacobian(lambda z: tr.write(layer, sublayer, z, position=t), r[t])
            assert rel(tr.carry_back(layer, sublayer, u, t), jac.T @ u) < 1e-12
    assert rel(tr.resid(-1, "post"), seen["final"]) < 1e-12
    assert rel(tr.logits, logits) < 1e-5  # HF's own attention
    proj = dec.project_out.weight.detach()
    assert rel(lens.adapter.vocab_logits(model, tr.resid(-1, "post")), tr.resid(-1, "post") @ proj.T @
               model.lm_head.weight.detach().T) < 1e-12
    # embedding-space matrices: W_U through project_out, W_E through project_in (+ positions = the block input)
    assert rel(es.unembedding(lens), (model.lm_head.weight.detach() @ proj).T) < 1e-15
    w_in = dec.project_in.weight.detach()
    e_in = es.input_embedding(lens).T[tr.input_ids]
    pos = dec.embed_positions(torch.ones(1, len(tr), dtype=torch.long), 0)[0]
    assert rel(e_in + pos, tr.resid(0, "pre")) < 1e-12
    assert rel(e_in, dec.embed_tokens.weight.detach()[tr.input_ids] @ w_in.T) < 1e-15
    # DLA through every later LayerNorm sums to the model's logit
    dla = lv.direct_logit_attribution(tr)
    assert dla.total == pytest.approx(float(tr.logits[-1, tr.target_id]), abs=1e-10)
    assert dla.logit == pytest.approx(float(tr.logits[-1, tr.target_id]), abs=1e-12)
    # ActivationPatch at the last block's "post" (the project_out input) against a hand-written hook
    other = lens.trace("I like Italy and city. I visited the city of", target=TARGET)  # same token length
    assert len(other) == len(tr)
    src = tr.resid(-1, "post")

    def put(mod, args):
        x = args[0].clone()
        x[:, 3] = src[3]
        return (x,)

    handle = dec.project_out.register_forward_pre_hook(put)
    try:
        with torch.no_grad():
            expect = model(other.input_ids[None], use_cache=False).logits[0]
    finally:
        handle.remove()
    got = lens.trace(other.prompt, target=TARGET, patches=[lv.ActivationPatch(tr, lens.n_layers - 1, "post",
                                                                              positions=[3])])
    assert rel(got.logits, expect) < 1e-5
    assert rel(got.resid(-1, "post")[3], src[3]) < 1e-15


@pytest.mark.parametrize("family", POST_LN)
def test_post_ln_layer_causal_gradient_is_each_layers_own_loss(family, lenses):
    """gradient="layer_causal" on post-LN OPT: each layer's loss is the NLL of W_U W_out resid post
    (plain matrices, no final norm), and dL_l / d resid(l, "pre") is autograd of that loss alone through
    block l of HF's forward (its input made a leaf by a hand-written hook)."""
    lens = lenses(family)
    model = lens.model
    dec = model.model.decoder
    lc = lens.trace(PROMPT, target=TARGET, gradient="layer_causal")
    w = model.lm_head.weight.detach() @ dec.project_out.weight.detach()  # [V, D]
    for layer in range(lens.n_layers):
        own = float(-torch.log_softmax(lc.resid(layer, "post")[-1] @ w.T, -1)[lc.target_id])
        assert lc.layer_losses[layer] == pytest.approx(own, abs=1e-10)
        keep = {}

        def leaf(mod, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
            keep["x"] = x
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

        def out(mod, args, output):
            keep["y"] = output[0] if isinstance(output, tuple) else output

        handles = [dec.layers[layer].register_forward_pre_hook(leaf, with_kwargs=True),
                   dec.layers[layer].register_forward_hook(out)]
        try:
            model(lc.input_ids[None], use_cache=False)
        finally:
            for h in handles:
                h.remove()
        loss = -torch.log_softmax(keep["y"][0, -1] @ w.T, -1)[lc.target_id]
        (grad,) = torch.autograd.grad(loss, keep["x"])
        assert rel(lc.resid_grad(layer, "pre"), grad[0]) < 1e-10


@pytest.mark.parametrize("family", POST_LN)
def test_post_ln_patches_equal_hand_patched_hf_runs(family, lenses):
    """ActivationPatch at "pre" / "mid" / "post", HeadPatch and NeuronPatch on post-LN OPT against plain HF
    hooks: "pre" replaces the block's input, "mid" the post-attention LayerNorm's output (the MLP's input
    and the residual it is added to), "post" the post-MLP LayerNorm's output; heads replace o_proj input
    slices, neurons fc2 input columns."""
    lens = lenses(family)
    model = lens.model
    dec = model.model.decoder
    clean = lens.trace(PROMPT, target=TARGET)
    corrupt_prompt = "I like Italy and city. I visited the city of"
    ids, _ = lens.encode(corrupt_prompt)
    assert len(ids) == len(clean)
    base = lens.trace(corrupt_prompt, target=TARGET)
    layer = 1
    differ = ((clean.resid(layer, "pre") - base.resid(layer, "pre")).norm(dim=-1) > 1e-6).nonzero()[:, 0].tolist()
    pos = [differ[0], differ[-1]]  # the changed token and the last position

    def hf(module, kind, fn):
        handle = (module.register_forward_pre_hook(fn) if kind == "pre" else module.register_forward_hook(fn))
        try:
            with torch.no_grad():
                return model(ids[None], use_cache=False).logits[0]
        finally:
            handle.remove()

    def put_output(value):
        def hook(mod, args, output):
            out = output.clone()
            out[:, pos] = value[pos]
            return out
        return hook

    def put_input(value, cols=None):
        def hook(mod, args):
            x = args[0].clone()
            if cols is None:
                x[:, pos] = value[pos]
            else:  # flattened [T, F] (fc2) or [1, T, H*d] (out_proj): replace those columns everywhere
                x[..., cols] = value[..., cols].reshape(x[..., cols].shape)
            return (x, *args[1:])
        return hook

    block = dec.layers[layer]
    cases = [
        (lv.ActivationPatch(clean, layer, "pre", positions=pos), hf(block, "pre", put_input(clean.resid(layer, "pre")))),
        (lv.ActivationPatch(clean, layer, "mid", positions=pos),
         hf(block.self_attn_layer_norm, "fwd", put_output(clean.resid(layer, "mid")))),
        (lv.ActivationPatch(clean, layer, "post", positions=pos),
         hf(block.final_layer_norm, "fwd", put_output(clean.resid(layer, "post")))),
    ]
    d = lens.d_head
    heads = [0, 3]
    cols = [c for h in heads for c in range(h * d, (h + 1) * d)]
    o_clean = clean.recording.at("o", layer)  # [T, H*d], the clean o_proj input
    cases.append((lv.HeadPatch(clean, layer, heads), hf(block.self_attn.out_proj, "pre", put_input(o_clean[None], cols))))
    neurons = [1, 5]

    def scale_neurons(mod, args):
        a = args[0].clone()
        a[:, neurons] = a[:, neurons] * 2.5
        return (a,)

    cases.append((lv.NeuronPatch(layer, neurons, value=2.5, mode="scale"), hf(block.fc2, "pre", scale_neurons)))
    for patch, expect in cases:
        got = lens.trace(corrupt_prompt, target=TARGET, patches=[patch])
        assert rel(got.logits, expect) < 1e-5, patch  # HF's own attention (sdpa) vs lensviz's
        assert not torch.allclose(got.logits, base.logits, atol=1e-9, rtol=0), patch
    mid = lens.trace(corrupt_prompt, target=TARGET, patches=[cases[1][0]])
    assert rel(mid.resid(layer, "mid")[pos], clean.resid(layer, "mid")[pos]) < 1e-15
    others = [t for t in range(len(ids)) if t not in pos]
    assert torch.equal(mid.resid(layer, "mid")[others], base.resid(layer, "mid")[others])


@pytest.mark.parametrize("family", POST_LN)
def test_post_ln_shift_edit_equals_the_weight_edit(family, lenses):
    """ShiftEdit on post-LN OPT: W_ff2 += eta x_T e_t^T with e_t the target's embedding as it enters the
    residual stream, project_in(W_E[t]) (HF's own modules); the edited copy of the model gives the patched
    run's logits."""
    lens = lenses(family)
    layer, eta = 1, 0.3
    base = lens.trace(PROMPT, target=TARGET)
    tr = lens.trace(PROMPT, target=TARGET, patches=[lv.ShiftEdit(layer, eta)])
    dec = lens.model.model.decoder
    with torch.no_grad():
        e_t = dec.project_in(dec.embed_tokens.weight[base.target_id])  # [D]
    x_t = base.mlp_activations(layer)[-1]
    edited = copy.deepcopy(lens.model)
    with torch.no_grad():
        edited.model.decoder.layers[layer].fc2.weight.add_(eta * torch.outer(e_t, x_t))  # Linear: [D, F]
        ref = edited(tr.input_ids[None], use_cache=False).logits[0]
    assert rel(tr.logits, ref) < 1e-5  # HF's own attention (sdpa) vs lensviz's
    assert not torch.allclose(tr.logits, base.logits, atol=1e-6, rtol=0)
