"""A model dispatched by accelerate (some blocks offloaded to disk, their parameters on the meta device
between uses) traces exactly like the same model held in memory, and every tensor lensviz returns is
on the CPU. Weight-based lenses (head_outputs) load the offloaded weights on demand and leave them
offloaded afterwards."""
from __future__ import annotations

import pytest
import torch

import lensviz as lv
from tests import models
from tests.conftest import PROMPT

TARGET = " Paris"
SITES = ("pre", "mid", "post")
DISK_LAYERS = (1, 2)


def device_map(lens) -> dict:
    """Embedding, block 0, the other backbone modules, final norm and LM head on "cpu"; blocks 1, 2 on disk."""
    a = lens.adapter
    base = a.blocks.rsplit(".", 1)[0]
    dm = {f"{base}.{name}": "cpu" for name, _ in lens.model.get_submodule(base).named_children()
          if f"{base}.{name}" != a.blocks}
    dm.update({f"{a.blocks}.{i}": ("disk" if i in DISK_LAYERS else "cpu") for i in range(lens.n_layers)})
    dm[a.unembed] = "cpu"
    assert dm[a.embed] == "cpu" and dm[a.final_norm] == "cpu"
    return dm


def dispatched_pair(family, dtype, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    plain = lv.Lens(models.build(family, dtype=dtype), tokenizer)
    plain.model.save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map(plain),
                                                 offload_folder=str(tmp_path / "off"), dtype=dtype).eval()
    return plain, lv.Lens(model, tokenizer)


def offloaded(lens, layer) -> list[str]:
    block = lens.adapter.blocks_of(lens.model)[layer]
    return [n for n, p in block.named_parameters() if p.device.type == "meta"]


def close(got, want, rtol):
    assert isinstance(got, torch.Tensor) and got.device.type == "cpu", "lensviz returned a tensor off the CPU"
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = float(want.abs().max()) if want.numel() else 0.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= rtol * scale + 1e-30, f"max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("family, dtype, rtol", [(f, torch.float32, 1e-6) for f in models.FAMILIES]
                         + [("llama", torch.float64, 0.0), ("gpt2", torch.float64, 0.0)])
def test_offloaded_model_traces_like_plain(family, dtype, rtol, tmp_path, tiny_tokenizer):
    plain, disp = dispatched_pair(family, dtype, tmp_path, tiny_tokenizer)
    for layer in DISK_LAYERS:  # really offloaded: the blocks' parameters are not in memory
        assert offloaded(disp, layer) and len(offloaded(disp, layer)) == len(list(
            disp.adapter.blocks_of(disp.model)[layer].parameters()))
    assert not offloaded(disp, 0)

    want = plain.trace(PROMPT, target=TARGET)
    got = disp.trace(PROMPT, target=TARGET)
    assert got.tokens == want.tokens and got.target_id == want.target_id
    close(got.logits, want.logits, rtol)
    assert got.loss == pytest.approx(want.loss, rel=max(rtol, 1e-15), abs=0)
    for layer in range(plain.n_layers):
        for site in SITES:
            close(got.resid(layer, site), want.resid(layer, site), rtol)
            close(got.resid_grad(layer, site), want.resid_grad(layer, site), rtol)
        for g, w in zip(got.qkv(layer), want.qkv(layer)):
            close(g, w, rtol)
        close(got.attention(layer), want.attention(layer), rtol)
        close(got.reversed_attention(layer), want.reversed_attention(layer), rtol)
        close(got.head_outputs(layer), want.head_outputs(layer), rtol)
        close(got.mlp_activations(layer), want.mlp_activations(layer), rtol)
        close(got.mlp_output_grad(layer), want.mlp_output_grad(layer), rtol)
    # the weights read for head_outputs were put back: still offloaded, model unchanged
    for layer in DISK_LAYERS:
        assert len(offloaded(disp, layer)) == len(list(disp.adapter.blocks_of(disp.model)[layer].parameters()))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_offloaded_weights_are_read_on_demand(family, tmp_path, tiny_tokenizer):
    plain, disp = dispatched_pair(family, torch.float32, tmp_path, tiny_tokenizer)
    for layer in range(plain.n_layers):
        for part in ("o_proj", "mlp_out", "mlp_in"):
            w = disp.weight(layer, part)
            assert w.device.type == "cpu"
            assert torch.equal(w, plain.weight(layer, part))
        assert torch.equal(disp.weight(layer, "ln1"), plain.weight(layer, "ln1"))
    for layer in DISK_LAYERS:
        assert len(offloaded(disp, layer)) == len(list(disp.adapter.blocks_of(disp.model)[layer].parameters()))


def test_offloaded_forward_only_and_repeat(tmp_path, tiny_tokenizer):
    """Forward-only traces and repeated traces of the dispatched model agree bit for bit."""
    _, disp = dispatched_pair("qwen2", torch.float32, tmp_path, tiny_tokenizer)
    a = disp.trace(PROMPT, target=TARGET)
    b = disp.trace(PROMPT, target=TARGET, backward=False)
    c = disp.trace(PROMPT, target=TARGET)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.logits, c.logits)
    for layer in range(disp.n_layers):
        assert torch.equal(a.resid(layer), b.resid(layer))
        assert torch.equal(a.reversed_attention(layer), c.reversed_attention(layer))


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])  # untied embeddings: each can go to disk alone
def test_embedding_norm_and_head_offloaded_too(family, tmp_path, tiny_tokenizer):
    """With the embedding, final norm and LM head on disk as well, the trace and the vocabulary lenses
    (logit_lens, project: final norm + unembedding applied outside the model's forward) still match."""
    from transformers import AutoModelForCausalLM

    plain = lv.Lens(models.build(family, dtype=torch.float32), tiny_tokenizer)
    plain.model.save_pretrained(tmp_path / "model")
    a = plain.adapter
    dm = device_map(plain)
    dm.update({a.embed: "disk", a.final_norm: "disk", a.unembed: "disk"})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=dm,
                                                 offload_folder=str(tmp_path / "off"), dtype=torch.float32).eval()
    disp = lv.Lens(model, tiny_tokenizer)
    for path in (a.embed, a.final_norm, a.unembed):
        assert all(p.device.type == "meta" for p in model.get_submodule(path).parameters()), path
    want, got = plain.trace(PROMPT, target=TARGET), disp.trace(PROMPT, target=TARGET)
    close(got.logits, want.logits, 1e-6)
    close(got.resid_grad(0, "pre"), want.resid_grad(0, "pre"), 1e-6)
    lw, lg = want.logit_lens(k=5), got.logit_lens(k=5)
    assert torch.equal(lg.ids, lw.ids) and torch.equal(lg.target_rank, lw.target_rank)
    close(lg.probs, lw.probs, 1e-6)
    pw, pg = plain.project(want.resid(1), k=3, target=TARGET), disp.project(got.resid(1), k=3, target=TARGET)
    assert torch.equal(pg.ids, pw.ids)
    close(pg.probs, pw.probs, 1e-6)
    for path in (a.embed, a.final_norm, a.unembed):  # still offloaded afterwards
        assert all(p.device.type == "meta" for p in model.get_submodule(path).parameters()), path


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_offloaded_moe_per_expert_lenses_match_plain(family, tmp_path, tiny_tokenizer):
    """Tiny float64 Mixtral / gpt-oss (the conformance suite's) with blocks 1, 2 on disk: the per-expert lenses
    and patches read the offloaded expert weights through Lens.expert_weight and give the in-memory model's
    numbers bit for bit; the experts are still offloaded afterwards."""
    from transformers import AutoModelForCausalLM

    from lensviz.lenses import backward as bl, embedding_space as es, experts as ex, neurons
    from tests.test_conformance import build

    plain = lv.Lens(build(family), tiny_tokenizer)
    plain.model.save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map(plain),
                                                 offload_folder=str(tmp_path / "off"), dtype=torch.float64,
                                                 experts_implementation="eager").eval()
    disp = lv.Lens(model, tiny_tokenizer)
    experts = [ex.experts_of(disp, layer) for layer in DISK_LAYERS]
    assert all(p.device.type == "meta" for m in experts for p in m.parameters())

    want, got = plain.trace(PROMPT, target=TARGET), disp.trace(PROMPT, target=TARGET)
    close(got.logits, want.logits, 0.0)
    n_experts = ex.n_experts(plain)
    for layer in range(plain.n_layers):
        assert torch.equal(got.router(layer)[0], want.router(layer)[0])
        close(ex.value_norms(disp, layer), ex.value_norms(plain, layer), 0.0)
        for e in range(n_experts):
            for part in ("mlp_in", "mlp_out"):
                for name in ("weight", "bias"):
                    w, p = disp.expert_weight(layer, e, part, name), plain.expert_weight(layer, e, part, name)
                    assert (w is None) == (p is None) == (family != "gpt_oss" and name == "bias")
                    if w is not None:
                        close(w, p, 0.0)
            close(ex.expert_keys(disp, layer, e), ex.expert_keys(plain, layer, e), 0.0)
            close(neurons.value_vectors(disp, layer, expert=e), neurons.value_vectors(plain, layer, expert=e), 0.0)
            close(neurons.sub_updates(got, layer, [0, 3], expert=e), neurons.sub_updates(want, layer, [0, 3], expert=e),
                  0.0)
            fg, fw = ex.expert_factors(got, layer, e, grads=True), ex.expert_factors(want, layer, e, grads=True)
            for a, b in ((fg.h, fw.h), (fg.a, fw.a), (fg.delta_ff1, fw.delta_ff1)):
                close(a, b, 0.0)
            for part in ("mlp_in", "mlp_out"):
                close(bl.weight_gradient(got, layer, part, expert=e).weight,
                      bl.weight_gradient(want, layer, part, expert=e).weight, 0.0)
            close(es.ffn_keys(disp, layer, "mlp_in", expert=e), es.ffn_keys(plain, layer, "mlp_in", expert=e), 0.0)
        p = ex.expert_parts(got, layer, len(got) - 1)
        close(p.sub_updates, ex.expert_parts(want, layer, len(want) - 1).sub_updates, 0.0)
        close(ex.mlp_output(got, layer), ex.mlp_output(want, layer), 0.0)
    tg, tw = neurons.top_sub_updates(got, 5), neurons.top_sub_updates(want, 5)
    assert torch.equal(tg.experts, tw.experts) and torch.equal(tg.dims, tw.dims)
    close(tg.scores, tw.scores, 0.0)
    e = int(want.router(1)[0][-1, 0])
    bg, bw = bl.backward_lens(got, k=3, expert=e), bl.backward_lens(want, k=3, expert=e)
    assert torch.equal(bg.ff1.top.ids, bw.ff1.top.ids) and torch.equal(bg.ff2.top.ids, bw.ff2.top.ids)
    for patch in (lv.NeuronPatch(1, [0, 2], 0.0, expert=e), lv.NeuronPatch(2, [1], 3.0, "scale", expert=e),
                  lv.ShiftEdit(1, 0.8, expert=e)):
        close(disp.trace(PROMPT, target=TARGET, patches=[patch]).logits,
              plain.trace(PROMPT, target=TARGET, patches=[patch]).logits, 0.0)
    view = plain.expert_weight(1, 0, "mlp_out", copy=False)  # in memory: a view of the parameter, no copy
    assert view.data_ptr() == ex.experts_of(plain, 1).down_proj[0].data_ptr()
    assert plain.expert_weight(1, 0, "mlp_out").data_ptr() != view.data_ptr()
    close(disp.expert_weight(1, 0, "mlp_out", copy=False), view, 0.0)  # offloaded: loaded from disk
    assert all(p.device.type == "meta" for m in experts for p in m.parameters())  # still offloaded
