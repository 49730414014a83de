"""Prompt-pair measures against hand-written HF hooks and autograd, float64, on families with different
block maths: GPT-2 (plain sequential), OLMo 2 and Gemma 2 (post-norms: the attention output passes a
norm before it joins the residual), Granite (residual multiplier) and GPT-J / Phi (parallel blocks).

Every oracle here runs the HF model itself, with hooks written in this file:
* zero-ablation of one head = a pre-hook on its output projection zeroing the head's input slice;
* keep-top-p = the same hook on every layer, zeroing the heads outside the top fraction;
* resid "mid" patched at (layer, position) = the block's output at that position replaced by the clean
  run's (the MLP acts per position, so mid fixes it), and the patched run's mid equals the clean mid;
* the RA ranking = ||dL/dS_h||_F from autograd through a plain attention function (S = Q K^T);
* attribution at "mid" / "post" = (clean - corrupt activation) . d metric / d activation from autograd.
"""
from __future__ import annotations

import pytest
import torch

import lensviz as lv
from tests.test_conformance import CONFIGS, PROMPT, T32, family_lenses
from tests.test_conformance_pairs import CORRUPT, DISTRACTOR, MULTI, _ScoreGrads

FAMILIES = ["gpt2", "olmo2", "gemma2", "granite", "gptj", "phi", "opt350"]
SEQUENTIAL = ["gpt2", "olmo2", "gemma2", "gemma3_text", "granite", "llama3", "opt350"]
TARGET = " Paris"
PROMPTS = [PROMPT, "The capital of Japan is the city of", "Obama grew up in Hawaii. Lionel Messi plays for"]
CELLS = [(0, 4), (1, 11), (2, 2), (2, 7)]  # (layer, position) of the hand-checked mid patches


@pytest.fixture(scope="module")
def lenses():
    return family_lenses()


def atol(family):
    """HF computes the norms of the post-norm families in float32 even for float64 models."""
    return 1e-6 if CONFIGS[family].get("post_norm") else 1e-10


def rtol(family):
    return T32 * 10 if CONFIGS[family].get("post_norm") else 1e-9


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def hf_metric(model, ids, targets, distractor=None, hooks=()):
    """The metric of one HF forward over ids, with `hooks` [(module, kind, fn)] installed for it:
    the summed target log-probability at the last len(targets) positions, or the last position's
    logit(target) - logit(distractor)."""
    handles = []
    try:
        for module, kind, fn in hooks:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(fn))
            elif kind == "pre_kw":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(fn))
        with torch.no_grad():
            logits = model(ids[None], use_cache=False).logits[0].double()
    finally:
        for h in handles:
            h.remove()
    if distractor is not None:
        return float(logits[-1, targets[0]] - logits[-1, distractor])
    lp = torch.log_softmax(logits, -1)
    n = len(targets)
    return float(sum(lp[len(ids) - n + k, t] for k, t in enumerate(targets)))


def zero_heads(heads, d):
    """A pre-hook on an output projection zeroing the input slices of `heads`."""
    def hook(mod, args):
        x = args[0].clone()
        for h in heads:
            x[..., h * d:(h + 1) * d] = 0
        return (x, *args[1:])

    return hook


# head importance by exact zero-ablation -----------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_ablation_importance_equals_one_hand_run_per_head(family, lenses):
    lens = lenses(family)
    model, ad = lens.model, lens.adapter
    for target, distractor in ((TARGET, None), (MULTI, None), (TARGET, DISTRACTOR)):
        tr = lens.trace(PROMPT, target=target, distractor=distractor, backward=False)
        d_id = None if distractor is None else lens.token_id(distractor)
        base = hf_metric(model, tr.input_ids, tr.target_ids, d_id)
        assert tr.metric == pytest.approx(base, abs=atol(family))
        got = lv.head_importance(tr, measure="ablation", batch_size=5)  # batches of 5, 5, 2 heads per layer
        assert got.shape == (lens.n_layers, lens.n_heads) and got.dtype == torch.float64
        expect = torch.empty_like(got)
        for layer in range(lens.n_layers):
            o_proj = ad.part(model, layer, "o_proj")
            for head in range(lens.n_heads):
                hook = (o_proj, "pre", zero_heads([head], lens.d_head))
                expect[layer, head] = hf_metric(model, tr.input_ids, tr.target_ids, d_id, [hook]) - base
        assert torch.allclose(got, expect, rtol=0, atol=atol(family)), (got - expect).abs().max()
        assert float(expect.abs().max()) > 1e-3  # the heads matter: the check is not of zeros


# keep the top fraction of heads -------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_top_heads_equals_hand_ablation_of_the_rest(family, lenses):
    lens = lenses(family)
    model, ad = lens.model, lens.adapter
    n_l, n_h = lens.n_layers, lens.n_heads
    tr = lens.trace(PROMPT, target=TARGET, backward=False)
    scores = torch.randn(n_l, n_h, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fractions = [0.0, 0.25, 0.5, 0.75, 1.0]  # 0, 3, 6, 9, 12 of the 12 heads: no rounding question
    sw = lv.keep_top_heads(tr, scores, fractions, batch_size=2)
    ranked = sorted(range(n_l * n_h), key=lambda i: -float(scores.flatten()[i]))
    assert sw.kept.tolist() == [0, 3, 6, 9, 12] and torch.equal(sw.fractions, torch.tensor(fractions).double())
    for i, p in enumerate(fractions):
        keep = set(ranked[:round(p * n_l * n_h)])
        hooks = [(ad.part(model, layer, "o_proj"), "pre",
                  zero_heads([h for h in range(n_h) if layer * n_h + h not in keep], lens.d_head))
                 for layer in range(n_l)]
        expect = hf_metric(model, tr.input_ids, tr.target_ids, None, hooks)
        assert float(sw.metric[i]) == pytest.approx(expect, abs=atol(family))
    assert float(sw.metric[-1]) == pytest.approx(sw.metric_full, abs=atol(family))
    assert sw.metric_full == tr.metric


# the Reversed Attention head ranking over prompts -------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_ra_head_ranking_equals_autograd_over_prompts(family, lenses):
    lens = lenses(family)
    model = lens.model
    for target in (TARGET, None):
        rank = lv.ra_head_ranking(lens, PROMPTS, target=target)
        norms = []
        for prompt in PROMPTS:
            ids, _ = lens.encode(prompt)
            with torch.no_grad():
                top = int(model(ids[None], use_cache=False).logits[0, -1].argmax())
            t = lens.token_id(TARGET) if target is not None else top

            def loss_fn(logits, t=t):
                return -torch.log_softmax(logits, -1)[-1, t]

            _, scores = _ScoreGrads().run(model, ids, loss_fn)
            norms.append(torch.stack([s.grad[0].double().flatten(1).norm(dim=1) for s in scores]))  # [L, H]
        norms = torch.stack(norms)  # [n_prompts, L, H]
        assert rank.norms.shape == norms.shape == (len(PROMPTS), lens.n_layers, lens.n_heads)
        assert rel(rank.norms, norms) < rtol(family)
        assert rel(rank.mean, norms.mean(0)) < rtol(family)
        mean, std = norms.mean(0), ((norms - norms.mean(0)) ** 2).mean(0).sqrt()  # population std
        assert rel(rank.std, std) < rtol(family) * 10
        flat = mean.flatten()
        order = rank.order
        assert sorted(order) == [(la, h) for la in range(lens.n_layers) for h in range(lens.n_heads)]
        values = [float(flat[la * lens.n_heads + h]) for la, h in order]
        assert all(a >= b - 1e-9 for a, b in zip(values, values[1:]))  # decreasing mean ||RA||


# ActivationPatch(site="mid") and the sweep's mid against a hand-written residual patch -------------
def _post_ln(ad) -> bool:
    """Post-LN blocks (OPT-350m): the residual after attention is the post-attention norm's output."""
    return ad.post_ln


def _block_out(output):
    return output[0] if isinstance(output, tuple) else output


def _clean_block_outputs(model, ad, ids):
    """The clean run's block outputs [L][T, D] and mid residuals (the input of the MLP side: its norm,
    or the MLP where there is none), from HF hooks."""
    outs, mids, handles = {}, {}, []
    for layer, block in enumerate(ad.blocks_of(model)):
        handles.append(block.register_forward_hook(
            lambda m, a, o, layer=layer: outs.__setitem__(layer, _block_out(o)[0].clone())))
        if _post_ln(ad):  # post-LN OPT: mid is the post-attention LayerNorm's output
            handles.append(block.get_submodule(ad.post_attn_norm).register_forward_hook(
                lambda m, a, o, layer=layer: mids.__setitem__(layer, o[0].clone())))
            continue
        mid_module = block.get_submodule(ad.ln2 or ad.mlp)
        handles.append(mid_module.register_forward_pre_hook(
            lambda m, a, kw, layer=layer: mids.__setitem__(layer, (a[0] if a else kw["hidden_states"])[0].clone()),
            with_kwargs=True))
    try:
        with torch.no_grad():
            model(ids[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return outs, mids


def _replace_block_output(pos, value):
    def hook(mod, args, output):
        out = _block_out(output).clone()
        out[:, pos] = value
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return hook


@pytest.mark.parametrize("family", SEQUENTIAL)
def test_mid_patch_equals_a_hand_written_residual_patch(family, lenses):
    lens = lenses(family)
    model, ad = lens.model, lens.adapter
    clean = lens.trace(PROMPT, target=TARGET, backward=False)
    corrupt = lens.trace(CORRUPT, target=TARGET, backward=False)
    assert len(clean) == len(corrupt)
    outs, mids = _clean_block_outputs(model, ad, clean.input_ids)
    base = hf_metric(model, corrupt.input_ids, corrupt.target_ids)
    sweep = lens.patching_sweep(clean, corrupt, site="mid")
    post = lens.patching_sweep(clean, corrupt, site="post")
    assert sweep.metric_corrupt == pytest.approx(base, abs=atol(family))
    block = ad.blocks_of(model)
    for layer, pos in CELLS:
        hook = (block[layer], "post", _replace_block_output(pos, outs[layer][pos]))
        expect = hf_metric(model, corrupt.input_ids, corrupt.target_ids, None, [hook]) - base
        patched = lens.trace(CORRUPT, target=TARGET, backward=False,
                             patches=[lv.ActivationPatch(clean, layer, "mid", positions=[pos])])
        # the patched run's residual between attention and MLP is the clean one at pos, the corrupt one elsewhere
        assert rel(patched.resid(layer, "mid")[pos], mids[layer][pos]) < rtol(family)
        others = [q for q in range(len(clean)) if q != pos]
        assert rel(patched.resid(layer, "mid")[others], corrupt.resid(layer, "mid")[others]) < 1e-12
        assert rel(patched.resid(layer, "post")[pos], outs[layer][pos]) < rtol(family)
        assert patched.metric - base == pytest.approx(expect, abs=10 * atol(family))
        assert float(sweep.effect[layer, pos]) == pytest.approx(expect, abs=atol(family))
        assert float(post.effect[layer, pos]) == pytest.approx(expect, abs=atol(family))
    every = lens.trace(CORRUPT, target=TARGET, backward=False, patches=[lv.ActivationPatch(clean, 1, "mid")])
    assert rel(every.resid(1, "mid"), mids[1]) < rtol(family)  # every position
    assert rel(every.resid(1, "post"), outs[1]) < rtol(family)


# attribution at "mid" and "post" against autograd -------------------------------------------------
@pytest.mark.parametrize("family", SEQUENTIAL)
def test_mid_and_post_attribution_equal_delta_times_autograd(family, lenses):
    lens = lenses(family)
    model, ad = lens.model, lens.adapter
    for distractor in (None, DISTRACTOR):
        mid = lens.patching_sweep(PROMPT, CORRUPT, target=TARGET, distractor=distractor, site="mid",
                                  method="attribution")
        post = lens.patching_sweep(mid.clean, mid.corrupt, site="post", method="attribution")
        t, dist = lens.token_id(TARGET), None if distractor is None else lens.token_id(distractor)
        outs_clean, mids_clean = _clean_block_outputs(model, ad, mid.clean.input_ids)
        grabbed, handles = {}, []
        for layer, block in enumerate(ad.blocks_of(model)):
            def grab_out(m, a, o, layer=layer):
                x = _block_out(o)
                x.retain_grad()
                grabbed[("post", layer)] = x

            def grab_mid(m, a, kw, layer=layer):
                x = a[0] if a else kw["hidden_states"]
                x.retain_grad()
                grabbed[("mid", layer)] = x

            def grab_norm_out(m, a, o, layer=layer):
                o.retain_grad()
                grabbed[("mid", layer)] = o

            handles.append(block.register_forward_hook(grab_out))
            if _post_ln(ad):  # post-LN OPT: mid is the post-attention LayerNorm's output
                handles.append(block.get_submodule(ad.post_attn_norm).register_forward_hook(grab_norm_out))
            else:
                handles.append(block.get_submodule(ad.ln2 or ad.mlp).register_forward_pre_hook(grab_mid,
                                                                                               with_kwargs=True))
        try:
            emb = model.get_input_embeddings()(mid.corrupt.input_ids[None]).detach().requires_grad_(True)
            last = model(inputs_embeds=emb, use_cache=False).logits[0, -1]
            metric = torch.log_softmax(last, -1)[t] if dist is None else last[t] - last[dist]
            metric.backward()
        finally:
            for h in handles:
                h.remove()
        for layer in range(lens.n_layers):
            for site, clean_acts, sweep in (("mid", mids_clean, mid), ("post", outs_clean, post)):
                x = grabbed[(site, layer)]
                expect = ((clean_acts[layer] - x[0].detach()) * x.grad[0]).sum(-1)
                assert rel(sweep.effect[layer], expect) < 10 * rtol(family), (site, layer)


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_unchanged_positions_cost_no_run_and_progress_counts_every_cell(family, lenses):
    lens = lenses(family)
    clean = lens.trace(PROMPT, target=TARGET, backward=False)
    corrupt = lens.trace(CORRUPT, target=TARGET, backward=False)
    first = int((clean.input_ids != corrupt.input_ids).nonzero()[0])
    assert first > 0
    seen = []
    sw = lens.patching_sweep(clean, corrupt, site="pre", progress=lambda k, n: seen.append((k, n)))
    assert torch.equal(sw.effect[:, :first], torch.zeros(lens.n_layers, first, dtype=torch.float64))
    assert float(sw.effect[0, first]) != 0.0  # the first changed token matters
    total = lens.n_layers * len(clean)
    assert seen[-1] == (total, total) and all(a[0] < b[0] for a, b in zip(seen, seen[1:]))
    heads = []
    lens.patching_sweep(clean, corrupt, site="head", batch_size=3, progress=lambda k, n: heads.append(k))
    assert heads == sorted(set(heads)) and heads[-1] == lens.n_layers * lens.n_heads
