"""ICL vs GD (methods-2 §6.5, §6.7, acceptance checks §6.8 #4, #5): SimAOU, SimAM_delta, the random
baseline, the SGD update and layer-causal gradients against independent autograd computations, and the
wrapped model left exactly as it was.

Independent references are written here from the HF weights directly (per-family slicing of the fused
projections, hand-written RoPE), never through lensviz's adapters."""
from __future__ import annotations

import copy
import math
import time

import pytest
import torch
import torch.nn.functional as F

import lensviz as lv
import lensviz.capture as capture
from lensviz.studies import icl
from tests import models
from tests.conftest import PROMPT
from tests.test_nothing_lost import assert_no_lensviz_hooks, assert_same, snapshot

FAMILIES = ("gpt2", "llama", "gpt_neox")
DEMOS = [("I like Italy", " and France"), ("The capital of Japan is", " the"), ("Q: hot A:", " cold")]
QUERIES = ["I visited the city of", "Q: big A:"]
LR = 0.1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These runs are many small ops; on a busy 2-core machine two intra-op threads wait on each other for
    milliseconds per op (the tiny-model runs took ~5 s instead of 0.05 s). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def lens(family, tiny_tokenizer):
    return lv.Lens(models.build(family), tiny_tokenizer)


_RESULTS = {}


def result(lens, family):
    """compare_icl_gd on the tiny model of `family` (built from the same seed, so cached per family)."""
    if family not in _RESULTS:
        _RESULTS[family] = icl.compare_icl_gd(lens, DEMOS, QUERIES, lr=LR, n_random=8192, seed=0)
    return _RESULTS[family]


# independent references: the K/V (and Q) features of each family, by hand ---------------------------
def qkv_params(model, family, layer):
    """{role: [(param name, dim, slice of output features)]} written from the HF layouts."""
    if family == "gpt2":
        pre, d = f"transformer.h.{layer}.attn.c_attn", model.config.n_embd
        return {r: [(f"{pre}.weight", 1, slice(i * d, (i + 1) * d)), (f"{pre}.bias", 0, slice(i * d, (i + 1) * d))]
                for i, r in enumerate("qkv")}
    if family == "llama":
        pre = f"model.layers.{layer}.self_attn"
        return {r: [(f"{pre}.{r}_proj.weight", 0, slice(None))] for r in "qkv"}
    if family == "gpt_neox":
        pre = f"gpt_neox.layers.{layer}.attention.query_key_value"
        h, dh = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
        idx = {r: torch.tensor([hh * 3 * dh + i * dh + j for hh in range(h) for j in range(dh)])
               for i, r in enumerate("qkv")}
        return {r: [(f"{pre}.weight", 0, idx[r]), (f"{pre}.bias", 0, idx[r])] for r in "qkv"}
    raise KeyError(family)


def kv_mask(model, family, name):
    """Bool mask of a parameter: True on its K/V entries (per the hand-written layouts)."""
    p = dict(model.named_parameters())[name]
    mask = torch.zeros_like(p, dtype=torch.bool)
    for layer in range(model.config.num_hidden_layers):
        for role in "kv":
            for n, dim, sel in qkv_params(model, family, layer)[role]:
                if n == name:
                    mask.index_fill_(dim, torch.arange(p.shape[dim])[sel], True)
    return mask


def kv_names(model, family):
    return sorted({n for layer in range(model.config.num_hidden_layers) for role in "kv"
                   for n, _, _ in qkv_params(model, family, layer)[role]})


def example_ids(tok, demo):
    text, label = demo
    t, lab = tok(text, add_special_tokens=False)["input_ids"], tok(label, add_special_tokens=False)["input_ids"]
    return torch.tensor(t + lab), len(lab)


def label_ce(logits, ids, n_label):
    t = len(ids)
    return F.cross_entropy(logits[t - n_label - 1:t - 1], ids[t - n_label:], reduction="sum")


def rope(x, pos, theta, rot):
    """NeoX-style rotary embedding on the first `rot` dims of x [H, T, d], in float64."""
    inv = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    ang = pos[:, None].double() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    xr, xp = x[..., :rot], x[..., rot:]
    half = torch.cat([-xr[..., rot // 2:], xr[..., :rot // 2]], -1)
    return torch.cat([xr * cos + half * sin, xp], -1)


def manual_attention(model, family, ids, layer):
    """(pre-softmax scores [H, T, T], attention output [T, D]) of `layer`, from the weights, the block
    input (HF hidden_states) and hand-written RoPE / GQA."""
    cfg = model.config
    with torch.no_grad():
        hs = model(ids[None], output_hidden_states=True).hidden_states[layer][0]
        t = len(ids)
        pos = torch.arange(t)
        if family == "gpt2":
            blk = model.transformer.h[layer]
            x = blk.ln_1(hs)
            d, h = cfg.n_embd, cfg.n_head
            dh = d // h
            q, k, v = (x @ blk.attn.c_attn.weight + blk.attn.c_attn.bias).split(d, -1)
            q, k, v = (z.reshape(t, h, dh).transpose(0, 1) for z in (q, k, v))
            scaling = dh ** -0.5 / (layer + 1)
            kv_of = list(range(h))
            wo = lambda o: o @ blk.attn.c_proj.weight + blk.attn.c_proj.bias  # noqa: E731
        elif family == "llama":
            blk = model.model.layers[layer]
            x = blk.input_layernorm(hs)
            a = blk.self_attn
            h, hk, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            q = (x @ a.q_proj.weight.T).reshape(t, h, dh).transpose(0, 1)
            k = (x @ a.k_proj.weight.T).reshape(t, hk, dh).transpose(0, 1)
            v = (x @ a.v_proj.weight.T).reshape(t, hk, dh).transpose(0, 1)
            theta = cfg.rope_parameters["rope_theta"]
            q, k = rope(q, pos, theta, dh), rope(k, pos, theta, dh)
            scaling = dh ** -0.5
            kv_of = [i // (h // hk) for i in range(h)]
            wo = lambda o: o @ a.o_proj.weight.T  # noqa: E731
        else:
            blk = model.gpt_neox.layers[layer]
            x = blk.input_layernorm(hs)
            a = blk.attention
            h = cfg.num_attention_heads
            dh = cfg.hidden_size // h
            qkv = (x @ a.query_key_value.weight.T + a.query_key_value.bias).reshape(t, h, 3 * dh).transpose(0, 1)
            q, k, v = qkv[..., :dh], qkv[..., dh:2 * dh], qkv[..., 2 * dh:]
            rot = int(dh * cfg.rope_parameters["partial_rotary_factor"])
            theta = cfg.rope_parameters["rope_theta"]
            q, k = rope(q, pos, theta, rot), rope(k, pos, theta, rot)
            scaling = dh ** -0.5
            kv_of = list(range(h))
            wo = lambda o: o @ a.dense.weight.T + a.dense.bias  # noqa: E731
        k, v = k[kv_of], v[kv_of]
        scores = q @ k.transpose(-1, -2) * scaling
        probs = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        out = wo((probs @ v).transpose(0, 1).reshape(t, -1))
    return scores, out


def with_updated(model, updated):
    m = copy.deepcopy(model)
    with torch.no_grad():
        named = dict(m.named_parameters())
        for n, t in updated.items():
            named[n].copy_(t)
    return m


# the adapter knowledge ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", models.FAMILIES)
def test_proj_slices_pick_the_qkv_by_head_projections(fam, tiny_tokenizer):
    lens = lv.Lens(models.build(fam), tiny_tokenizer)
    ref = lens.attention_weights(1)
    block = lens.adapter.blocks_of(lens.model)[1]
    seen = set()
    for s in lens.adapter.proj_slices(lens.dims, "qkv"):
        p = getattr(block.get_submodule(s.path), s.name, None)
        if p is None:
            assert s.name == "bias" and ref["b" + s.role] is None
            continue
        seen.add((s.role, s.name))
        sel = p.detach() if s.index is None else p.detach().index_select(s.dim, s.index)
        n_heads = lens.n_heads if s.role == "q" else lens.n_kv_heads
        if s.name == "weight":
            w = lens.adapter.as_in_out(sel)  # [D, heads * d]
            assert torch.equal(w.reshape(lens.d_model, n_heads, lens.d_head).permute(1, 0, 2), ref[s.role])
        else:
            assert torch.equal(sel.reshape(n_heads, lens.d_head), ref["b" + s.role])
    assert {r for r, n in seen if n == "weight"} == set("qkv")
    kv = lens.adapter.proj_slices(lens.dims, "kv")
    assert {s.role for s in kv} == {"k", "v"}
    if lens.adapter.qkv is not None:  # a fused projection: K and V features are disjoint from Q's
        q_idx = set(lens.adapter.proj_slices(lens.dims, "q")[0].index.tolist())
        assert not q_idx & set(torch.cat([s.index for s in kv]).tolist())


# §6.8 #4: the random-update baseline ---------------------------------------------------------------------
def test_random_update_baseline_is_zero(lens, family):
    res = result(lens, family)
    d = lens.d_model
    n = len(QUERIES) * res.n_random
    assert res.random_sim_aou.shape == (lens.n_layers,)
    assert float(res.random_sim_aou.abs().max()) < 0.01
    # a real check, not luck: each draw is a genuine random cosine (std about 1/sqrt(D) = 0.177), and the
    # mean of Q * n_random = 16384 draws has standard error ~0.0014, so 0.01 is > 7 standard errors
    assert torch.all((res.random_sim_aou_std > 0.7 / math.sqrt(d)) & (res.random_sim_aou_std < 1.3 / math.sqrt(d)))
    assert torch.allclose(res.random_sim_aou_sem, res.random_sim_aou_std / math.sqrt(n))
    assert float(res.random_sim_aou_sem.max()) * 5 < 0.01
    # the same seed reproduces the baseline; another seed gives other draws, also ~0
    again = icl.compare_icl_gd(lens, DEMOS, QUERIES, lr=LR, n_random=8192, seed=0, mode="standard")
    other = icl.compare_icl_gd(lens, DEMOS, QUERIES, lr=LR, n_random=8192, seed=1, mode="standard")
    assert torch.equal(again.random_sim_aou, res.random_sim_aou)
    assert not torch.equal(other.random_sim_aou, res.random_sim_aou)
    assert float(other.random_sim_aou.abs().max()) < 0.01


# §6.8 #5: SimAM on pre-softmax scores of the query tokens --------------------------------------------------
def test_scores_and_attention_outputs_match_an_independent_computation(lens, family):
    res = result(lens, family)
    ft_model = with_updated(lens.model, res.finetunes["standard"].updated)
    # HF builds the rotary tables in float32: against float64 hand-written RoPE the scores agree to ~1e-6
    atol = 1e-12 if family == "gpt2" else 2e-5
    for qi, q in enumerate(QUERIES):
        n_q = len(lens.tokenizer(q, add_special_tokens=False)["input_ids"])
        assert len(res.query_tokens[qi]) == n_q
        for setting, ids, model in (("zs", res.prompt_ids["zs"][qi], lens.model),
                                    ("icl", res.prompt_ids["icl"][qi], lens.model),
                                    ("standard", res.prompt_ids["zs"][qi], ft_model)):
            got = res.scores[setting][qi]
            assert got.shape == (lens.n_layers, lens.n_heads, n_q)
            for layer in range(lens.n_layers):
                scores, out = manual_attention(model, family, ids, layer)
                want = scores[:, -1, len(ids) - n_q:]  # the last token's pre-softmax scores to the query's tokens
                assert torch.allclose(got[layer], want, atol=atol, rtol=0), (setting, layer)
                assert torch.allclose(res.attn_out[setting][qi, layer], out[-1], atol=10 * atol, rtol=0)
        # the ICL scores' keys are exactly the query's own tokens, after the demonstrations
        icl_ids, zs_ids = res.prompt_ids["icl"][qi], res.prompt_ids["zs"][qi]
        assert res.context_length + n_q == len(icl_ids)
        assert torch.equal(icl_ids[res.context_length:], zs_ids[-n_q:])
    # pre-softmax scores, not probabilities (which are never negative)
    s = res.scores["icl"][0]
    assert float(s.min()) < 0 and float(s.max()) > 0


def _perturb_keys(model, family, layer, rows):
    """A forward hook adding noise to the keys of token positions `rows` at `layer` (per HF layout)."""
    gen = torch.Generator().manual_seed(7)
    if family == "gpt2":
        mod, d = model.transformer.h[layer].attn.c_attn, model.config.n_embd
        cols = slice(d, 2 * d)
    elif family == "llama":
        mod, cols = model.model.layers[layer].self_attn.k_proj, slice(None)
    else:
        mod = model.gpt_neox.layers[layer].attention.query_key_value
        h, dh = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
        cols = torch.tensor([hh * 3 * dh + dh + j for hh in range(h) for j in range(dh)])

    def hook(m, args, out):
        out = out.clone()
        sel = out[0, rows][:, cols]
        out[0, rows.unsqueeze(-1), torch.arange(out.shape[-1])[cols]] = sel + torch.randn(sel.shape, generator=gen,
                                                                                         dtype=sel.dtype)
        return out

    return mod.register_forward_hook(hook)


def test_demonstration_keys_reach_sim_am_only_through_the_query_tokens(lens, family):
    res = result(lens, family)
    ids, ctx = res.prompt_ids["icl"][0], res.context_length
    n_q = len(ids) - ctx
    base = icl.last_token(lens, ids, n_q)
    layer = 1
    handle = _perturb_keys(lens.model, family, layer, torch.arange(0, ctx))  # the demonstrations' keys
    try:
        moved = icl.last_token(lens, ids, n_q)
    finally:
        handle.remove()
    assert torch.equal(moved.scores[:layer + 1], base.scores[:layer + 1])  # SimAM's scores never see them
    assert float((moved.attn_out[layer] - base.attn_out[layer]).abs().max()) > 1e-4  # the attention did
    assert float((moved.scores[layer + 1] - base.scores[layer + 1]).abs().max()) > 1e-6  # later, via the query
    handle = _perturb_keys(lens.model, family, layer, torch.arange(ctx, len(ids) - 1))  # control: query keys
    try:
        control = icl.last_token(lens, ids, n_q)
    finally:
        handle.remove()
    assert torch.equal(control.scores[:layer], base.scores[:layer])
    assert float((control.scores[layer] - base.scores[layer]).abs().max()) > 1e-4


# the SGD update and the layer-causal gradient ---------------------------------------------------------------
def kv_trainable_copy(lens, family):
    """A deep copy of the model with only its K/V-holding parameters requiring grad: (copy, names, named)."""
    ref = copy.deepcopy(lens.model)
    names = kv_names(ref, family)
    named = dict(ref.named_parameters())
    for p in ref.parameters():
        p.requires_grad_(False)
    for n in names:
        named[n].requires_grad_(True)
    return ref, names, named


def test_one_sgd_step_equals_plain_autograd_on_kv_only(lens, family):
    ft = icl.finetune(lens, DEMOS[:1], lr=LR)
    ref, names, named = kv_trainable_copy(lens, family)
    ids, n_label = example_ids(lens.tokenizer, DEMOS[0])
    label_ce(ref(ids[None]).logits[0], ids, n_label).backward()
    assert sorted(ft.updated) == names  # only parameters holding K/V are updated
    orig = dict(lens.model.named_parameters())
    for n in names:
        mask = kv_mask(ref, family, n)
        want = named[n].detach() - LR * named[n].grad * mask  # the Q part of a fused projection stays
        assert torch.allclose(ft.updated[n], want, atol=1e-12, rtol=0), n
        assert torch.equal(ft.updated[n][~mask], orig[n].detach()[~mask]), n  # Q columns bit-identical
        assert float((ft.updated[n][mask] - orig[n].detach()[mask]).abs().max()) > 1e-8, n  # K/V moved
    with torch.no_grad():
        first = float(label_ce(lens.model(ids[None]).logits[0], ids, n_label))
    assert ft.train_losses.shape == (1,) and ft.train_losses[0] == pytest.approx(first, abs=1e-10)


def test_one_epoch_equals_torch_sgd_with_q_gradients_zeroed(lens, family):
    ft = icl.finetune(lens, DEMOS, lr=LR)
    ref, names, named = kv_trainable_copy(lens, family)
    for n in names:
        mask = kv_mask(ref, family, n)
        named[n].register_hook(lambda g, mask=mask: g * mask)  # spec §6.7: zero the Q part of c_attn's grad
    opt = torch.optim.SGD([named[n] for n in names], lr=LR)
    losses = []
    for demo in DEMOS:
        ids, n_label = example_ids(lens.tokenizer, demo)
        opt.zero_grad()
        loss = label_ce(ref(ids[None]).logits[0], ids, n_label)
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
    for n in names:
        assert torch.allclose(ft.updated[n], named[n].detach(), atol=1e-11, rtol=0), n
    assert torch.allclose(ft.train_losses, torch.tensor(losses, dtype=torch.float64), atol=1e-10)
    assert ft.layer_losses.shape == (len(DEMOS), lens.n_layers) and ft.grad_norms.shape == (len(DEMOS), lens.n_layers)
    assert torch.allclose(ft.layer_losses[:, -1], ft.train_losses)


def test_layer_causal_gradient_is_each_layers_own_loss(lens, family):
    demo = DEMOS[1]
    lc = icl.kv_gradients(lens, demo, mode="layer_causal")
    std = icl.kv_gradients(lens, demo, mode="standard")
    ids, n_label = example_ids(lens.tokenizer, demo)
    n_layers = lens.n_layers
    for layer in range(n_layers):
        ref = copy.deepcopy(lens.model)
        named = dict(ref.named_parameters())
        mine = sorted({n for r in "kv" for n, _, _ in qkv_params(ref, family, layer)[r]})
        for p in ref.parameters():
            p.requires_grad_(False)
        for n in mine:
            named[n].requires_grad_(True)
        out = ref(ids[None], output_hidden_states=True)
        if layer < n_layers - 1:  # CE_l alone: the logit lens of block l's output, in the plain model
            logits = ref.get_submodule(lens.adapter.unembed)(ref.get_submodule(lens.adapter.final_norm)(
                out.hidden_states[layer + 1][0]))
        else:
            logits = out.logits[0]
        label_ce(logits, ids, n_label).backward()
        for n in mine:
            want = named[n].grad * kv_mask(ref, family, n)
            scale = float(want.abs().max())
            assert scale > 0
            assert float((lc[n] - want).abs().max()) <= 1e-12 * max(1.0, scale), (layer, n)
            diff = float((lc[n] - std[n]).abs().max())
            if layer < n_layers - 1:
                assert diff > 1e-6 * scale, (layer, n)  # vanilla GD's gradient also carries the layers above
            else:
                assert diff <= 1e-12 * max(1.0, scale), (layer, n)  # the top layer's own loss is the loss
    # a parameter that is not K/V gets no gradient entry; the K/V set is the same in both modes
    assert sorted(lc) == sorted(std) == kv_names(lens.model, family)


def test_perturbing_a_higher_layer_leaves_the_layer_causal_update_below_unchanged(lens, family, tiny_tokenizer):
    other = lv.Lens(copy.deepcopy(lens.model), tiny_tokenizer)
    with torch.no_grad():
        for p in lens.adapter.blocks_of(other.model)[2].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))
    below = [n for n in kv_names(lens.model, family) if ".0." in n or ".1." in n]
    a, b = icl.kv_gradients(lens, DEMOS[0], mode="layer_causal"), icl.kv_gradients(other, DEMOS[0], mode="layer_causal")
    sa, sb = icl.kv_gradients(lens, DEMOS[0]), icl.kv_gradients(other, DEMOS[0])
    assert below
    for n in below:
        assert torch.equal(a[n], b[n]), n  # == 0 difference (§6.8 #3)
    assert max(float((sa[n] - sb[n]).abs().max()) for n in below) > 1e-6


# the metrics as defined ----------------------------------------------------------------------------------------
def _cos(x, y):
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))


def test_sim_aou_and_sim_am_follow_their_definitions(lens, family):
    res = result(lens, family)
    n_layers, n_q = lens.n_layers, len(QUERIES)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    for mode in icl.MODES:
        zs, ic, ft = (res.attn_out[s] for s in ("zs", "icl", mode))
        want = _cos(unit(ic) - unit(zs), unit(ft) - unit(zs))
        assert res.sim_aou_per_query[mode].shape == (n_q, n_layers)
        assert torch.allclose(res.sim_aou_per_query[mode], want, atol=1e-12)
        assert torch.allclose(res.sim_aou[mode], want.mean(0), atol=1e-12)
        assert torch.all(res.sim_aou[mode].abs() <= 1)
        per_head = torch.stack([_cos(i - z, f - z) for z, i, f in zip(res.scores["zs"], res.scores["icl"],
                                                                        res.scores[mode])])  # [Q, L, H]
        assert res.sim_am_per_head[mode].shape == (n_q, n_layers, lens.n_heads)
        layers = slice(0, None) if family == "gpt2" else slice(1, None)
        assert torch.allclose(res.sim_am_per_head[mode][:, layers], per_head[:, layers], atol=1e-10)
        assert torch.allclose(res.sim_am[mode][layers], per_head[:, layers].mean(-1).mean(0), atol=1e-10)
        assert torch.all(res.sim_am[mode][layers].abs() <= 1)
    # layer 0: with absolute positions (GPT-2) the demonstrations shift the query's scores; with RoPE the
    # scores to the query tokens depend only on relative positions, so ICL leaves them unmoved and SimAM
    # there is undefined (NaN), not a cosine of rounding noise
    shift = (res.scores["icl"][0][0] - res.scores["zs"][0][0]).norm() / res.scores["zs"][0][0].norm()
    if family == "gpt2":
        assert float(shift) > 1e-2 and torch.isfinite(res.sim_am["standard"][0])
    else:
        assert float(shift) < 1e-5 and torch.isnan(res.sim_am["standard"][0])
    assert torch.isfinite(res.sim_aou["layer_causal"]).all()
    # the two modes train differently from the same start
    assert torch.allclose(res.layer_losses["standard"][0], res.layer_losses["layer_causal"][0], atol=1e-12)
    assert res.train_losses["layer_causal"][0] == pytest.approx(float(res.layer_losses["layer_causal"][0].sum()))
    assert not torch.allclose(res.finetunes["standard"].updated[kv_names(lens.model, family)[0]],
                              res.finetunes["layer_causal"].updated[kv_names(lens.model, family)[0]])


# nothing lost ---------------------------------------------------------------------------------------------
class Injected(RuntimeError):
    pass


def _raise_on_call(lens, k, where):
    """A hook on block 1 that raises on its k-th forward call ("forward") or in the backward ("backward")."""
    calls = [0]

    def hook(mod, args, out):
        calls[0] += 1
        if calls[0] != k:
            return None
        if where == "forward":
            raise Injected(f"injected at call {k}")
        out = out[0] if isinstance(out, tuple) else out

        def fail(grad):
            raise Injected("injected in the backward")

        out.register_hook(fail)
        return None

    return lens.adapter.blocks_of(lens.model)[1].register_forward_hook(hook)


@pytest.mark.parametrize("k,where", [(2, "forward"), (5, "backward"), (9, "forward")])
def test_model_is_untouched_after_a_run_and_after_a_run_that_raised(lens, k, where):
    ids, _ = lens.encode(PROMPT)
    before = snapshot(lens.model, ids)
    grad_mode = torch.is_grad_enabled()
    icl.compare_icl_gd(lens, DEMOS, QUERIES, lr=LR, n_random=16)
    assert_same(before, snapshot(lens.model, ids), lens.model)
    assert_no_lensviz_hooks(lens.model)
    # 3 demonstrations x 2 modes = 6 training forwards of block 1 (call 2: layer-causal hooks and
    # functional_call active; call 5: inside autograd.grad), then the recording forwards (call 9)
    handle = _raise_on_call(lens, k, where)
    try:
        with pytest.raises(Injected):
            icl.compare_icl_gd(lens, DEMOS, QUERIES, lr=LR, n_random=16)
    finally:
        handle.remove()
    assert_same(before, snapshot(lens.model, ids), lens.model)
    assert_no_lensviz_hooks(lens.model)
    assert capture._ACTIVE.get() is None and torch.is_grad_enabled() == grad_mode


# bad input ------------------------------------------------------------------------------------------------
BAD = [
    (dict(demonstrations=[]), "demonstrations must be a non-empty list"),
    (dict(demonstrations="I like Italy"), "demonstrations must be a non-empty list"),
    (dict(demonstrations=[("I like Italy", "")]), "label of demonstration 0 .* encodes to no token"),
    (dict(demonstrations=[("", " and")]), "empty text"),
    (dict(demonstrations=[("I like", 3)]), r"must be a str or a \(text, label\) pair"),
    (dict(demonstrations=["I"]), "at least two"),
    (dict(queries=[]), "queries must be a non-empty list"),
    (dict(queries=[""]), "encodes to no token"),
    (dict(queries=[("a", "b")]), "query 0 must be a str"),
    (dict(lr=0), "lr must be a finite positive number"),
    (dict(lr=-0.1), "lr must be a finite positive number"),
    (dict(lr=float("nan")), "lr must be a finite positive number"),
    (dict(lr=float("inf")), "lr must be a finite positive number"),
    (dict(lr=True), "lr must be a finite positive number"),
    (dict(lr="0.1"), "lr must be a finite positive number"),
    (dict(mode="sgd"), "mode must be one of"),
    (dict(mode=()), "mode must be one of"),
    (dict(mode=("standard", "standard")), "twice"),
    (dict(params="o"), "params must be one of"),
    (dict(params="kvz"), "params must be one of"),
    (dict(seed=-1), "seed must be an int"),
    (dict(n_random=0), "n_random must be an int"),
    (dict(separator=3), "separator must be a str"),
    (dict(demonstrations=[("I like Italy and France. I visited the city of Florence and Paris.", " and")] * 3),
     "ICL prompt .* tokens long; this model accepts at most 64"),
]


@pytest.mark.parametrize("kwargs,match", BAD)
def test_bad_arguments_are_rejected(kwargs, match, tiny_tokenizer):
    lens = lv.Lens(models.build("llama"), tiny_tokenizer)
    args = dict(demonstrations=DEMOS, queries=QUERIES, lr=LR) | kwargs
    with pytest.raises(lv.LensvizError, match=match):
        icl.compare_icl_gd(lens, args.pop("demonstrations"), args.pop("queries"), **args)


def test_other_bad_calls_are_rejected(tiny_tokenizer):
    lens = lv.Lens(models.build("gpt2"), tiny_tokenizer)
    with pytest.raises(lv.LensvizError, match="must be a lensviz Lens"):
        icl.compare_icl_gd(lens.model, DEMOS, QUERIES, lr=LR)
    with pytest.raises(lv.LensvizError, match="inference_mode"):
        with torch.inference_mode():
            icl.compare_icl_gd(lens, DEMOS, QUERIES, lr=LR)
    with pytest.raises(lv.LensvizError, match="one mode"):
        icl.finetune(lens, DEMOS, lr=LR, mode=icl.MODES)
    with pytest.raises(lv.LensvizError, match="tokens long"):
        icl.finetune(lens, [("I like Italy and France. " * 20, " and")], lr=LR)
    with pytest.raises(lv.LensvizError, match="n_keys"):
        icl.last_token(lens, torch.tensor([1, 2, 3]), 4)


# the real model ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_icl_vs_gd_on_smollm2(smol):
    demos = [("Review: a wonderful, moving film. Sentiment:", " positive"),
             ("Review: dull and far too long. Sentiment:", " negative"),
             ("Review: the best movie this year. Sentiment:", " positive")]
    queries = ["Review: a delightful story. Sentiment:", "Review: boring and badly acted. Sentiment:"]
    ids, _ = smol.encode("The capital of France is")
    with torch.no_grad():
        logits = smol.model(ids[None]).logits.clone()
    watched = {n: p.detach().clone() for n, p in smol.model.named_parameters() if ".0." in n or ".29." in n}
    flags = {n: p.requires_grad for n, p in smol.model.named_parameters()}
    start = time.perf_counter()
    res = icl.compare_icl_gd(smol, demos, queries, lr=1e-2, seed=0)
    elapsed = time.perf_counter() - start
    n_layers, d = smol.n_layers, smol.d_model
    # §6.8 #4 on the real model: 2 * 1024 draws, std ~1/sqrt(576) = 0.042, standard error ~0.001
    assert float(res.random_sim_aou.abs().max()) < 0.01
    assert torch.all((res.random_sim_aou_std > 0.7 / math.sqrt(d)) & (res.random_sim_aou_std < 1.3 / math.sqrt(d)))
    for mode in icl.MODES:
        assert res.sim_aou[mode].shape == res.sim_am[mode].shape == (n_layers,)
        assert torch.isfinite(res.sim_aou[mode]).all() and torch.all(res.sim_aou[mode].abs() <= 1)
        assert torch.isnan(res.sim_am[mode][0])  # RoPE: layer 0's query-token scores ignore the context
        assert torch.isfinite(res.sim_am[mode][1:]).all() and torch.all(res.sim_am[mode][1:].abs() <= 1)
        assert torch.isfinite(res.train_losses[mode]).all()
    assert torch.allclose(res.layer_losses["standard"][0], res.layer_losses["layer_causal"][0], atol=1e-4)
    # nothing lost
    with torch.no_grad():
        assert torch.equal(smol.model(ids[None]).logits, logits)
    named = dict(smol.model.named_parameters())
    assert all(torch.equal(named[n], w) for n, w in watched.items())
    assert {n: p.requires_grad for n, p in named.items()} == flags
    assert_no_lensviz_hooks(smol.model)
    torch.set_printoptions(precision=3, linewidth=220)
    print(f"\nSmolLM2 ICL vs GD: {elapsed:.1f}s; {res!r}")
    for mode in icl.MODES:
        print(mode, "SimAOU", res.sim_aou[mode], "\n", mode, "SimAM", res.sim_am[mode])
    print("random SimAOU", res.random_sim_aou, "std", res.random_sim_aou_std.mean())


def test_an_offloaded_model_is_refused_not_silently_run_on_its_own_weights(tmp_path, tiny_tokenizer):
    from tests.test_offload import dispatched_pair

    _, off = dispatched_pair("llama", torch.float64, tmp_path, tiny_tokenizer)
    with pytest.raises(lv.LensvizError, match="offloading"):  # accelerate would overwrite the fine-tuned K/V
        icl.compare_icl_gd(off, DEMOS, QUERIES, lr=LR)
    assert_no_lensviz_hooks(off.model)
