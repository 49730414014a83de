"""Promise 4 for patches: after 200 patched runs, some raising mid-run, the model has no hooks, its
attention implementation and grad / training flags are restored, and weights and outputs are bit-identical."""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

import lensviz as lv
from lensviz import capture
from lensviz.patches.base import Patch
from tests import models
from tests.conftest import PROMPT


class Boom(RuntimeError):
    pass


@dataclass(frozen=True)
class RaiseAfterInstall(Patch):
    """Registers a hook, then raises while installing."""

    def install(self, ctx):
        ctx.pre_hook(ctx.part(0, "mlp_out"), lambda mod, args: None)
        raise Boom("install")


@dataclass(frozen=True)
class RaiseInForward(Patch):
    """Raises from inside the forward pass at `layer`."""

    layer: int = 1

    def install(self, ctx):
        def hook(mod, args):
            raise Boom("forward")

        ctx.pre_hook(ctx.part(self.layer, "mlp_out"), hook)


def snapshot(model):
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
              len(getattr(m, "_backward_pre_hooks", {}))) for m in model.modules()]
    configs = [getattr(m.config, "_attn_implementation", None) for m in model.modules() if hasattr(m, "config")]
    flags = [p.requires_grad for p in model.parameters()]
    training = [m.training for m in model.modules()]
    forwards = ["forward" in m.__dict__ for m in model.modules()]
    return hooks, configs, flags, training, forwards


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_two_hundred_patched_runs_with_failures_leave_the_model_as_it_was(family, tiny_tokenizer):
    model = models.build(family)
    for i, p in enumerate(model.parameters()):  # a mix of flags that must come back exactly
        p.requires_grad_(i % 3 == 0)
    lens = lv.Lens(model, tiny_tokenizer)
    ids = lens.encode(PROMPT)[0]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(ids[None]).logits.clone()
    before = snapshot(model)
    base = lens.trace(PROMPT, target=" Paris")
    rng = random.Random(0)
    makers = [
        lambda: lv.AttentionPatch(rng.choice([-2.0, 0.5]), heads=[rng.randrange(lens.n_heads)]),
        lambda: lv.TopKAttention(rng.randint(1, 4), layers=[rng.randrange(lens.n_layers)]),
        lambda: lv.HeadAblation(rng.randrange(lens.n_layers), [rng.randrange(lens.n_heads)]),
        lambda: lv.NeuronPatch(rng.randrange(lens.n_layers), [rng.randrange(lens.d_mlp)], mode=rng.choice(["set", "on"])),
        lambda: lv.ActivationPatch(base, rng.randrange(lens.n_layers), rng.choice(["pre", "mid", "post"])),
        lambda: lv.ShiftEdit(rng.randrange(lens.n_layers), 0.1),
        lambda: lv.SegmentMask([(0, 4), (4, 9)]),
        lambda: RaiseAfterInstall(),
        lambda: RaiseInForward(rng.randrange(lens.n_layers)),
    ]
    failures = 0
    for run in range(200):
        patches = tuple(rng.choice(makers)() for _ in range(rng.randint(1, 3)))
        kwargs = dict(backward=rng.random() < 0.5, gradient=rng.choice(["standard", "layer_causal"]))
        if rng.random() < 0.5:
            kwargs["base"] = base
        try:
            lens.trace(PROMPT, target=" Paris", patches=patches, **kwargs)
        except Boom:
            failures += 1
        assert capture._ACTIVE.get() is None
    assert failures > 20
    assert snapshot(model) == before
    assert torch.is_grad_enabled()
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(ids[None]).logits, logits)


@dataclass(frozen=True)
class RaiseAtCall(Patch):
    """Raises when block 0 runs for the `at`-th time (at >= 2: a cached decoding step of generate)."""

    at: int = 2

    def install(self, ctx):
        calls = []

        def hook(mod, args):
            calls.append(1)
            if len(calls) == self.at:
                raise Boom("decode")

        ctx.pre_hook(ctx.part(0, "mlp_out"), hook)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_runs_with_failures_leave_the_model_as_it_was(family, tiny_tokenizer):
    """The generate path (Lens.generate, lens.patched + model.generate) with MAS prefill, other patches
    and failures at install, prefill, decoding or on bad ids: nothing of lensviz remains afterwards."""
    model = models.build(family)
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 == 0)
    model.train()  # Lens.generate runs in eval mode and must give the flags back
    lens = lv.Lens(model, tiny_tokenizer)
    parts = ["I like Italy and France.", " I visited the city of"]
    ids = lens.encode(parts)[0]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    gen_config = model.generation_config.to_dict()
    model.eval()
    with torch.no_grad():
        logits = model(ids[None]).logits.clone()
    model.train()
    before = snapshot(model)
    base = lens.trace(parts, backward=False)
    other = lens.encode("The capital of Japan is the city of Tokyo. The capital of France is Paris.")[0]
    rng = random.Random(1)
    makers = [
        lambda: lv.SegmentMask(),
        lambda: lv.SegmentMask([(0, 4), (4, 9)]),
        lambda: lv.HeadAblation(rng.randrange(lens.n_layers), [rng.randrange(lens.n_heads)]),
        lambda: lv.NeuronPatch(rng.randrange(lens.n_layers), [rng.randrange(lens.d_mlp)], mode=rng.choice(["set", "on"])),
        lambda: lv.TopKAttention(rng.randint(1, 4), layers=[rng.randrange(lens.n_layers)]),
        lambda: lv.ShiftEdit(rng.randrange(lens.n_layers), 0.1),
        lambda: RaiseAfterInstall(),
        lambda: RaiseInForward(rng.randrange(lens.n_layers)),
        lambda: RaiseAtCall(rng.randint(2, 4)),
    ]
    failures = {"boom": 0, "lensviz": 0}
    for run in range(40):
        patches = tuple(rng.choice(makers)() for _ in range(rng.randint(1, 3)))
        if sum(isinstance(p, lv.SegmentMask) for p in patches) > 1:
            patches = tuple(p for p in patches if not isinstance(p, lv.SegmentMask)) + (lv.SegmentMask(),)
        try:
            if run % 2:
                lens.generate(parts, rng.randint(1, 5), patches=patches, use_cache=rng.random() < 0.8)
            else:
                start = other if rng.random() < 0.3 else ids  # wrong ids: SegmentMask raises LensvizError
                with lens.patched(*patches, base=base), torch.no_grad():
                    model.generate(start[None], max_new_tokens=rng.randint(1, 5), do_sample=False, pad_token_id=0)
        except Boom:
            failures["boom"] += 1
        except lv.LensvizError:
            failures["lensviz"] += 1
        assert capture._ACTIVE.get() is None
    assert failures["boom"] > 5 and failures["lensviz"] > 0
    assert snapshot(model) == before
    assert model.generation_config.to_dict() == gen_config
    assert torch.is_grad_enabled()
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids[None]).logits, logits)
