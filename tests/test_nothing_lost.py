"""A patch or hook never outlives its run. After many traces (with and without gradients, and runs
that raise mid-forward, mid-backward and while picking the target, including a KeyboardInterrupt),
the model is exactly as it was: no module hooks, the same attention implementation, the same
requires_grad flags and training flags, bit-identical weights and logits, no .grad anywhere, grad
mode and lensviz's recorder context variable back to what they were."""
from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import torch.nn.modules.module as torch_module
from transformers import PretrainedConfig

import lensviz as lv
import lensviz.capture as capture
from tests import models
from tests.conftest import PROMPT

TARGET = " Paris"
HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
              "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
GLOBAL_HOOK_DICTS = sorted(n for n in dir(torch_module) if n.startswith("_global_") and n.endswith("hooks")
                           and isinstance(getattr(torch_module, n), dict))


class Injected(RuntimeError):
    """The exception the failing runs raise on purpose."""


class InjectedInterrupt(KeyboardInterrupt):
    """A BaseException (not an Exception) raised on purpose, like Ctrl-C in a notebook."""


# snapshots ---------------------------------------------------------------------------------------
def _configs(model):
    """Every config object reachable from the model's modules (and their sub-configs), by id."""
    found = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        stack = [cfg] if isinstance(cfg, PretrainedConfig) else []
        while stack:
            c = stack.pop()
            if id(c) in found:
                continue
            found[id(c)] = c
            for key in getattr(c, "sub_configs", {}) or {}:
                sub = getattr(c, key, None)
                if isinstance(sub, PretrainedConfig):
                    stack.append(sub)
    return found


def snapshot(model, ids):
    with torch.no_grad():
        logits = model(ids[None], use_cache=False).logits[0].clone()
    return dict(
        hooks={name: tuple(len(getattr(m, a, None) or {}) for a in HOOK_DICTS) for name, m in model.named_modules()},
        global_hooks={n: len(getattr(torch_module, n)) for n in GLOBAL_HOOK_DICTS},
        forward_overrides=sorted(name for name, m in model.named_modules() if "forward" in vars(m)),
        attn_impl={i: (c._attn_implementation, getattr(c, "_attn_implementation_internal", None))
                   for i, c in _configs(model).items()},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        param_identity={n: (id(p), p.data_ptr(), p.dtype, p.device) for n, p in model.named_parameters()},
        tensor_hooks={n: len(p._backward_hooks or {}) for n, p in model.named_parameters()},
        training={name: m.training for name, m in model.named_modules()},
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        logits=logits,
    )


def assert_same(before, after, model):
    for key in ("hooks", "global_hooks", "forward_overrides", "attn_impl", "requires_grad", "param_identity",
                "tensor_hooks", "training"):
        assert after[key] == before[key], f"{key} changed"
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert after["state"][k].dtype == v.dtype and torch.equal(after["state"][k], v), f"weight {k} changed"
    assert torch.equal(after["logits"], before["logits"]), "logits changed"
    assert all(p.grad is None for p in model.parameters()), "a parameter has a .grad"


def assert_no_lensviz_hooks(model):
    """Nothing lensviz-made stays on the model (checked by origin, not only by count)."""
    for name, m in model.named_modules():
        for attr in HOOK_DICTS:
            for hook in (getattr(m, attr, None) or {}).values():
                mod = getattr(hook, "__module__", "") or ""
                assert not mod.startswith("lensviz"), f"{name}.{attr} holds {hook}"


# the runs ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _fail_in_mlp(exc):
    """Recorder.on_mlp_activation raises at layer 1 (inside the forward, inside a module pre-hook)."""
    orig = capture.Recorder.on_mlp_activation

    def on_mlp_activation(self, layer, a):
        if layer == 1:
            raise exc("injected at the MLP of layer 1")
        return orig(self, layer, a)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(capture.Recorder, "on_mlp_activation", on_mlp_activation)
        yield


@contextlib.contextmanager
def _fail_in_attention(exc):
    """Recorder.on_attention raises at layer 1 (inside lensviz's attention function)."""
    orig = capture.Recorder.on_attention

    def on_attention(self, layer, *args):
        if layer == 1:
            raise exc("injected in the attention of layer 1")
        return orig(self, layer, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(capture.Recorder, "on_attention", on_attention)
        yield


@contextlib.contextmanager
def _fail_in_resolver(exc):
    """The target resolver raises (after the forward, before the backward)."""
    def pick_target(last, target):
        raise exc("injected in the target resolver")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(capture, "pick_target", pick_target)
        yield


@contextlib.contextmanager
def _fail_in_backward(model, adapter, exc):
    """A gradient hook on layer 1's MLP output raises during loss.backward(). The user-made forward
    hook that plants it is removed here, so only lensviz's cleanup is under test."""
    def plant(mod, args, out):
        def boom(grad):
            raise exc("injected in the backward pass at layer 1")

        if out.requires_grad:
            out.register_hook(boom)

    handle = adapter.part(model, 1, "mlp").register_forward_hook(plant)
    try:
        yield
    finally:
        handle.remove()


FAILURES = {  # kind -> (injection context factory, exception it raises, backward)
    "mlp": (lambda lens: _fail_in_mlp(Injected), Injected, True),
    "mlp-forward-only": (lambda lens: _fail_in_mlp(Injected), Injected, False),
    "mlp-interrupt": (lambda lens: _fail_in_mlp(InjectedInterrupt), InjectedInterrupt, True),
    "attention-interrupt": (lambda lens: _fail_in_attention(InjectedInterrupt), InjectedInterrupt, True),
    "resolver": (lambda lens: _fail_in_resolver(Injected), Injected, True),
    "backward": (lambda lens: _fail_in_backward(lens.model, lens.adapter, Injected), Injected, True),
}
KINDS = ("normal", "mlp", "forward", "attention-interrupt", "normal", "resolver", "backward", "mlp-interrupt",
         "normal", "mlp-forward-only")


def run_kind(lens, kind):
    """One trace of the given kind; returns the trace, or the exception class it raised."""
    if kind == "normal":
        return lens.trace(PROMPT, target=TARGET)
    if kind == "forward":
        return lens.trace(PROMPT, target=TARGET, backward=False)
    make, exc, backward = FAILURES[kind]
    target = None if kind == "resolver" else TARGET   # the resolver only runs when the model picks the target
    with make(lens), pytest.raises(exc, match="injected"):
        lens.trace(PROMPT, target=target, backward=backward)
    return exc


def hammer(lens, n_runs):
    """n_runs traces cycling through KINDS, half of them inside torch.no_grad(). After each: grad mode
    and the recorder context variable are as before, and no lensviz hook is left."""
    reference = None
    for i, kind in zip(range(n_runs), itertools.cycle(KINDS)):
        outer = torch.no_grad() if i % 2 else torch.enable_grad()
        with outer:
            grad_mode = torch.is_grad_enabled()
            result = run_kind(lens, kind)
            assert torch.is_grad_enabled() == grad_mode, f"grad mode not restored after {kind}"
        assert capture._ACTIVE.get() is None, f"recorder left active after {kind}"
        assert_no_lensviz_hooks(lens.model)
        if kind == "normal":
            if reference is None:
                reference = result
            else:  # every normal run gives the same answer, bit for bit, after any failures
                assert torch.equal(result.logits, reference.logits) and result.loss == reference.loss
                for layer in range(lens.n_layers):
                    assert torch.equal(result.resid_grad(layer), reference.resid_grad(layer))
    return reference


def _mixed_flags(model):
    """Some parameters require grad and some do not, so restoring them is checked exactly."""
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 != 1)
    return {n: p.requires_grad for n, p in model.named_parameters()}


# tests ---------------------------------------------------------------------------------------------
def test_nothing_lost_tiny(tiny):
    model = tiny.model
    flags = _mixed_flags(model)
    assert any(flags.values()) and not all(flags.values())
    ids = tiny.encode(PROMPT)[0]
    before = snapshot(model, ids)
    first = tiny.trace(PROMPT, target=TARGET)
    ref = hammer(tiny, 50)
    assert_same(before, snapshot(model, ids), model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(ref.logits, first.logits) and ref.loss == first.loss
    assert torch.equal(ref.logits, before["logits"])


def test_nothing_lost_in_train_mode(tiny):
    """A model left in train() mode comes back in train() mode (eval only inside the run)."""
    model = tiny.model.train()
    model.get_submodule(tiny.adapter.final_norm).eval()  # a mixed pattern, restored module by module
    ids = tiny.encode(PROMPT)[0]
    before = snapshot(model, ids)
    assert any(before["training"].values()) and not all(before["training"].values())
    hammer(tiny, 16)
    assert_same(before, snapshot(model, ids), model)


def test_no_grad_context_kept(tiny):
    """Tracing with gradients inside torch.no_grad() still records gradients and leaves no_grad on."""
    with torch.no_grad():
        tr = tiny.trace(PROMPT, target=TARGET)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    assert tr.resid_grad(0).abs().sum() > 0


def test_nothing_lost_smol(smol):
    model = smol.model
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    saved_training = {n: m.training for n, m in model.named_modules()}
    try:
        flags = _mixed_flags(model)
        ids = smol.encode(PROMPT)[0]
        before = snapshot(model, ids)
        ref = hammer(smol, 12)
        after = snapshot(model, ids)
        assert_same(before, after, model)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert torch.equal(ref.logits, before["logits"])
        assert before["attn_impl"] and all(v[0] != capture.IMPL_NAME for v in before["attn_impl"].values())
        del before, after
        model.train()  # and once more in train mode
        ids = smol.encode("The capital of France is")[0]
        before = snapshot(model, ids)
        hammer(smol, 6)
        assert_same(before, snapshot(model, ids), model)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
        for n, m in model.named_modules():
            m.training = saved_training[n]


def _patch_sets(lens):
    source = lens.trace("The capital of Japan is the city of", target=TARGET, backward=False)
    return [
        (lv.HeadAblation(1, [0, 2]),),
        (lv.NeuronPatch(0, [1, 2], value=3.0),),
        (lv.AttentionPatch(-1.0),),  # self-patching: needs an inner unpatched run
        (lv.TopKAttention(2, layers=[0, 2]),),
        (lv.ActivationPatch(source, 1, "pre", positions=[(2, 3), (4, 4)]),),
        (lv.SegmentMask(), lv.HeadAblation(0, 1), lv.NeuronPatch(2, 0)),
    ]


def test_nothing_lost_with_patches(tiny):
    """Patched runs, and patched runs that raise mid-forward or mid-backward, leave nothing behind;
    an unpatched trace afterwards is bit-identical to one before."""
    model = tiny.model
    _mixed_flags(model)
    segments = ["I like Italy and France.", " I visited the city of"]
    ids = tiny.encode(PROMPT)[0]
    before = snapshot(model, ids)
    first = tiny.trace(PROMPT, target=TARGET)
    sets = _patch_sets(tiny)
    for i in range(3 * len(sets)):
        patches = sets[i % len(sets)]
        prompt = segments if any(isinstance(p, lv.SegmentMask) for p in patches) else PROMPT
        with (torch.no_grad() if i % 2 else torch.enable_grad()):
            grad_mode = torch.is_grad_enabled()
            mode = i // len(sets)
            if mode == 0:
                tr = tiny.trace(prompt, target=TARGET, patches=patches)
                assert tr.resid_grad(-1).abs().sum() > 0  # the last block is never cut off from L
            elif mode == 1:
                with _fail_in_mlp(Injected), pytest.raises(Injected):
                    tiny.trace(prompt, target=TARGET, patches=patches)
            else:
                with _fail_in_backward(model, tiny.adapter, InjectedInterrupt), pytest.raises(InjectedInterrupt):
                    tiny.trace(prompt, target=TARGET, patches=patches)
            assert torch.is_grad_enabled() == grad_mode
        assert capture._ACTIVE.get() is None
        assert_no_lensviz_hooks(model)
    assert_same(before, snapshot(model, ids), model)
    again = tiny.trace(PROMPT, target=TARGET)
    assert torch.equal(again.logits, first.logits) and again.loss == first.loss
    for layer in range(tiny.n_layers):
        assert torch.equal(again.reversed_attention(layer), first.reversed_attention(layer))
