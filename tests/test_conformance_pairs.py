"""Prompt pairs and attribution on every family of the conformance suite (tests/test_conformance.py):
multi-token targets against HF's teacher-forced NLL, the distractor metric and its gradient, RA of a
multi-token loss against autograd, direct logit attribution summing to the logit, and patching sweeps
(exact cells against hand-written HF hooks, attribution against Delta act . autograd gradient)."""
from __future__ import annotations

import pytest
import torch

import lensviz as lv
from tests.test_conformance import CONFIGS, FAMILIES, PROMPT, T32, family_lenses

MULTI = " Paris France"  # two tokens with the test tokenizer
CORRUPT = "I like Italy and city. I visited the city of"  # " France" -> " city": same token length
DISTRACTOR = " France"
LAYER_SITE_CELLS = [(0, 3), (1, 19), (2, 9)]  # (layer, position) cells checked by hand


@pytest.fixture(scope="module")
def lenses():
    return family_lenses()


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def tol(family):
    return T32 if CONFIGS[family].get("post_norm") else 1e-10


def atol(family):
    """Absolute tolerance of a metric against HF's own forward (eager float32 softmax / norms in some)."""
    return 1e-6 if CONFIGS[family].get("post_norm") else 1e-9


class _ScoreGrads:
    """Autograd reference for RA: an attention function that computes S = Q K^T itself (eager, HF's
    additive masks) and keeps S's gradient, registered under its own name for one forward."""

    name = "lensviz_pairs_reference"

    def __init__(self):
        self.scores = []

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                 s_aux=None, **kwargs):
        rep = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
        s = query @ k.transpose(-1, -2)
        s.retain_grad()
        self.scores.append(s)
        z = s * scaling
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        if attention_mask is not None:
            z = z + attention_mask[:, :, :, : k.shape[-2]]
        if s_aux is not None:
            a = torch.softmax(torch.cat([z, s_aux.reshape(1, -1, 1, 1).expand(*z.shape[:-1], 1)], -1), -1)[..., :-1]
        else:
            a = torch.softmax(z, -1)
        return (a @ v).transpose(1, 2), a

    def run(self, model, ids, loss_fn):
        """Forward through this attention; loss_fn(logits [T, V]) -> scalar; backward. Returns
        (hidden states with .grad, the score tensors S with .grad)."""
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        AttentionInterface.register(self.name, self)
        AttentionMaskInterface.register(self.name, eager_mask)
        prev = model.config._attn_implementation
        model.set_attn_implementation(self.name)
        try:
            emb = model.get_input_embeddings()(ids[None]).detach().requires_grad_(True)
            out = model(inputs_embeds=emb, output_hidden_states=True, use_cache=False)
            for h in out.hidden_states:
                h.retain_grad()
            loss_fn(out.logits[0]).backward()
            return out.hidden_states, self.scores
        finally:
            model.set_attn_implementation(prev)


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_token_loss_and_ra_equal_teacher_forced_autograd(family, lenses):
    lens = lenses(family)
    tr = lens.trace(PROMPT, target=MULTI)
    prompt_ids, _ = lens.encode(PROMPT)
    targets = lens.token_ids(MULTI)
    assert len(targets) == 2 and tr.target_ids == targets
    full = torch.cat([prompt_ids, torch.tensor(targets)])
    assert torch.equal(tr.input_ids, full[:-1]) and tr.appended == [len(prompt_ids)]
    labels = torch.full_like(full, -100)
    labels[len(prompt_ids):] = full[len(prompt_ids):]
    with torch.no_grad():  # HF's labels loss on prompt + target is the mean NLL over the target tokens
        out = lens.model(full[None], labels=labels[None], use_cache=False)
    assert abs(tr.loss - 2 * float(out.loss)) < 1e-6 * max(1.0, abs(tr.loss))  # HF's loss upcasts to float32
    lp = torch.log_softmax(out.logits[0].double(), -1)  # the same sum in float64, from HF's logits
    teacher = -sum(float(lp[len(prompt_ids) - 1 + k, t]) for k, t in enumerate(targets))
    assert abs(tr.loss - teacher) < tol(family) * max(1.0, abs(teacher))
    assert tr.metric == pytest.approx(-tr.loss, rel=1e-12)
    first = lens.trace(PROMPT, target=MULTI, target_mode="first")
    assert first.target_ids == targets[:1] and len(first) == len(prompt_ids) and first.appended == []

    p = len(prompt_ids)

    def loss_fn(logits):
        lp = torch.log_softmax(logits, -1)
        return -(lp[p - 1, targets[0]] + lp[p, targets[1]])

    hidden, scores = _ScoreGrads().run(lens.model, tr.input_ids, loss_fn)
    for layer in range(lens.n_layers):
        assert rel(tr.reversed_attention(layer), scores[layer].grad[0]) < tol(family)
        assert rel(tr.resid_grad(layer, "pre"), hidden[layer].grad[0]) < tol(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_distractor_metric_and_its_backward(family, lenses):
    lens = lenses(family)
    tr = lens.trace(PROMPT, target=" Paris", distractor=DISTRACTOR)
    t, d = lens.token_id(" Paris"), lens.token_id(DISTRACTOR)
    assert tr.distractor_id == d and tr.distractor == DISTRACTOR
    assert tr.metric == pytest.approx(float(tr.logits[-1, t] - tr.logits[-1, d]), abs=1e-12)
    assert tr.loss == pytest.approx(-float(torch.log_softmax(tr.logits[-1], -1)[t]), rel=1e-12)  # still the NLL

    def neg_metric(logits):
        return -(logits[-1, t] - logits[-1, d])

    hidden, scores = _ScoreGrads().run(lens.model, tr.input_ids, neg_metric)
    for layer in range(lens.n_layers):  # the backward pass explains -metric
        assert rel(tr.resid_grad(layer, "pre"), hidden[layer].grad[0]) < tol(family)
        assert rel(tr.reversed_attention(layer), scores[layer].grad[0]) < tol(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_direct_logit_attribution_sums_to_the_logit(family, lenses):
    lens = lenses(family)
    cases = [(lens.trace(PROMPT, target=" Paris"), None), (lens.trace(PROMPT, target=MULTI), None),
             (lens.trace(PROMPT, target=" Paris", distractor=DISTRACTOR), DISTRACTOR)]
    for tr, distractor in cases:
        dla = lv.direct_logit_attribution(tr)
        if distractor is None:
            expect = sum(float(tr.logits[q, t]) for q, t in zip(tr.explained_positions, tr.target_ids))
        else:
            expect = tr.metric
        assert dla.heads.shape == (lens.n_layers, lens.n_heads) and dla.mlps.shape == (lens.n_layers,)
        assert dla.logit == pytest.approx(expect, abs=1e-9 * max(1.0, abs(expect)))
        # HF computes most norms in float32: the frozen-scale parts sum to the logit to that precision
        assert abs(dla.total - expect) < 2e-6 * max(1.0, abs(expect))
        assert torch.equal(lv.head_importance(tr, "dla"), dla.heads)


def _clean_acts(model, ad, ids, layer):
    """HF's own clean block inputs (output_hidden_states) and the o_proj input of `layer`."""
    keep = {}
    handle = ad.part(model, layer, "o_proj").register_forward_pre_hook(lambda m, a: keep.setdefault("o", a[0].clone()))
    try:
        with torch.no_grad():
            out = model(ids[None], output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    return out.hidden_states, keep["o"]


def _metric(logits, t):
    return float(torch.log_softmax(logits[0, -1], -1)[t])


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_sweep_equals_hand_written_hook_patches(family, lenses):
    lens = lenses(family)
    ad, model = lens.adapter, lens.model
    pre = lens.patching_sweep(PROMPT, CORRUPT, target=" Paris", site="pre")
    post = lens.patching_sweep(pre.clean, pre.corrupt, site="post")
    heads = lens.patching_sweep(pre.clean, pre.corrupt, site="head", batch_size=3)  # batches of unequal size
    t = lens.token_id(" Paris")
    assert pre.effect.shape == post.effect.shape == (lens.n_layers, len(pre.clean))
    assert heads.effect.shape == (lens.n_layers, lens.n_heads)
    c_ids, x_ids = pre.clean.input_ids, pre.corrupt.input_ids
    with torch.no_grad():
        m_corrupt = _metric(model(x_ids[None], use_cache=False).logits, t)
    assert pre.metric_corrupt == pytest.approx(m_corrupt, abs=atol(family))
    denom = pre.metric_clean - pre.metric_corrupt  # 0 where a sliding window hides the changed token
    if abs(denom) > 1e-12:
        assert torch.allclose(pre.normalized, pre.effect / denom)
    else:
        assert torch.isnan(pre.normalized).all()
    for layer, pos in LAYER_SITE_CELLS:
        hidden, o_clean = _clean_acts(model, ad, c_ids, layer)

        def put(mod, args, kwargs, layer=layer, pos=pos):
            x = (args[0] if args else kwargs["hidden_states"]).clone()
            x[:, pos] = hidden[layer][0, pos]
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

        handle = ad.blocks_of(model)[layer].register_forward_pre_hook(put, with_kwargs=True)
        try:
            with torch.no_grad():
                expect = _metric(model(x_ids[None], use_cache=False).logits, t) - m_corrupt
        finally:
            handle.remove()
        assert float(pre.effect[layer, pos]) == pytest.approx(expect, abs=atol(family))
        if layer > 0:  # resid post of layer - 1 is resid pre of layer
            assert float(post.effect[layer - 1, pos]) == pytest.approx(expect, abs=atol(family))
        head, d = layer % lens.n_heads, lens.d_head

        def put_head(mod, args, head=head, o_clean=o_clean):
            x = args[0].clone()
            x[..., head * d:(head + 1) * d] = o_clean[..., head * d:(head + 1) * d]
            return (x,)

        handle = ad.part(model, layer, "o_proj").register_forward_pre_hook(put_head)
        try:
            with torch.no_grad():
                expect = _metric(model(x_ids[None], use_cache=False).logits, t) - m_corrupt
        finally:
            handle.remove()
        assert float(heads.effect[layer, head]) == pytest.approx(expect, abs=atol(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_attribution_sweep_equals_delta_times_autograd(family, lenses):
    lens = lenses(family)
    ad, model = lens.adapter, lens.model
    for distractor in (None, DISTRACTOR):
        sw = lens.patching_sweep(PROMPT, CORRUPT, target=" Paris", distractor=distractor, site="pre",
                                 method="attribution")
        hs = lens.patching_sweep(sw.clean, sw.corrupt, site="head", method="attribution")
        t, dist = lens.token_id(" Paris"), None if distractor is None else lens.token_id(distractor)

        def metric(logits):
            last = logits[-1]
            return torch.log_softmax(last, -1)[t] if dist is None else last[t] - last[dist]

        c_ids, x_ids = sw.clean.input_ids, sw.corrupt.input_ids
        o_in, o_clean = {}, {}
        hooks = []
        for layer in range(lens.n_layers):
            def grab(mod, args, layer=layer):
                x = args[0]
                if x.requires_grad:
                    x.retain_grad()
                o_in[layer] = x

            hooks.append(ad.part(model, layer, "o_proj").register_forward_pre_hook(grab))
        try:
            with torch.no_grad():
                clean_hidden = model(c_ids[None], output_hidden_states=True, use_cache=False).hidden_states
                o_clean = {k: v.clone() for k, v in o_in.items()}
            emb = model.get_input_embeddings()(x_ids[None]).detach().requires_grad_(True)
            out = model(inputs_embeds=emb, output_hidden_states=True, use_cache=False)
            for h in out.hidden_states:
                h.retain_grad()
            metric(out.logits[0]).backward()
        finally:
            for h in hooks:
                h.remove()
        for layer in range(lens.n_layers):  # hidden_states[l] is block l's input (resid pre)
            delta = clean_hidden[layer][0] - out.hidden_states[layer][0].detach()
            expect = (delta * out.hidden_states[layer].grad[0]).sum(-1)
            assert rel(sw.effect[layer], expect) < tol(family) * 10
            grad_o = o_in[layer].grad.reshape(-1, lens.n_heads, lens.d_head)
            delta_o = (o_clean[layer] - o_in[layer].detach()).reshape(-1, lens.n_heads, lens.d_head)
            assert rel(hs.effect[layer], (delta_o * grad_o).sum((0, 2))) < tol(family) * 10
