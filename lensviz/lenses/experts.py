"""Per-expert neurons of mixture-of-experts MLPs (Mixtral, Qwen3-MoE, gpt-oss): each token's k routed
experts, their neuron activations a_{e,n}, and the sub-updates w_e * a_{e,n} * value_{e,n} (router
weight x activation x value vector), which with the experts' biases sum to the MLP output.
Activations are recomputed from `Trace.mlp_input` with the adapter's expert maths, not stored."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_index
from ..errors import LensvizError
from ..hf import module_device


def _experts(trace, layer: int):
    ad = trace.adapter
    if not ad.moe:
        raise LensvizError(f"{ad.family} has a dense MLP: use lensviz.lenses.neurons (there are no experts)")
    return ad.blocks_of(trace.lens.model)[layer].get_submodule(ad.experts)


def expert_activations(trace, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(experts [T, k] long, weights [T, k], activations [T, k, F]): for every token the k experts the
    router chose, their router weights, and each chosen expert's neuron activations a_e(x_t)."""
    layer = check_index(layer, trace.n_layers, "layer")
    module = _experts(trace, layer)
    chosen, weights = trace.router(layer)
    x = trace.mlp_input(layer)
    device = module_device(module)
    out = None
    with torch.no_grad():
        for e in chosen.unique().tolist():
            rows, slots = torch.where(chosen == e)
            a = trace.adapter.expert_activation(module, e, x[rows].to(device)).to("cpu")
            if out is None:
                out = torch.zeros(*chosen.shape, a.shape[-1], dtype=a.dtype)
            out[rows, slots] = a
    return chosen, weights, out


@dataclass(eq=False)
class ExpertParts:
    """The MoE MLP of one layer at one position t. experts [k] (long), weights [k]: the router's choice.
    activations [k, F]: a_{e,n}. values [k, F, D]: the value vectors of each chosen expert. bias [k, D] or
    None: each expert's output bias. sub_updates [k, F, D] = w_e a_{e,n} value_{e,n}. output [D]: sum of
    the sub-updates plus sum_e w_e b_e, the MLP's output (its write to the residual)."""

    layer: int
    position: int
    experts: torch.Tensor
    weights: torch.Tensor
    activations: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None
    sub_updates: torch.Tensor
    output: torch.Tensor


def expert_parts(trace, layer: int, position: int = -1) -> ExpertParts:
    """Decompose the MoE MLP output of `layer` at `position` into its experts' neurons (see `ExpertParts`)."""
    layer = check_index(layer, trace.n_layers, "layer")
    t = check_index(position, len(trace), "position")
    module = _experts(trace, layer)
    chosen, weights, acts = expert_activations(trace, layer)
    experts, w, a = chosen[t], weights[t].to(acts.dtype), acts[t]
    with torch.no_grad():
        pairs = [trace.adapter.expert_values(module, int(e)) for e in experts]
    values = torch.stack([v.detach().to("cpu", a.dtype) for v, _ in pairs])  # [k, F, D]
    bias = None if pairs[0][1] is None else torch.stack([b.detach().to("cpu", a.dtype) for _, b in pairs])
    subs = w[:, None, None] * a[:, :, None] * values
    out = subs.sum((0, 1)) + (0 if bias is None else (w[:, None] * bias).sum(0))
    return ExpertParts(layer, t, experts, w, a, values, bias, subs, out)
