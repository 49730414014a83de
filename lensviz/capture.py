"""Capture: one forward and one backward pass of an HF causal LM, recording what the lenses need.

Installs lensviz's attention function (through transformers' AttentionInterface, with a mask function
registered beside it so the causal mask is kept), forward pre-hooks at a few sites per block and
tensor hooks for the gradients. Everything is removed and every flag restored on exit, also when the
run raises. Attention maps are not stored: q, k, v are, and `Trace` derives A and RA per layer.
"""
from __future__ import annotations

import contextvars
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .adapters import Adapter, Dims

IMPL_NAME = "lensviz"
_ACTIVE: contextvars.ContextVar["Recorder | None"] = contextvars.ContextVar("lensviz_recorder", default=None)
_REGISTERED = False


def _register_attention() -> None:
    """Register lensviz's attention and mask functions with transformers (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPL_NAME, lensviz_attention)
    AttentionMaskInterface.register(IMPL_NAME, sdpa_mask)
    _REGISTERED = True


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[..., H_kv, T, d] -> [..., H_kv * n_rep, T, d]; query head h reads kv head h // n_rep."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=-3)


def causal_allowed(mask: torch.Tensor | None, t_q: int, t_k: int, device=None) -> torch.Tensor:
    """The [T_q, T_k] boolean 'may attend' matrix for a mask as passed to the attention function
    (None = plain causal; bool = True where allowed; float = 0 where allowed)."""
    if mask is None:
        return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(t_k - t_q)
    m = mask[0, 0] if mask.dim() == 4 else mask
    return m if m.dtype == torch.bool else m == 0


def attention_probs(q: torch.Tensor, k: torch.Tensor, scaling: float, allowed: torch.Tensor) -> torch.Tensor:
    """A = softmax(scaling * q k^T) over allowed keys. q [H, T, d], k [H_kv, T, d] -> [H, T, T]."""
    k = repeat_kv(k, q.shape[-3] // k.shape[-3])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1)


def lensviz_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function. query [B, H, T, d], key/value [B, H_kv, S, d] (after RoPE).
    Returns ([B, T, H, d], None) as the interface requires."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    rec = _ACTIVE.get()
    layer = rec.layer_of_attn.get(id(module)) if rec is not None else None
    edit = rec.prob_edits.get(layer) if rec is not None and layer is not None else None
    n_rep = query.shape[1] // key.shape[1]
    if edit is None:
        k, v = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
        is_causal = attention_mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True)
        out = F.scaled_dot_product_attention(
            query, k, v, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling
        )
    else:  # explicit path: a patch edits the probabilities after the softmax
        allowed = causal_allowed(attention_mask, query.shape[2], key.shape[2], query.device)
        probs = attention_probs(query, key, scaling, allowed).to(value.dtype)
        out = torch.matmul(edit(probs), repeat_kv(value, n_rep))
    out = out.transpose(1, 2)
    if rec is not None and layer is not None:
        rec.on_attention(layer, query, key, value, attention_mask, scaling, out)
    return out, None


@dataclass
class Recorder:
    """What one run records, per layer (lists indexed by layer; batch dimension dropped)."""

    n_layers: int
    parallel: bool
    want_grads: bool
    layer_of_attn: dict = field(default_factory=dict)
    prob_edits: dict = field(default_factory=dict)  # layer -> fn(A [B,H,T,T]) -> A'

    def __post_init__(self):
        n = self.n_layers
        for name in ("pre", "mid", "q", "k", "v", "o", "a", "scaling", "mask", "g_pre", "g_mid", "g_o"):
            setattr(self, name, [None] * n)
        self.final = None
        self.g_final = None

    def _store(self, store: list, layer: int) -> Callable:
        def hook(grad):
            store[layer] = grad[0].detach()

        return hook

    def _track(self, x: torch.Tensor, store: list, layer: int, gstore: list | None):
        store[layer] = x[0].detach()
        if self.want_grads and gstore is not None and x.requires_grad:
            x.register_hook(self._store(gstore, layer))

    # called from hooks ---------------------------------------------------------------------------
    def on_block_input(self, layer, x):
        self._track(x, self.pre, layer, self.g_pre)

    def on_mid(self, layer, x):
        self._track(x, self.mid, layer, self.g_mid)

    def on_attn_output(self, layer, out):  # parallel residual: mid = pre + attention output
        self.mid[layer] = self.pre[layer] + out[0].detach()

    def on_mlp_activation(self, layer, a):
        self.a[layer] = a[0].detach()

    def on_final(self, x):
        self.final = x[0].detach()
        if self.want_grads and x.requires_grad:
            def hook(grad):
                self.g_final = grad[0].detach()

            x.register_hook(hook)

    def on_attention(self, layer, q, k, v, mask, scaling, out):
        self.q[layer], self.k[layer], self.v[layer] = q[0].detach(), k[0].detach(), v[0].detach()
        self.scaling[layer] = float(scaling)
        self.mask[layer] = None if mask is None else mask[0, 0].detach()
        self.o[layer] = out[0].detach().flatten(-2)  # [T, H*d]
        if self.want_grads and out.requires_grad:
            def hook(grad):
                self.g_o[layer] = grad[0].detach().flatten(-2)

            out.register_hook(hook)

    # after the run -------------------------------------------------------------------------------
    def finish(self) -> dict:
        """Everything recorded, on CPU, with the derived sites filled in (post, parallel-residual grads)."""
        cpu = lambda t: None if t is None else t.to("cpu")  # noqa: E731
        lists = {n: [cpu(t) for t in getattr(self, n)] for n in
                 ("pre", "mid", "q", "k", "v", "o", "a", "mask", "g_pre", "g_mid", "g_o")}
        final, g_final = cpu(self.final), cpu(self.g_final)
        lists["post"] = lists["pre"][1:] + [final]
        lists["g_post"] = lists["g_pre"][1:] + [g_final]
        if self.parallel:  # mid is not a tensor of the graph: its gradient is the block output's
            lists["g_mid"] = list(lists["g_post"])
        lists["scaling"] = list(self.scaling)
        return lists


def _args_hidden(args, kwargs):
    if args:
        return args[0]
    return kwargs.get("hidden_states")


@contextmanager
def installed(model, adapter: Adapter, rec: Recorder):
    """Install lensviz's attention implementation and hooks; remove all of them on exit."""
    _register_attention()
    blocks = adapter.blocks_of(model)
    handles = []
    configs = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            configs[id(cfg)] = (cfg, cfg._attn_implementation_internal)
    token = _ACTIVE.set(rec)
    try:
        for cfg, _ in configs.values():
            cfg._attn_implementation_internal = IMPL_NAME
        for layer, block in enumerate(blocks):
            rec.layer_of_attn[id(block.get_submodule(adapter.attn))] = layer

            def pre_block(mod, args, kwargs, layer=layer):
                rec.on_block_input(layer, _args_hidden(args, kwargs))

            handles.append(block.register_forward_pre_hook(pre_block, with_kwargs=True))
            if rec.parallel:
                def attn_out(mod, args, output, layer=layer):
                    rec.on_attn_output(layer, output[0] if isinstance(output, tuple) else output)

                handles.append(block.get_submodule(adapter.attn).register_forward_hook(attn_out))
            else:
                def pre_ln2(mod, args, kwargs, layer=layer):
                    rec.on_mid(layer, _args_hidden(args, kwargs))

                handles.append(block.get_submodule(adapter.ln2).register_forward_pre_hook(pre_ln2, with_kwargs=True))

            def pre_mlp_out(mod, args, layer=layer):
                rec.on_mlp_activation(layer, args[0])

            handles.append(block.get_submodule(adapter.mlp_out).register_forward_pre_hook(pre_mlp_out))

        def pre_final(mod, args, kwargs):
            rec.on_final(_args_hidden(args, kwargs))

        handles.append(model.get_submodule(adapter.final_norm).register_forward_pre_hook(pre_final, with_kwargs=True))
        yield rec
    finally:
        for h in handles:
            h.remove()
        for cfg, impl in configs.values():
            cfg._attn_implementation_internal = impl
        _ACTIVE.reset(token)


@contextmanager
def frozen_eval(model):
    """Parameters do not require grad and every module is in eval mode; both restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = [m for m in model.modules() if m.training]
    try:
        for p, _ in flags:
            if p.requires_grad:
                p.requires_grad_(False)
        for m in training:
            m.training = False
        yield
    finally:
        for p, flag in flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        for m in training:
            m.training = True


def module_device(module) -> torch.device:
    """Where a module computes: accelerate's execution device if dispatched, else its weight's device."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    w = next(module.parameters(), None)
    return w.device if w is not None and w.device.type != "meta" else torch.device("cpu")


def input_device(model, adapter: Adapter) -> torch.device:
    """Where token ids must live: the embedding's execution device (accelerate-aware)."""
    return module_device(model.get_submodule(adapter.embed))


def run(model, adapter: Adapter, dims: Dims, input_ids: torch.Tensor, resolve_target: Callable,
        *, backward: bool = True, prob_edits: dict | None = None, extra: ExitStack | None = None) -> dict:
    """One forward (and backward) pass on `input_ids` [T].

    `resolve_target(last_logits [V]) -> int` picks the explained token once the logits exist.
    Returns the recorded tensors (see `Recorder.finish`) plus `logits` [T, V], `target_id`, `loss`.
    """
    rec = Recorder(dims.n_layers, adapter.is_parallel(model.config), backward)
    rec.prob_edits = dict(prob_edits or {})
    ids = input_ids.to(input_device(model, adapter)).unsqueeze(0)
    with frozen_eval(model), installed(model, adapter, rec), torch.set_grad_enabled(backward):
        embeds = model.get_submodule(adapter.embed)(ids)
        if backward:
            embeds = embeds.detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, use_cache=False)
        logits = out.logits[0]
        last = logits[-1]
        target_id = int(resolve_target(last.detach()))
        logp = torch.log_softmax(last.float() if last.dtype in (torch.float16, torch.bfloat16) else last, dim=-1)
        loss = -logp[target_id]
        if backward:
            loss.backward()
    data = rec.finish()
    data["logits"] = logits.detach().to("cpu")
    data["target_id"] = target_id
    data["loss"] = float(loss.detach())
    return data
