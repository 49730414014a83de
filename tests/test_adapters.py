"""Adapters are data: every path they name exists in the family's HF module tree, the sizes they
read match the modules, and no code outside lensviz/adapters/ branches on the model type."""
from __future__ import annotations

import pathlib

import pytest

import lensviz as lv
from lensviz.adapters import adapter_for, supported_model_types
from tests import models

BLOCK_PARTS = ("ln1", "attn", "ln2", "mlp", "o_proj", "mlp_in", "mlp_out", "mlp_gate", "q_proj", "k_proj",
               "v_proj", "qkv")


@pytest.mark.parametrize("family", models.FAMILIES)
def test_adapter_paths_and_sizes_match_the_model(family):
    model = models.build(family)
    ad = adapter_for(model.config)
    dims = ad.dims(model.config)
    for path in (ad.embed, ad.blocks, ad.final_norm, ad.unembed):
        model.get_submodule(path)
    blocks = ad.blocks_of(model)
    assert len(blocks) == dims.n_layers
    for name in BLOCK_PARTS:
        if getattr(ad, name) is not None:
            ad.part(model, 0, name)
    assert (ad.qkv is None) == (ad.q_proj is not None)
    o_in_out = ad.as_in_out(ad.part(model, 0, "o_proj").weight)
    assert tuple(o_in_out.shape) == (dims.n_heads * dims.d_head, dims.d_model)
    mlp_out = ad.as_in_out(ad.part(model, 0, "mlp_out").weight)
    assert tuple(mlp_out.shape) == (dims.d_mlp, dims.d_model)
    assert model.get_submodule(ad.unembed).weight.shape[0] == dims.vocab_size
    assert ad.o_by_head(ad.part(model, 0, "o_proj").weight, dims.n_heads, dims.d_head).shape == (
        dims.n_heads, dims.d_head, dims.d_model)


def test_families_and_layout_flags():
    expect = {"gpt2": ("gpt2", "conv1d", "layernorm"), "llama": ("llama", "linear", "rmsnorm"),
              "qwen2": ("qwen2", "linear", "rmsnorm"), "gpt_neox": ("gpt_neox", "linear", "layernorm")}
    for family, (name, layout, norm) in expect.items():
        ad = adapter_for(models.config(family))
        assert (ad.family, ad.weight_layout, ad.norm) == (name, layout, norm)
    assert adapter_for(models.config("gpt_neox")).is_parallel(models.config("gpt_neox"))
    assert not adapter_for(models.config("gpt_neox_seq")).is_parallel(models.config("gpt_neox_seq"))
    assert {"gpt2", "llama", "mistral", "qwen2", "gpt_neox"} <= set(supported_model_types())


def test_unsupported_model_type_names_the_supported_families():
    from transformers import BertConfig

    with pytest.raises(lv.UnsupportedModelError, match="gpt2.*llama"):
        adapter_for(BertConfig())


def test_no_model_type_branches_outside_adapters():
    root = pathlib.Path(lv.__file__).parent
    offenders = [p for p in root.rglob("*.py") if "adapters" not in p.parts and "model_type" in p.read_text()]
    assert offenders == []


@pytest.mark.parametrize("family", models.FAMILIES)
def test_per_head_qkv_weights_reproduce_the_captured_projections(family, tiny_tokenizer):
    """x @ W_v[g] + b_v[g] is the captured v of kv head g in every family; without RoPE (GPT-2) the same
    holds for q and k; and O_h @ W_O[h] summed over heads plus b_O is the attention output."""
    import torch

    lens = lv.Lens(models.build(family), tiny_tokenizer)
    tr = lens.trace("I like Italy and France. I visited the city of", target=" Paris")
    for layer in range(lens.n_layers):
        w = lens.attention_weights(layer)
        x = lens.adapter.blocks_of(lens.model)[layer].get_submodule(lens.adapter.ln1)(tr.resid(layer, "pre")).detach()
        q, k, v = tr.qkv(layer)
        pairs = [("v", v)] + ([("q", q), ("k", k)] if family == "gpt2" else [])
        for key, captured in pairs:
            rebuilt = torch.einsum("td,hde->hte", x, w[key]) + (0 if w["b" + key] is None else w["b" + key][:, None])
            assert torch.allclose(rebuilt, captured, atol=1e-12), key
        assert w["q"].shape == (lens.n_heads, lens.d_model, lens.d_head)
        assert w["k"].shape == (lens.n_kv_heads, lens.d_model, lens.d_head)
        attn_out = tr.resid(layer, "mid") - tr.resid(layer, "pre")
        o = tr.recording.at("o", layer).reshape(len(tr), lens.n_heads, lens.d_head).transpose(0, 1)
        rebuilt = torch.einsum("htd,hdD->tD", o, w["o"]) + (0 if w["bo"] is None else w["bo"])
        assert torch.allclose(rebuilt, attn_out, atol=1e-12)


@pytest.mark.parametrize("model_type", ["falcon", "gpt_neo", "bloom"])
def test_families_bypassing_the_attention_interface_are_refused_with_the_reason(model_type):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    with pytest.raises(lv.UnsupportedModelError, match="attention interface") as info:
        adapter_for(config)
    assert model_type in str(info.value) and "llama" in str(info.value)


def test_opt_layouts_pick_their_adapter_and_the_others_are_refused_with_the_reason():
    from transformers import OPTConfig

    assert adapter_for(OPTConfig()).family == "opt"  # pre-LN (opt-125m, opt-1.3b+)
    # opt-350m: post-LN blocks with project_in / project_out and no final norm
    post = adapter_for(OPTConfig(do_layer_norm_before=False, hidden_size=1024, word_embed_proj_dim=512))
    assert post.family == "opt_post_ln" and post.post_ln and post.final_norm is None
    assert (post.embed_proj, post.unembed_proj) == ("model.decoder.project_in", "model.decoder.project_out")
    assert post.final_input == "model.decoder.project_out" and post.mlp_reader == "fc1"
    with pytest.raises(lv.UnsupportedModelError, match="do_layer_norm_before=False.*pre-LayerNorm"):
        adapter_for(OPTConfig(do_layer_norm_before=False))  # post-LN without the projections
    with pytest.raises(lv.UnsupportedModelError, match="word_embed_proj_dim=512 != hidden_size=1024"):
        adapter_for(OPTConfig(hidden_size=1024, word_embed_proj_dim=512))  # pre-LN with them
