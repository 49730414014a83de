"""Capture: one forward and one backward pass of an HF causal LM, recording what the lenses need.

Installs lensviz's attention function (through transformers' AttentionInterface, with a mask function
registered beside it so the causal mask is kept), forward pre-hooks at a few sites per block and
tensor hooks for the gradients; `run` returns a frozen `Recording` of the sites listed in `RECORDED`.
Everything is removed and every flag restored on exit, also when the run raises. Attention maps are
not stored: q, k, v are, and `Trace` derives A and RA per layer.
"""
from __future__ import annotations

import contextvars
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from .attention import AttentionEdit, PromptMask, explicit_attention, keep_mask, repeat_kv
from .errors import LensvizError
from .hf import args_hidden, frozen_eval, input_device, replace_hidden
from .metrics import metric as run_metric, objective

IMPL_NAME = "lensviz"
_ACTIVE: contextvars.ContextVar["Recorder | None"] = contextvars.ContextVar("lensviz_recorder", default=None)
_REGISTERED = False
# A progress / cancellation callback for runs in this context: watch(stage, layer) with stage "forward"
# (a block is about to run) or "backward" (a block's input gradient arrived); raising inside it (e.g.
# `Cancelled`) ends the run, and the usual exits remove every hook. See `watching`.
_WATCH: contextvars.ContextVar["Callable[[str, int], None] | None"] = contextvars.ContextVar("lensviz_watch", default=None)

#: The sites a run records, per layer (batch dimension dropped, detached, on CPU after the run).
RECORDED = {
    "pre": "[T, D] the block's input (resid pre)",
    "mid": "[T, D] after attention (resid mid); parallel blocks: pre + attention output",
    "post": "[T, D] the block's output (the next block's input; the final norm's input after the last)",
    # post-LN blocks (OPT-350m): "mid" is LN_1(pre + attention output), the MLP's input; "post" LN_2(mid + MLP)
    "q": "[H, T, d] queries as the attention saw them (after RoPE)",
    "k": "[H_kv, T, d] keys (after RoPE)",
    "v": "[H_kv, T, d] values",
    "o": "[T, H*d] head outputs before W_O (the output projection's input)",
    "a": "[T, F] MLP activations (the input of the MLP's output matrix)",
    "mask": "[T, T] the attention mask as passed to the attention function (None: plain causal)",
    "scaling": "float, the score multiplier s",
    "g_pre": "[T, D] dL/d pre",
    "g_mid": "[T, D] dL/d mid (parallel blocks: equal to dL/d post)",
    "g_post": "[T, D] dL/d post (layer-causal: the gradient of layer l's own loss)",
    "g_o": "[T, H*d] dL/d o",
    "softcap": "float or None, the attention-logit soft-cap c (Gemma 2)",
    "sinks": "[H] or None, the learned attention sinks (gpt-oss)",
    "attn_y": "[T, D] or None, the attention output before its post-norm / multiplier (non-plain writes only)",
    "mlp_y": "[T, D] or None, the MLP output before its post-norm / multiplier (non-plain writes only)",
    "g_mlp": "[T, D] or None, dL/d mlp_y (the Backward Lens FF2 VJP where it differs from dL/d post)",
    "router_experts": "[T, k] long or None, the experts each token was routed to (MoE)",
    "router_weights": "[T, k] or None, their router weights (MoE)",
}
FORWARD_SITES = ("pre", "mid", "q", "k", "v", "o", "a", "mask", "scaling", "softcap", "sinks", "attn_y", "mlp_y",
                 "router_experts", "router_weights")  # recorded by hooks in the forward
GRADIENT_SITES = ("g_pre", "g_mid", "g_o", "g_mlp")  # recorded by tensor hooks in the backward


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


def _fused_attention(module, query, key, value, attention_mask, scaling, dropout, edit) -> torch.Tensor:
    """scaled_dot_product_attention, with the kept keys of a top-k edit as its boolean mask and the edit's
    added maps P applied as out += P @ V. query [B, H, T, d] -> [B, H, T, d]."""
    n_rep = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    is_causal = attention_mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True)
    attn_mask = attention_mask
    if edit is not None and edit.keep:  # e.g. top-k: the kept keys as a boolean mask of the fused kernel
        attn_mask, is_causal = keep_mask(query, key, attention_mask, scaling, edit.keep), False
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal,
                                         scale=scaling)
    for p in (edit.added if edit is not None else ()):
        if p.shape[-1] != v.shape[-2] or p.shape[-2] != query.shape[-2]:
            raise LensvizError(f"an attention map of {p.shape[-1]} x {p.shape[-1]} does not fit this call "
                               f"({query.shape[-2]} queries, {v.shape[-2]} keys): maps fit one prompt length")
        out = out + torch.matmul(p.to(device=v.device, dtype=v.dtype), v)
    return out


def lensviz_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function. query [B, H, T, d], key/value [B, H_kv, S, d] (after RoPE).
    Returns ([B, T, H, d], None) as the interface requires."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    rec = _ACTIVE.get()
    layer = rec.layer_of_attn.get(id(module)) if rec is not None else None
    edit = rec.attn_edits.get(layer) if rec is not None and layer is not None else None
    if rec is not None and rec.prompt_mask is not None:  # SegmentMask under lens.patched (prefill only)
        attention_mask = rec.prompt_mask.apply(attention_mask, query, key)
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")  # Gemma 2 soft-capping, gpt-oss sinks
    if softcap is None and sinks is None and (edit is None or not edit.explicit):
        out = _fused_attention(module, query, key, value, attention_mask, scaling, dropout, edit)
    else:  # edits, or maths the fused kernel lacks: the explicit path
        out = explicit_attention(query, key, value, attention_mask, scaling, edit, softcap=softcap, sinks=sinks)
    for fn in (edit.outputs if edit is not None else ()):
        out = fn(out)
    out = out.transpose(1, 2)
    if rec is not None and layer is not None:
        rec.on_attention(layer, query, key, value, attention_mask, scaling, out, softcap, sinks)
    return out, None


def _one(x: torch.Tensor) -> torch.Tensor:
    """The one sequence of a batch-1 activation: [1, T, ...] -> [T, ...]; a 2-D [T, F] tensor (a family
    that flattens batch and tokens inside its MLP, e.g. OPT) is returned as it is."""
    return x if x.dim() == 2 else x[0]


class Cancelled(LensvizError):
    """A run ended early by its watcher (the Explorer's Stop button)."""


@contextmanager
def watching(watch: "Callable[[str, int], None]"):
    """Call `watch(stage, layer)` once per block in the forward ("forward", before block `layer`) and once per
    block in the backward ("backward", when the gradient at block `layer`'s input arrives) of every run
    started inside (traces, and lens.generate's decoding steps). A watch that raises ends the run."""
    token = _WATCH.set(watch)
    try:
        yield
    finally:
        _WATCH.reset(token)


@dataclass(frozen=True, eq=False)
class Recording:
    """What one run recorded. sites: {name in RECORDED: tuple of one value per layer}; logits [T, V];
    target_id (the first target token), loss (the NLL of the target: summed over its tokens, explained at
    the last len(target_ids) positions), layer_losses (layer-causal: each layer's logit-lens NLL, else
    None), attn_edits {layer: AttentionEdit} the patches installed, target_ids (every target token),
    distractor_id (or None) and metric (the target log-probability, or the logit difference with a
    distractor; see lensviz.metrics)."""

    sites: Mapping[str, tuple]
    logits: torch.Tensor
    target_id: int
    loss: float
    layer_losses: tuple | None = None
    attn_edits: Mapping[int, AttentionEdit] = field(default_factory=dict)
    target_ids: tuple = ()
    distractor_id: int | None = None
    metric: float | None = None

    def at(self, site: str, layer: int):
        """The value of `site` at `layer` (a plain, already checked index)."""
        return self.sites[site][layer]


@dataclass
class Recorder:
    """What one run records while it runs, per layer (batch dimension dropped)."""

    n_layers: int
    parallel: bool
    want_grads: bool
    layer_of_attn: dict = field(default_factory=dict)
    attn_edits: dict = field(default_factory=dict)  # layer -> AttentionEdit
    layer_causal: bool = False
    prompt_mask: PromptMask | None = None  # lens.patched + SegmentMask: the prefill mask

    def edit(self, layer: int) -> AttentionEdit:
        """The (created on first use) attention edit of a layer, for patches to add to."""
        return self.attn_edits.setdefault(layer, AttentionEdit())

    n_explained: int = 1  # the explained positions are the last n_explained (layer-causal losses read them)

    def __post_init__(self):
        self.sites = {name: [None] * self.n_layers for name in FORWARD_SITES + GRADIENT_SITES}
        self.g_post_lc = [None] * self.n_layers  # layer-causal: dL_l/d post_l (differs from the next block's input grad)
        self.out_last = [None] * self.n_layers  # layer-causal: graph-connected block outputs at the last position
        self.final = None
        self.g_final = None
        self.done = False

    def _store(self, store: list, layer: int, watch=None) -> Callable:
        def hook(grad):
            store[layer] = _one(grad).detach()
            if watch is not None:
                watch("backward", layer)

        return hook

    def _track(self, x: torch.Tensor, site: str, layer: int, grad_site: str | None, watch=None):
        self.sites[site][layer] = _one(x).detach()
        if self.want_grads and grad_site is not None and x.requires_grad:
            x.register_hook(self._store(self.sites[grad_site], layer, watch))

    # called from hooks ---------------------------------------------------------------------------
    def on_block_input(self, layer, x):
        """Record a block's input; in layer-causal mode return its detached copy for the block to use."""
        watch = _WATCH.get()
        if watch is not None:
            watch("forward", layer)
        if not (self.layer_causal and self.want_grads):
            self._track(x, "pre", layer, "g_pre", watch)
            return None
        if layer > 0 and x.requires_grad:
            x.register_hook(self._store(self.g_post_lc, layer - 1))
        leaf = x.detach().requires_grad_(True)
        self._track(leaf, "pre", layer, "g_pre")
        return leaf

    def on_block_output(self, layer, out):
        if self.layer_causal and self.want_grads and layer < self.n_layers - 1:
            self.out_last[layer] = out[:, -self.n_explained:]

    def on_mid(self, layer, x):
        self._track(x, "mid", layer, "g_mid")

    def on_attn_output(self, layer, out):  # parallel residual: mid = pre + attention output
        self.sites["mid"][layer] = self.sites["pre"][layer] + out[0].detach()

    def on_mlp_activation(self, layer, a):
        self.sites["a"][layer] = _one(a).detach()

    def on_sublayer_output(self, layer, kind: str, y):
        """A sublayer's raw output before its post-norm / multiplier ("attn" or "mlp"), and for the MLP
        its gradient (the Backward Lens FF2 VJP, which then differs from the residual's)."""
        if kind == "attn":
            self.sites["attn_y"][layer] = _one(y).detach()
        else:
            self._track(y, "mlp_y", layer, "g_mlp")

    def on_router(self, layer, out):
        """MoE router output (logits, top-k weights, top-k expert indices) for the T tokens."""
        _, weights, experts = out
        self.sites["router_experts"][layer] = experts.detach()
        self.sites["router_weights"][layer] = weights.detach()

    def on_final(self, x):
        if self.done:  # the run's own forward is over (layer-causal losses reuse the final norm)
            return
        self.final = x[0].detach()
        if self.want_grads and x.requires_grad:
            def hook(grad):
                self.g_final = grad[0].detach()

            x.register_hook(hook)

    def on_attention(self, layer, q, k, v, mask, scaling, out, softcap=None, sinks=None):
        s = self.sites
        s["q"][layer], s["k"][layer], s["v"][layer] = q[0].detach(), k[0].detach(), v[0].detach()
        s["scaling"][layer] = float(scaling)
        s["softcap"][layer] = None if softcap is None else float(softcap)
        s["sinks"][layer] = None if sinks is None else sinks.detach()
        s["mask"][layer] = None if mask is None else mask[0, 0].detach()
        s["o"][layer] = out[0].detach().flatten(-2)  # [T, H*d]
        if self.want_grads and out.requires_grad:
            def hook(grad):
                s["g_o"][layer] = grad[0].detach().flatten(-2)

            out.register_hook(hook)

    # after the run -------------------------------------------------------------------------------
    def sites_on_cpu(self) -> dict:
        """Every recorded site, on CPU, with the derived sites filled in (post, parallel-residual grads)."""
        cpu = lambda t: t.to("cpu") if isinstance(t, torch.Tensor) else t  # noqa: E731
        out = {name: [cpu(t) for t in values] for name, values in self.sites.items()}
        final, g_final = cpu(self.final), cpu(self.g_final)
        out["post"] = out["pre"][1:] + [final]
        if self.layer_causal:
            out["g_post"] = [cpu(t) for t in self.g_post_lc[:-1]] + [g_final]
        else:
            out["g_post"] = out["g_pre"][1:] + [g_final]
        if self.parallel:  # mid is not a tensor of the graph: its gradient is the block output's
            out["g_mid"] = list(out["g_post"])
        return out

    def finish(self, logits: torch.Tensor, target_id: int, loss: float, layer_losses=None,
               reused: Recording | None = None, reuse_upto: int = 0, target_ids=(), distractor_id=None,
               metric=None) -> Recording:
        """The frozen Recording; layers below `reuse_upto` are taken from `reused` (not recomputed)."""
        sites = self.sites_on_cpu()
        for name in FORWARD_SITES:
            for layer in range(reuse_upto):
                sites[name][layer] = reused.at(name, layer)
        return Recording(sites={n: tuple(v) for n, v in sites.items()}, logits=logits, target_id=target_id, loss=loss,
                         layer_losses=None if layer_losses is None else tuple(layer_losses),
                         attn_edits=dict(self.attn_edits),
                         target_ids=tuple(target_ids) or (target_id,), distractor_id=distractor_id,
                         metric=metric)


@contextmanager
def installed(model, adapter, rec: Recorder):
    """Install lensviz's attention implementation and hooks; remove all of them on exit."""
    _register_attention()
    blocks = adapter.blocks_of(model)
    plain = adapter.has_plain_writes(model.config)
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
                new = rec.on_block_input(layer, args_hidden(args, kwargs))
                return None if new is None else replace_hidden(args, kwargs, new)

            handles.append(block.register_forward_pre_hook(pre_block, with_kwargs=True))
            if rec.layer_causal:
                def post_block(mod, args, output, layer=layer):
                    rec.on_block_output(layer, output)

                handles.append(block.register_forward_hook(post_block))
            if rec.parallel:
                def attn_out(mod, args, output, layer=layer):
                    rec.on_attn_output(layer, output[0] if isinstance(output, tuple) else output)

                handles.append(block.get_submodule(adapter.attn).register_forward_hook(attn_out))
            else:
                def pre_ln2(mod, args, kwargs, layer=layer):
                    rec.on_mid(layer, args_hidden(args, kwargs))

                mid_site = block.get_submodule(adapter.mlp_reader)  # no second norm: the MLP reads mid
                handles.append(mid_site.register_forward_pre_hook(pre_ln2, with_kwargs=True))

            if adapter.mlp_out is not None:
                def pre_mlp_out(mod, args, layer=layer):
                    rec.on_mlp_activation(layer, args[0])

                handles.append(block.get_submodule(adapter.mlp_out).register_forward_pre_hook(pre_mlp_out))
            if not plain:  # post-norms / multipliers: the raw sublayer outputs (and the MLP's gradient)
                for kind, path in (("attn", adapter.o_proj), ("mlp", adapter.mlp or adapter.mlp_out)):
                    def raw_out(mod, args, output, layer=layer, kind=kind):
                        rec.on_sublayer_output(layer, kind, output[0] if isinstance(output, tuple) else output)

                    handles.append(block.get_submodule(path).register_forward_hook(raw_out))
            if adapter.router is not None:
                def router_out(mod, args, output, layer=layer):
                    rec.on_router(layer, output)

                handles.append(block.get_submodule(adapter.router).register_forward_hook(router_out))

        def pre_final(mod, args, kwargs):
            rec.on_final(args_hidden(args, kwargs))

        handles.append(model.get_submodule(adapter.final_input).register_forward_pre_hook(pre_final, with_kwargs=True))
        yield rec
    finally:
        for h in handles:
            h.remove()
        for cfg, impl in configs.values():
            cfg._attn_implementation_internal = impl
        _ACTIVE.reset(token)


@dataclass
class PatchContext:
    """What a patch sees while it installs itself into one run (see lensviz/patches/).

    Hooks registered through `pre_hook` / `forward_hook` run before lensviz's recording hooks and are
    removed when the run ends, also if it raises."""

    lens: object
    rec: Recorder
    stack: ExitStack
    input_ids: torch.Tensor
    segments: list | None
    target_id: int | None
    base: object = None  # an unpatched Trace of the same prompt and target, when the run has one
    model_kwargs: dict = field(default_factory=dict)
    own_calls: bool = False  # True in lens.patched: the caller makes the model calls (forward, generate, ...)

    @property
    def model(self):
        return self.lens.model

    @property
    def adapter(self):
        return self.lens.adapter

    def block(self, layer: int):
        return self.adapter.blocks_of(self.model)[layer]

    def part(self, layer: int, name: str):
        return self.adapter.part(self.model, layer, name)

    def pre_hook(self, module, fn, with_kwargs: bool = False) -> None:
        handle = module.register_forward_pre_hook(fn, prepend=True, with_kwargs=with_kwargs)
        self.stack.callback(handle.remove)

    def forward_hook(self, module, fn) -> None:
        handle = module.register_forward_hook(fn, prepend=True)
        self.stack.callback(handle.remove)

    def mask_prompt(self, allowed: torch.Tensor) -> None:
        """Let the prompt's tokens attend as `allowed` [P, P] says (bool, True = may attend; P =
        len(input_ids)) in the forward pass that encodes the prompt. In lens.trace: a 4-D mask for the
        run's one forward. In lens.patched: applied to every model call that encodes the prompt from
        position 0 (generate's prefill, or a plain forward over prompt + more tokens, whose later rows
        stay causal); cached one-token decoding steps keep the causal mask over the whole cache, so
        generated tokens read the prompt as the mask encoded it. See `attention.PromptMask`."""
        if not self.own_calls:
            device = self.lens.unembed_device
            self.model_kwargs["attention_mask"] = allowed[None, None].to(device)
            # positions stay 0..T-1: families that derive them from the mask (OPT) cannot read a 4-D one
            self.model_kwargs["position_ids"] = torch.arange(allowed.shape[-1], device=device)[None]
            return
        if self.rec.prompt_mask is not None:
            raise LensvizError("lens.patched takes one SegmentMask at a time")
        n = len(self.input_ids)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        pm = PromptMask(self.input_ids.detach().to("cpu"), allowed.to("cpu") & ~causal)
        self.rec.prompt_mask = pm
        path = self.adapter.blocks.rpartition(".")[0]
        backbone = self.model.get_submodule(path)  # "" -> the model itself
        self.pre_hook(backbone, pm.before_call, with_kwargs=True)
        self.forward_hook(backbone, pm.after_call)

    def replace_input(self, module, fn) -> None:
        """fn(hidden [B, T, D]) -> new hidden, for the hidden-states input of `module` (a block, the final norm)."""
        def hook(mod, args, kwargs):
            return replace_hidden(args, kwargs, fn(args_hidden(args, kwargs)))

        self.pre_hook(module, hook, with_kwargs=True)

    def replace_block_input(self, layer: int, fn) -> None:
        """fn(hidden [B, T, D]) -> new hidden, for block `layer`'s input."""
        self.replace_input(self.block(layer), fn)


@contextmanager
def reused_prefix(model, adapter, base_post, upto: int):
    """Blocks 0..upto-1 return their recorded outputs `base_post[layer]` [T, D] instead of computing
    (forward-only re-runs that change nothing before block `upto`). Restores each block's own `forward`
    on exit."""
    blocks = adapter.blocks_of(model)
    saved = []
    try:
        for layer in range(upto):
            block = blocks[layer]
            saved.append((block, "forward" in block.__dict__, block.__dict__.get("forward")))
            out = base_post[layer]

            def cached(*args, out=out, **kwargs):
                x = args_hidden(args, kwargs)  # a batch of copies of one prompt gets one copy each
                return out.to(device=x.device, dtype=x.dtype).unsqueeze(0).expand(x.shape[0], *out.shape)

            block.forward = cached
        yield
    finally:
        for block, had, fwd in saved:
            if had:
                block.forward = fwd
            else:
                del block.forward


def _recorder(lens, want_grads: bool) -> Recorder:
    return Recorder(lens.n_layers, lens.adapter.is_parallel(lens.model.config), want_grads)


@contextmanager
def patched(lens, patches, *, base=None):
    """Install `patches` (and lensviz's attention function) for any model call made inside, e.g.
    `model.generate`; everything is removed on exit. Nothing is recorded for the caller.
    `base` (a Trace) gives patches the prompt they refer to: SegmentMask masks the prefill over its
    ids (and its segments when its prompt was a list), see `attention.PromptMask`."""
    rec = _recorder(lens, False)
    ids = base.input_ids if base is not None else torch.zeros(0, dtype=torch.long)
    segments = base.segments if base is not None and isinstance(base.prompt, (list, tuple)) else None
    with ExitStack() as stack:
        stack.enter_context(installed(lens.model, lens.adapter, rec))
        ctx = PatchContext(lens, rec, stack, ids, segments, None if base is None else base.target_id, base,
                           own_calls=True)
        for patch in patches:
            patch.install(ctx)
        if ctx.model_kwargs:
            raise LensvizError("this patch changes the model's inputs and works only inside "
                               "lens.trace(..., patches=...)")
        yield


def pick_target(last_logits: torch.Tensor, target: int | None) -> int:
    """The explained token: `target`, or the model's own top-1 at the last position when None."""
    return int(last_logits.argmax()) if target is None else int(target)


def run(lens, input_ids: torch.Tensor, *, target=None, backward: bool = True,
        gradient: str = "standard", patches=(), segments=None, base=None, reuse_upto: int = 0,
        distractor: int | None = None) -> Recording:
    """One forward (and backward) pass of `lens.model` on `input_ids` [T], with `patches` installed for
    this run only. `target`: the token id explained (None: the model's top-1 at the last position), or a
    sequence of n ids explained at the last n positions (teacher-forced: the caller appended all but the
    last to the prompt). `distractor`: a token id; the metric is then logit(target) - logit(distractor)
    at the last position.

    The loss is the NLL L = -sum_k log softmax(logits[T-n+k])[target_k]; the backward pass
    differentiates L, or -metric with a distractor (lensviz.metrics). gradient="layer_causal": each
    block's input is detached and its gradient comes from its own logit-lens objective at the explained
    positions (the layer-causal gradient of Deutch et al. 2024, "In-context learning and gradient descent
    revisited"). `base` (an unpatched Trace of the same ids) with `reuse_upto` > 0 and backward=False:
    blocks before `reuse_upto` are not recomputed; their records are copied from `base`. Returns the
    `Recording`."""
    model, adapter = lens.model, lens.adapter
    targets = None if target is None else ([int(target)] if isinstance(target, int) else [int(t) for t in target])
    rec = _recorder(lens, backward)
    rec.layer_causal = gradient == "layer_causal"
    rec.n_explained = 1 if targets is None else len(targets)
    ids = input_ids.to(input_device(model, adapter)).unsqueeze(0)
    reuse_upto = reuse_upto if (base is not None and not backward) else 0
    with ExitStack() as stack:
        stack.enter_context(frozen_eval(model))
        stack.enter_context(installed(model, adapter, rec))
        ctx = PatchContext(lens, rec, stack, input_ids, segments, None if targets is None else targets[0], base)
        for patch in patches:
            patch.install(ctx)
        if reuse_upto:
            stack.enter_context(reused_prefix(model, adapter, base.recording.sites["post"], reuse_upto))
        stack.enter_context(torch.set_grad_enabled(backward))
        embeds = model.get_submodule(adapter.embed)(ids)
        if backward:
            embeds = embeds.detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, use_cache=False, **ctx.model_kwargs)
        logits = out.logits[0]
        if targets is None:
            targets = [pick_target(logits[-1].detach(), None)]
        rows = logits[-len(targets):]
        total, loss = objective(rows, targets, distractor)
        metric = float(run_metric(rows.detach(), targets, distractor))
        layer_losses = None
        rec.done = True
        if rec.layer_causal and backward:
            early = [objective(adapter.vocab_logits(model, h)[0], targets, distractor) for h in rec.out_last[:-1]]
            layer_losses = [float(nl.detach()) for _, nl in early] + [float(loss.detach())]
            total = sum((ob for ob, _ in early), total)
        if backward:
            total.backward()
    return rec.finish(logits.detach().to("cpu"), targets[0], float(loss.detach()), layer_losses,
                      reused=base.recording if reuse_upto else None, reuse_upto=reuse_upto, target_ids=targets,
                      distractor_id=distractor, metric=metric)
