"""Batched variants of one traced run: many slightly changed copies of a prompt's forward pass at once,
each judged by the run's metric (lensviz.metrics).

Every variant changes the run from some block on (a patched residual, a zeroed head); the blocks below
that block are not recomputed: they return the trace's recorded outputs (`capture.reused_prefix`), and
the unembedding reads only the explained positions. Used by the patching sweeps and the head
importance measures, which would otherwise need one full forward per cell.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Callable

import torch

from .capture import reused_prefix
from .errors import LensvizError
from .hf import args_hidden, frozen_eval, input_device, replace_hidden
from .metrics import metric

#: rows x tokens of one batched forward (bounds the activations held at once)
BATCH_TOKENS = 4096


def default_batch(n_tokens: int) -> int:
    return max(1, BATCH_TOKENS // max(1, n_tokens))


def variant_metrics(trace, n: int, first_layer: int, install: Callable, *, batch_size: int | None = None,
                    progress: Callable | None = None) -> torch.Tensor:
    """The metric [n] (float64) of n variants of `trace`'s run (an unpatched Trace).

    install(stack, rows) registers, on the ExitStack `stack`, the forward hooks that turn batch row i
    into variant rows[i] (rows: a range of variant indices); no variant may change anything before
    block `first_layer` (whose input is then the trace's recorded resid(first_layer, "pre"); first_layer
    = n_layers: the final norm reads the recorded last block output). progress(done, n) after each batch."""
    if trace.patches:
        raise LensvizError("batched variants need an unpatched trace (its recorded blocks are reused)")
    lens = trace.lens
    model, ad = lens.model, lens.adapter
    n_exp = len(trace.target_ids)
    targets, distractor = trace.target_ids, trace.distractor_id
    size = batch_size or default_batch(len(trace))
    out = torch.empty(n, dtype=torch.float64)
    ids = trace.input_ids.to(input_device(model, ad))[None]

    def explained_rows(mod, args, kwargs):  # the unembedding reads the explained positions only
        x = args_hidden(args, kwargs)
        return replace_hidden(args, kwargs, x[:, -n_exp:])

    with frozen_eval(model), torch.no_grad():
        embeds = model.get_submodule(ad.embed)(ids)
        for lo in range(0, n, size):
            rows = range(lo, min(n, lo + size))
            with ExitStack() as stack:
                stack.enter_context(reused_prefix(model, ad, trace.recording.sites["post"], first_layer))
                handle = lens.unembed_module.register_forward_pre_hook(explained_rows, with_kwargs=True)
                stack.callback(handle.remove)
                install(stack, rows)
                logits = model(inputs_embeds=embeds.expand(len(rows), -1, -1).clone(), use_cache=False).logits
            out[lo:lo + len(rows)] = metric(logits[:, -n_exp:].to(torch.float64), targets, distractor).cpu()
            if progress is not None:
                progress(lo + len(rows), n)
    return out


def pre_hook(stack: ExitStack, module, fn: Callable) -> None:
    """fn(hidden [B, T, D]) -> new hidden for `module`'s hidden-states input, until `stack` closes."""
    def hook(mod, args, kwargs):
        return replace_hidden(args, kwargs, fn(args_hidden(args, kwargs)))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    stack.callback(handle.remove)


def residual_input(lens, layer: int):
    """The module whose hidden-states input is resid(layer, "pre"): block `layer`, or the final norm
    (`Lens.final_input_module`) for layer = n_layers (the last block's output)."""
    if layer == lens.n_layers:
        return lens.final_input_module
    return lens.adapter.blocks_of(lens.model)[layer]


def o_proj_input(stack: ExitStack, lens, layer: int, fn: Callable) -> None:
    """fn(o [B, T, H, d]) -> new o, for the head outputs before W_O of `layer` (the o_proj input)."""
    h, d = lens.n_heads, lens.d_head

    def hook(mod, args):
        x = args[0]
        new = fn(x.reshape(*x.shape[:-1], h, d).clone()).reshape(x.shape)
        return (new, *args[1:])

    handle = lens.adapter.part(lens.model, layer, "o_proj").register_forward_pre_hook(hook, prepend=True)
    stack.callback(handle.remove)
