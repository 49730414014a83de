"""Traces on every device this machine has (the CPU, and CUDA where there is a GPU) in float32 and
bfloat16: the numbers match a float64 CPU trace of the same weights to the precision of the dtype, and
every tensor comes back detached, on the CPU, in the model's dtype. `bash benchmarks/gpu.sh` runs this
file on a GPU machine, where the CUDA parameters are added (the code paths that differ there: logits
reduced in one block per chunk, accelerate-free device placement, the fused kernel's boolean masks)."""
from __future__ import annotations

import pytest
import torch

import lensviz as lv
from tests import models
from tests.conftest import PROMPT

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOL = {"float32": 1e-4, "bfloat16": 6e-2}  # relative (Frobenius) error against float64
FAMILIES = ("gpt2", "llama", "gpt_neox")
TARGET = " Paris"


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(params=[(f, d, dev) for f in FAMILIES for d in DTYPES for dev in DEVICES],
                ids=lambda p: "-".join(p))
def pair(request, tiny_tokenizer):
    """(reference float64 CPU lens, the same weights on `device` in `dtype`, dtype name)."""
    family, dtype, device = request.param
    ref = lv.Lens(models.build(family), tiny_tokenizer)
    lens = lv.Lens(models.build(family).to(device=device, dtype=DTYPES[dtype]), tiny_tokenizer)
    return ref, lens, dtype


def _on_cpu_in(dtype, *tensors):
    for t in tensors:
        assert t.device.type == "cpu" and t.dtype == DTYPES[dtype] and not t.requires_grad


def test_trace_matches_float64(pair):
    ref_lens, lens, dtype = pair
    ref, tr = ref_lens.trace(PROMPT, target=TARGET), lens.trace(PROMPT, target=TARGET)
    tol = TOL[dtype]
    assert tr.target_id == ref.target_id and abs(tr.loss - ref.loss) <= tol * max(1.0, abs(ref.loss))
    for layer in range(lens.n_layers):
        got = (tr.logits, tr.resid(layer, "mid"), tr.resid_grad(layer, "pre"), tr.attention(layer),
               tr.reversed_attention(layer), tr.head_outputs(layer), tr.mlp_activations(layer), tr.mlp_output_grad(layer))
        want = (ref.logits, ref.resid(layer, "mid"), ref.resid_grad(layer, "pre"), ref.attention(layer),
                ref.reversed_attention(layer), ref.head_outputs(layer), ref.mlp_activations(layer),
                ref.mlp_output_grad(layer))
        _on_cpu_in(dtype, *got)
        for name, g, w in zip(("logits", "mid", "dpre", "A", "RA", "heads", "a", "dmlp"), got, want):
            assert rel(g, w) < tol, f"layer {layer} {name}: {rel(g, w):.2e}"


def test_patched_trace_matches_float64(pair):
    ref_lens, lens, dtype = pair
    patches = (lv.AttentionPatch(-0.5, layers=[1]), lv.TopKAttention(3, layers=[2]), lv.HeadAblation(0, [1]))
    ref = ref_lens.trace(PROMPT, target=TARGET, patches=patches)
    tr = lens.trace(PROMPT, target=TARGET, patches=patches)
    assert rel(tr.attention(1), ref.attention(1)) < TOL[dtype]  # A + eta * RA
    assert rel(tr.reversed_attention(1), ref.reversed_attention(1)) < TOL[dtype]
    a, a_ref = tr.attention(2), ref.attention(2)  # top-3 keys per query: the same keys, up to near-ties
    same = ((a != 0) == (a_ref != 0)).all(-1)  # [H, T] rows that kept the same keys
    assert same.double().mean() >= (1.0 if dtype == "float32" else 0.8)
    assert rel(a[same], a_ref[same]) < TOL[dtype]
    assert torch.all((a != 0).sum(-1) <= 3)
    assert rel(tr.logits, ref.logits) < (TOL[dtype] if dtype == "float32" else 0.15)


def test_projection_and_logit_lens_match_float64(pair):
    ref_lens, lens, dtype = pair
    ref, tr = ref_lens.trace(PROMPT, target=TARGET), lens.trace(PROMPT, target=TARGET)
    got, want = tr.logit_lens(k=3), ref.logit_lens(k=3)
    assert got.ids.shape == want.ids.shape and got.probs.dtype == torch.float32
    agree = (got.ids[..., 0] == want.ids[..., 0]).double().mean()
    assert agree >= (0.99 if dtype == "float32" else 0.8)  # bfloat16 rounds near-ties either way
    p_ref = torch.softmax(ref_lens.unembed_module(ref_lens.final_norm_module(ref.resid(1))), -1)
    p_at = p_ref.gather(-1, got.ids[1])  # float64 probabilities of the tokens the device picked
    assert torch.allclose(got.probs[1].double(), p_at, atol=TOL[dtype], rtol=TOL[dtype])
    v = ref.resid(2).to(DTYPES[dtype])
    bottom = lens.project(v, k=2, bottom=True, normalize=True)
    assert bottom.ids.device.type == "cpu" and bottom.probs.max() <= want.probs.max()


def test_generate_returns_cpu_tensors(pair):
    _, lens, dtype = pair
    out = lens.generate(PROMPT, max_new_tokens=3)
    assert 1 <= len(out) <= 3 and out.ids.device.type == "cpu" and out.logits.shape == (len(out), lens.vocab_size)
    assert out.logits.dtype == DTYPES[dtype]
