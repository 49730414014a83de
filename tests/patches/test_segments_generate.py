"""MAS prefill followed by cached decoding (methods-2 §4.4, acceptance check §4.9 #4), `Lens.generate`,
and `SegmentMask` under `lens.patched` with `model.generate`.

The reference is always one plain `model(...)` call over prompt + generated tokens with an explicit
4-D float additive mask built here: block-plus-causal over the prompt's segments, causal rows for the
generated tokens (which see the whole prompt), as methods-2 §4.8 describes.
"""
from __future__ import annotations

import copy

import pytest
import torch

import lensviz as lv
from tests import models

PARTS = ["I like Italy and France.", " I visited the city of", " Paris and"]
N_NEW = 6


@pytest.fixture(params=["gpt2", "llama"])
def lens(request, tiny_tokenizer):
    return lv.Lens(models.build(request.param), tiny_tokenizer)


def extended_mask(n_prompt: int, n_total: int, spans, dtype) -> torch.Tensor:
    """[1, 1, N, N] additive mask: 0 where allowed (j <= i, or i and j in one prompt segment), min elsewhere."""
    i = torch.arange(n_total)[:, None]
    j = torch.arange(n_total)[None, :]
    allowed = j <= i
    for start, end in spans:
        assert 0 <= start < end <= n_prompt
        inside = (i >= start) & (i < end) & (j >= start) & (j < end)
        allowed = allowed | inside
    return torch.zeros(n_total, n_total, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def reference_logits(model, ids: torch.Tensor, n_prompt: int, spans) -> torch.Tensor:
    """Logits [N, V] of one forward pass over ids [N] with the extended MAS mask (no cache)."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        mask = extended_mask(n_prompt, len(ids), spans, dtype)
        return model(ids[None], attention_mask=mask, use_cache=False).logits[0]


def causal_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None], use_cache=False).logits[0]


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_mas_prefill_then_cached_decoding_equals_one_extended_forward(lens):  # §4.9 check 4, float64
    ids, spans = lens.encode(PARTS)
    assert max(e - s for s, e in spans) > 1  # MAS has something to change
    g = lens.generate(PARTS, N_NEW, patches=(lv.SegmentMask(),), min_new_tokens=N_NEW)
    assert len(g) == N_NEW and g.logits.shape == (N_NEW, lens.vocab_size) and g.logits.dtype == torch.float64
    assert torch.equal(g.prompt_ids, ids)
    full = torch.cat([ids, g.ids])
    ref = reference_logits(lens.model, full, len(ids), spans)
    err = float((g.logits - ref[len(ids) - 1:-1]).abs().max())
    assert err < 1e-10, err
    # greedy: each new token is the argmax of the logits it was chosen from (min_new_tokens only bans EOS)
    eos = lens.tokenizer.eos_token_id
    assert torch.equal(g.ids, g.logits.index_fill(1, torch.tensor([eos]), float("-inf")).argmax(-1))
    # not vacuous: the causal forward over the same tokens differs at the prefill and at every decoding step
    causal = causal_logits(lens.model, full)[len(ids) - 1:-1]
    assert float((causal - ref[len(ids) - 1:-1]).abs().amax(-1).min()) > 1e-3
    # the prefill equals the trace path's MAS forward at every prompt position
    tr = lens.trace(PARTS, patches=(lv.SegmentMask(),), backward=False)
    assert torch.allclose(tr.logits, ref[:len(ids)], atol=1e-10)
    assert no_hooks(lens.model)


def test_patched_model_generate_masks_the_prefill_only(lens):
    base = lens.trace(PARTS, backward=False)
    with lens.patched(lv.SegmentMask(), base=base):
        out = lens.model.generate(base.input_ids[None], max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                                  pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, len(base):]
    ref = reference_logits(lens.model, out.sequences[0], len(base), base.segments)[len(base) - 1:-1]
    steps = torch.cat(out.logits)  # generate hands back float32 copies of the logits
    assert steps.shape == (N_NEW, lens.vocab_size)
    assert float((steps.double() - ref).abs().max()) < 1e-5
    g = lens.generate(PARTS, N_NEW, patches=(lv.SegmentMask(),), min_new_tokens=N_NEW)
    assert torch.equal(g.ids, new)
    assert no_hooks(lens.model)


def test_explicit_spans_resolve_against_the_base_trace(lens):
    base = lens.trace("I like Italy and France. I visited the city of", backward=False)
    spans = [(1, 5), (6, len(base))]
    g = lens.generate(base.prompt, 4, patches=(lv.SegmentMask(spans),), min_new_tokens=4)
    ref = reference_logits(lens.model, torch.cat([base.input_ids, g.ids]), len(base), spans)
    assert float((g.logits - ref[len(base) - 1:-1]).abs().max()) < 1e-10
    plain = lens.generate(base.prompt, 4, min_new_tokens=4)
    assert float((g.logits[0] - plain.logits[0]).abs().max()) > 1e-3


def test_generate_input_longer_than_the_trace_keeps_the_extra_tokens_causal(lens):
    base = lens.trace(PARTS[:2], backward=False)  # the prompt the mask refers to
    full_ids, _ = lens.encode(PARTS)  # base's ids, then " Paris and" (segments are tokenised one by one)
    assert torch.equal(full_ids[:len(base)], base.input_ids) and len(full_ids) > len(base) + 1
    with lens.patched(lv.SegmentMask(), base=base):
        out = lens.model.generate(full_ids[None], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                                  output_logits=True, return_dict_in_generate=True)
    ref = reference_logits(lens.model, out.sequences[0], len(base), base.segments)
    steps = torch.cat(out.logits).double()
    assert float((steps - ref[len(full_ids) - 1:-1]).abs().max()) < 1e-5
    # the tokens after base's prompt are causal: MAS over all three segments gives other logits
    all_three = reference_logits(lens.model, out.sequences[0], len(full_ids), lens.encode(PARTS)[1])
    assert float((all_three[len(full_ids) - 1] - ref[len(full_ids) - 1]).abs().max()) > 1e-3


def test_full_forward_decoding_without_cache_equals_cached_decoding(lens):
    cached = lens.generate(PARTS, N_NEW, patches=(lv.SegmentMask(),), min_new_tokens=N_NEW)
    uncached = lens.generate(PARTS, N_NEW, patches=(lv.SegmentMask(),), min_new_tokens=N_NEW, use_cache=False)
    assert torch.equal(cached.ids, uncached.ids)
    assert torch.allclose(cached.logits, uncached.logits, atol=1e-10)  # every step re-encodes with the extended mask


def test_without_segment_mask_decoding_equals_plain_generate(lens):
    ids = lens.encode(PARTS)[0]
    with torch.no_grad():
        plain = lens.model.generate(ids[None], max_new_tokens=N_NEW, do_sample=False, pad_token_id=0,
                                    output_logits=True, return_dict_in_generate=True)
    g = lens.generate(PARTS, N_NEW)
    assert len(g) == plain.sequences.shape[1] - len(ids) > 0
    assert torch.equal(g.ids, plain.sequences[0, len(ids):])
    assert torch.allclose(g.logits.float(), torch.cat(plain.logits)[:len(g)], atol=1e-5)
    assert torch.allclose(g.logits, causal_logits(lens.model, torch.cat([ids, g.ids]))[len(ids) - 1:-1], atol=1e-10)
    assert g.text == lens.tokenizer.decode(g.ids.tolist()) and g.tokens == [lens.decode(i) for i in g.ids.tolist()]
    one_token = lens.generate(PARTS, N_NEW, patches=(lv.SegmentMask([(i, i + 1) for i in range(len(ids))]),))
    assert torch.equal(one_token.ids, g.ids)  # single-token segments add nothing to causal
    assert torch.allclose(one_token.logits, g.logits, atol=1e-12)


def test_generate_composes_segment_mask_with_other_patches(lens):
    ablate = lv.HeadAblation(1, [0, 2])
    g = lens.generate(PARTS, 3, patches=(lv.SegmentMask(), ablate), min_new_tokens=3)
    base = lens.trace(PARTS, backward=False)
    with lens.patched(lv.SegmentMask(), ablate, base=base), torch.no_grad():
        inside = lens.model(torch.cat([base.input_ids, g.ids])[None]).logits[0]  # one forward, extended mask
    assert torch.allclose(g.logits, inside[len(base) - 1:-1], atol=1e-10)
    only_mas = lens.generate(PARTS, 3, patches=(lv.SegmentMask(),), min_new_tokens=3)
    assert float((only_mas.logits[0] - g.logits[0]).abs().max()) > 1e-3


def test_bad_generate_arguments_are_rejected(lens):
    for bad in (0, -2, 2.5, True, "3", None):
        with pytest.raises(lv.LensvizError, match="max_new_tokens must be a positive int"):
            lens.generate(PARTS, bad)
    with pytest.raises(lv.LensvizError, match=f"more than the {lens.max_tokens} tokens"):
        lens.generate(PARTS, lens.max_tokens)
    with pytest.raises(lv.LensvizError, match="sets"):
        lens.generate(PARTS, 3, max_length=50)
    with pytest.raises(lv.LensvizError, match="one sequence"):
        lens.generate(PARTS, 3, num_beams=2)
    with pytest.raises(lv.LensvizError, match="lensviz patches"):
        lens.generate(PARTS, 3, patches=("mask",))
    with pytest.raises(lv.LensvizError, match="prompt"):
        lens.generate("", 3)
    base = lens.trace(PARTS, backward=False)
    for prompt_only in (lv.AttentionPatch(-1.0), lv.ActivationPatch(base, 1)):
        with pytest.raises(lv.LensvizError, match="cannot apply to generate's decoding steps"):
            lens.generate(PARTS, 3, patches=(prompt_only,))
    assert no_hooks(lens.model)


def test_bad_segment_mask_inputs_are_rejected(lens):
    base = lens.trace(PARTS, backward=False)
    n = len(base)
    with pytest.raises(lv.LensvizError, match=rf"segment \(0, {n + 3}\) is not a \[start, end\) span inside 0\.\.{n}"):
        lens.generate(PARTS, 3, patches=(lv.SegmentMask([(0, n + 3)]),))
    with pytest.raises(lv.LensvizError, match="is not a"):
        with lens.patched(lv.SegmentMask([(n, n + 1)]), base=base):
            pass
    with pytest.raises(lv.LensvizError, match="needs base="):
        with lens.patched(lv.SegmentMask()):
            pass
    other = lens.encode("The capital of Japan is the city of Tokyo. The capital of France is Paris.")[0]
    assert len(other) > n
    with lens.patched(lv.SegmentMask(), base=base), torch.no_grad():
        with pytest.raises(lv.LensvizError, match="do not start with them"):
            lens.model.generate(other[None], max_new_tokens=2, do_sample=False, pad_token_id=0)
        with pytest.raises(lv.LensvizError, match=f"called with {n - 1} input ids"):
            lens.model(base.input_ids[None, 1:])
        with pytest.raises(lv.LensvizError, match="do not start with them"):
            lens.model(other[None, :n])
        with pytest.raises(lv.LensvizError, match="one forward pass, but this call encodes only its first 5"):
            lens.model(base.input_ids[None, :5])
        with pytest.raises(lv.LensvizError, match="one forward pass"):
            lens.model.generate(base.input_ids[None], max_new_tokens=2, do_sample=False, pad_token_id=0,
                                prefill_chunk_size=4)
        with pytest.raises(lv.LensvizError, match="input_ids"):
            lens.model(inputs_embeds=lens.model.get_input_embeddings()(base.input_ids[None]))
        padded = torch.ones(1, n, dtype=torch.long)
        padded[0, 0] = 0
        with pytest.raises(lv.LensvizError, match="padding inside the prompt"):
            lens.model(base.input_ids[None], attention_mask=padded)
        # after those errors the block still works: a forward over the prompt is the MAS forward
        inside = lens.model(base.input_ids[None]).logits[0]
    ref = reference_logits(lens.model, base.input_ids, n, base.segments)
    assert torch.allclose(inside, ref, atol=1e-10)
    assert no_hooks(lens.model)


@pytest.mark.slow
def test_mas_generation_on_smollm2_matches_one_extended_forward(smol):  # §4.9 check 4 on the real model
    parts = ["The capital of France is Paris.", " The capital of Italy is Rome.", " The capital of Spain is"]
    ids, spans = smol.encode(parts)
    g = smol.generate(parts, 5, patches=(lv.SegmentMask(),), min_new_tokens=5)
    assert len(g) == 5 and g.logits.dtype == torch.float32
    full = torch.cat([ids, g.ids])
    ref = reference_logits(smol.model, full, len(ids), spans)[len(ids) - 1:-1]
    # float32: the cached steps and the one full forward round differently (logits up to ~30 here, errors
    # ~1e-4 absolute, as large as the float32 reference's own error against a float64 one); hold the
    # error below 1e-4 relative to the logit scale, and the next-token probabilities below 1e-4 absolute
    err = float((g.logits - ref).abs().max())
    assert err < 1e-4 * float(ref.abs().max()), err
    assert float((torch.softmax(g.logits, -1) - torch.softmax(ref, -1)).abs().max()) < 1e-4
    causal = causal_logits(smol.model, full)[len(ids) - 1:-1]
    assert float((causal - ref).abs().amax(-1).min()) > 1e-2  # MAS changes every step's logits
    base = smol.trace(parts, backward=False)
    with smol.patched(lv.SegmentMask(), base=base):
        out = smol.model.generate(base.input_ids[None], max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences[0, len(ids):], g.ids)
    assert float((torch.cat(out.logits) - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    plain = smol.generate(parts, 5)
    with torch.no_grad():
        hf = smol.model.generate(ids[None], max_new_tokens=5, do_sample=False)
    assert torch.equal(plain.ids, hf[0, len(ids):])
    assert no_hooks(smol.model)
    # the same real model in float64: the identity holds to rounding (the float32 errors above are rounding)
    lens64 = lv.Lens(copy.deepcopy(smol.model).double(), smol.tokenizer)
    g64 = lens64.generate(parts, 5, patches=(lv.SegmentMask(),), min_new_tokens=5)
    ref64 = reference_logits(lens64.model, torch.cat([ids, g64.ids]), len(ids), spans)[len(ids) - 1:-1]
    assert float((g64.logits - ref64).abs().max()) < 1e-9
