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
from .errors import LensvizError

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


@dataclass
class AttentionEdit:
    """Edits of one layer's attention, applied on the explicit (eager) path.

    scores: fns (scores [B, H, q, T], rows: slice) -> scores, on scaled, masked scores before the softmax.
    probs:  fns (probs [B, H, q, T], rows: slice) -> probs, after the softmax.
    `rows` says which query positions the chunk holds.
    """

    scores: list = field(default_factory=list)
    probs: list = field(default_factory=list)
    keep: list = field(default_factory=list)  # fns (scores [B, H, q, T]) -> bool [B, H, q, T], True = key kept:
    # a key selection computed without grad from the scaled, masked scores; alone it runs as a boolean
    # mask of the fused attention kernel (top-k attention), else before the score edits
    outputs: list = field(default_factory=list)  # fns (out [B, H, T, d]) -> out, on every path
    added: list = field(default_factory=list)  # maps P [H, T, T] added to the probabilities (A + P):
    # applied as out += P @ V, so the fused attention kernel still computes A @ V

    @property
    def explicit(self) -> bool:
        return bool(self.scores or self.probs)


QUERY_CHUNK_BYTES = 256 * 2**20  # explicit path: largest score block held at once


def explicit_attention(query, key, value, mask, scaling, edit: AttentionEdit | None = None,
                       chunk: int | None = None) -> torch.Tensor:
    """Eager attention over query chunks with optional score / probability edits.
    query [B, H, T, d], key/value [B, H_kv, S, d] -> [B, H, T, d]."""
    n_rep = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    t_q, t_k = query.shape[2], key.shape[2]
    allowed = causal_allowed(mask, t_q, t_k, query.device)
    if chunk is None:
        per_row = query.shape[0] * query.shape[1] * t_k * query.element_size()
        chunk = max(1, QUERY_CHUNK_BYTES // per_row)
    outs = []
    for start in range(0, t_q, chunk):
        rows = slice(start, min(t_q, start + chunk))
        scores = torch.matmul(query[:, :, rows], k.transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~allowed[rows], float("-inf"))
        if edit is not None and edit.keep:
            scores = scores.masked_fill(~kept_keys(scores.detach(), edit.keep), float("-inf"))
        for fn in (edit.scores if edit else ()):
            scores = fn(scores, rows)
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        for fn in (edit.probs if edit else ()):
            probs = fn(probs, rows)
        for p in (edit.added if edit else ()):
            probs = probs + p[:, rows].to(device=probs.device, dtype=probs.dtype)
        outs.append(torch.matmul(probs, v))
    return torch.cat(outs, dim=2)


def kept_keys(scores: torch.Tensor, fns) -> torch.Tensor:
    """The keys every selection in `fns` keeps: bool like `scores` [B, H, q, T] (scaled and masked)."""
    with torch.no_grad():
        keep = fns[0](scores)
        for fn in fns[1:]:
            keep = keep & fn(scores)
    return keep


def keep_mask(query, key, mask, scaling, fns, chunk: int | None = None) -> torch.Tensor:
    """Boolean attention mask [B, H, T_q, T_k] (True = attend) of the keys that are allowed by `mask`
    and kept by the selections `fns`, computed without grad over query chunks."""
    k = repeat_kv(key, query.shape[1] // key.shape[1])
    t_q, t_k = query.shape[2], key.shape[2]
    allowed = causal_allowed(mask, t_q, t_k, query.device)
    if chunk is None:
        chunk = max(1, QUERY_CHUNK_BYTES // (query.shape[0] * query.shape[1] * t_k * query.element_size()))
    parts = []
    with torch.no_grad():
        for start in range(0, t_q, chunk):
            rows = slice(start, min(t_q, start + chunk))
            scores = torch.matmul(query[:, :, rows], k.transpose(-1, -2)) * scaling
            scores = scores.masked_fill_(~allowed[rows], float("-inf"))
            parts.append(kept_keys(scores, fns) & allowed[rows])
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


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
    if edit is None or not edit.explicit:
        n_rep = query.shape[1] // key.shape[1]
        k, v = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
        is_causal = attention_mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True)
        attn_mask = attention_mask
        if edit is not None and edit.keep:  # e.g. top-k: the kept keys as a boolean mask of the fused kernel
            attn_mask, is_causal = keep_mask(query, key, attention_mask, scaling, edit.keep), False
        out = F.scaled_dot_product_attention(
            query, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling
        )
        for p in (edit.added if edit is not None else ()):
            if p.shape[-1] != v.shape[-2] or p.shape[-2] != query.shape[-2]:
                raise LensvizError(f"an attention map of {p.shape[-1]} x {p.shape[-1]} does not fit this call "
                                   f"({query.shape[-2]} queries, {v.shape[-2]} keys): maps fit one prompt length")
            out = out + torch.matmul(p.to(device=v.device, dtype=v.dtype), v)
    else:
        out = explicit_attention(query, key, value, attention_mask, scaling, edit)
    for fn in (edit.outputs if edit is not None else ()):
        out = fn(out)
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
    attn_edits: dict = field(default_factory=dict)  # layer -> AttentionEdit
    layer_causal: bool = False
    prompt_mask: object = None  # lens.patched + SegmentMask: patches.segments.PromptMask, the prefill mask

    def edit(self, layer: int) -> AttentionEdit:
        """The (created on first use) attention edit of a layer, for patches to add to."""
        return self.attn_edits.setdefault(layer, AttentionEdit())

    def __post_init__(self):
        n = self.n_layers
        for name in ("pre", "mid", "q", "k", "v", "o", "a", "scaling", "mask", "g_pre", "g_mid", "g_o"):
            setattr(self, name, [None] * n)
        self.g_post_lc = [None] * n  # layer-causal: dL_l/d post_l (differs from the next block's input grad)
        self.out_last = [None] * n  # layer-causal: graph-connected block outputs at the last position
        self.final = None
        self.g_final = None
        self.done = False

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
        """Record a block's input; in layer-causal mode return its detached copy for the block to use."""
        if not (self.layer_causal and self.want_grads):
            self._track(x, self.pre, layer, self.g_pre)
            return None
        if layer > 0 and x.requires_grad:
            x.register_hook(self._store(self.g_post_lc, layer - 1))
        leaf = x.detach().requires_grad_(True)
        self._track(leaf, self.pre, layer, self.g_pre)
        return leaf

    def on_block_output(self, layer, out):
        if self.layer_causal and self.want_grads and layer < self.n_layers - 1:
            self.out_last[layer] = out[:, -1]

    def on_mid(self, layer, x):
        self._track(x, self.mid, layer, self.g_mid)

    def on_attn_output(self, layer, out):  # parallel residual: mid = pre + attention output
        self.mid[layer] = self.pre[layer] + out[0].detach()

    def on_mlp_activation(self, layer, a):
        self.a[layer] = a[0].detach()

    def on_final(self, x):
        if self.done:  # the run's own forward is over (layer-causal losses reuse the final norm)
            return
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
        if self.layer_causal:
            lists["g_post"] = [cpu(t) for t in self.g_post_lc[:-1]] + [g_final]
        else:
            lists["g_post"] = lists["g_pre"][1:] + [g_final]
        if self.parallel:  # mid is not a tensor of the graph: its gradient is the block output's
            lists["g_mid"] = list(lists["g_post"])
        lists["scaling"] = list(self.scaling)
        return lists


def _args_hidden(args, kwargs):
    if args:
        return args[0]
    return kwargs.get("hidden_states")


def _replace_hidden(args, kwargs, new):
    """(args, kwargs) of a block call with its hidden-states input replaced by `new`."""
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


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
                new = rec.on_block_input(layer, _args_hidden(args, kwargs))
                return None if new is None else _replace_hidden(args, kwargs, new)

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


@dataclass
class PatchContext:
    """What a patch sees while it installs itself into one run (see lensviz/patches/).

    Hooks registered through `pre_hook` / `forward_hook` run before lensviz's recording hooks and are
    removed when the run ends, also if it raises."""

    model: object
    adapter: Adapter
    dims: Dims
    rec: Recorder
    stack: ExitStack
    input_ids: torch.Tensor
    segments: list
    target_id: int | None
    base: object = None  # an unpatched Trace of the same prompt and target, when the run has one
    lens: object = None
    model_kwargs: dict = field(default_factory=dict)
    own_calls: bool = False  # True in lens.patched: the caller makes the model calls (forward, generate, ...)

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
        stay causal); cached one-token decoding steps keep the causal mask over the whole cache
        (methods-2 §4.4). See `patches.segments.PromptMask`."""
        if not self.own_calls:
            device = self.input_ids.device if self.lens is None else self.lens.unembed_device
            self.model_kwargs["attention_mask"] = allowed[None, None].to(device)
            return
        if self.rec.prompt_mask is not None:
            raise LensvizError("lens.patched takes one SegmentMask at a time")
        n = len(self.input_ids)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        from .patches.segments import PromptMask

        pm = PromptMask(self.input_ids.detach().to("cpu"), allowed.to("cpu") & ~causal)
        self.rec.prompt_mask = pm
        path = self.adapter.blocks.rpartition(".")[0]
        backbone = self.model.get_submodule(path)  # "" -> the model itself
        self.pre_hook(backbone, pm.before_call, with_kwargs=True)
        self.forward_hook(backbone, pm.after_call)

    def replace_block_input(self, layer: int, fn) -> None:
        """fn(hidden [B, T, D]) -> new hidden, for block `layer`'s input."""
        def hook(mod, args, kwargs):
            return _replace_hidden(args, kwargs, fn(_args_hidden(args, kwargs)))

        self.pre_hook(self.block(layer), hook, with_kwargs=True)


@contextmanager
def reused_prefix(model, adapter: Adapter, base_post: list, upto: int, device_of):
    """Blocks 0..upto-1 return their recorded outputs instead of computing (forward-only re-runs that
    change nothing before block `upto`). Restores each block's own `forward` on exit."""
    blocks = adapter.blocks_of(model)
    saved = []
    try:
        for layer in range(upto):
            block = blocks[layer]
            saved.append((block, "forward" in block.__dict__, block.__dict__.get("forward")))
            out = base_post[layer]

            def cached(*args, out=out, **kwargs):
                x = _args_hidden(args, kwargs)
                return out.to(device=x.device, dtype=x.dtype).unsqueeze(0)

            block.forward = cached
        yield
    finally:
        for block, had, fwd in saved:
            if had:
                block.forward = fwd
            else:
                del block.forward


@contextmanager
def patched(model, adapter: Adapter, dims: Dims, patches, *, base=None, lens=None):
    """Install `patches` (and lensviz's attention function) for any model call made inside, e.g.
    `model.generate`; everything is removed on exit. Nothing is recorded for the caller.
    `base` (a Trace) gives patches the prompt they refer to: SegmentMask masks the prefill over its
    ids (and its segments when its prompt was a list), see `patches.segments.PromptMask`."""
    rec = Recorder(dims.n_layers, adapter.is_parallel(model.config), False)
    ids = base.input_ids if base is not None else torch.zeros(0, dtype=torch.long)
    segments = base.segments if base is not None and isinstance(base.prompt, (list, tuple)) else None
    with ExitStack() as stack:
        stack.enter_context(installed(model, adapter, rec))
        ctx = PatchContext(model, adapter, dims, rec, stack, ids, segments, None if base is None else base.target_id,
                           base, lens, own_calls=True)
        for patch in patches:
            patch.install(ctx)
        if ctx.model_kwargs:
            raise LensvizError("this patch changes the model's inputs and works only inside "
                               "lens.trace(..., patches=...)")
        yield


def run(model, adapter: Adapter, dims: Dims, input_ids: torch.Tensor, resolve_target: Callable,
        *, backward: bool = True, gradient: str = "standard", patches=(), segments=None,
        fixed_target: int | None = None, base=None, reuse_upto: int = 0, lens=None) -> dict:
    """One forward (and backward) pass on `input_ids` [T], with `patches` installed for this run only.

    `resolve_target(last_logits [V]) -> int` picks the explained token once the logits exist.
    gradient="layer_causal": each block's input is detached and its gradient comes from its own
    logit-lens loss at the last position (research/methods-2.md §6).
    `base` (an unpatched Trace of the same ids) with `reuse_upto` > 0 and backward=False: blocks before
    `reuse_upto` are not recomputed; their records are copied from `base`.
    Returns the recorded tensors (see `Recorder.finish`) plus `logits` [T, V], `target_id`, `loss`,
    and `layer_losses` in layer-causal mode.
    """
    rec = Recorder(dims.n_layers, adapter.is_parallel(model.config), backward)
    rec.layer_causal = gradient == "layer_causal"
    ids = input_ids.to(input_device(model, adapter)).unsqueeze(0)
    reuse_upto = reuse_upto if (base is not None and not backward) else 0
    with ExitStack() as stack:
        stack.enter_context(frozen_eval(model))
        stack.enter_context(installed(model, adapter, rec))
        ctx = PatchContext(model, adapter, dims, rec, stack, input_ids, segments, fixed_target, base, lens)
        for patch in patches:
            patch.install(ctx)
        if reuse_upto:
            stack.enter_context(reused_prefix(model, adapter, base._data["post"], reuse_upto, None))
        stack.enter_context(torch.set_grad_enabled(backward))
        embeds = model.get_submodule(adapter.embed)(ids)
        if backward:
            embeds = embeds.detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, use_cache=False, **ctx.model_kwargs)
        logits = out.logits[0]
        last = logits[-1]
        target_id = int(resolve_target(last.detach()))
        loss = _nll(last, target_id)
        layer_losses = None
        total = loss
        rec.done = True
        if rec.layer_causal and backward:
            norm, unembed = model.get_submodule(adapter.final_norm), model.get_submodule(adapter.unembed)
            early = [_nll(unembed(norm(h))[0], target_id) for h in rec.out_last[:-1]]
            layer_losses = [float(x.detach()) for x in early] + [float(loss.detach())]
            total = sum(early, loss)
        if backward:
            total.backward()
    data = rec.finish()
    if reuse_upto:
        for name in ("pre", "mid", "q", "k", "v", "o", "a", "mask", "scaling"):
            for layer in range(reuse_upto):
                data[name][layer] = base._data[name][layer]
    data["logits"] = logits.detach().to("cpu")
    data["target_id"] = target_id
    data["loss"] = float(loss.detach())
    data["layer_losses"] = layer_losses
    data["attn_edits"] = dict(rec.attn_edits)
    return data


def _nll(last_logits: torch.Tensor, target_id: int) -> torch.Tensor:
    x = last_logits.float() if last_logits.dtype in (torch.float16, torch.bfloat16) else last_logits
    if x.dim() == 2:
        x = x[-1] if x.shape[0] > 1 else x[0]
    return -torch.log_softmax(x, dim=-1)[target_id]
