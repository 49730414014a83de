"""Per-expert neurons of mixture-of-experts MLPs (Mixtral, Qwen3-MoE, gpt-oss).

At layer l a token t is routed to k experts e with router weights w_{t,e} (recorded: `Trace.router`).
Expert e computes h = FF1_e(x_t) (its fused gate/up matrix), a_e = act(h) (its neurons) and
y_e = a_e W_down,e + b_e; the MLP output is sum_e w_{t,e} y_e. So a neuron's sub-update is
w_{t,e} * a_{e,n} * value_{e,n} (router weight x activation x value vector), and for the Backward Lens
expert e's FF2 sees the VJP w_{t,e} * delta_t (delta = dL/d MLP output) and FF1 that VJP pulled back
through the expert's activation; tokens not routed to e contribute nothing to e's gradients.
Activations are recomputed from `Trace.mlp_input` with the adapter's expert maths, not stored; every expert
parameter is read through `Lens.expert_weight`, which loads offloaded (accelerate) weights on demand.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_index
from ..errors import LensvizError
from ..hf import module_device


def require_moe(lens) -> None:
    ad = lens.adapter
    if not ad.moe:
        raise LensvizError(f"{ad.family} has a dense MLP: there are no experts (leave expert=None)")


def n_experts(lens) -> int:
    return lens.adapter.n_experts(lens.model.config)


def check_expert(lens, expert) -> int:
    """expert as a plain index into the layer's experts (LensvizError on dense families or out of range)."""
    require_moe(lens)
    if isinstance(expert, bool) or not isinstance(expert, int):
        raise LensvizError(f"expert must be an int expert index, got {expert!r}")
    return check_index(expert, n_experts(lens), "expert")


def experts_of(lens, layer: int):
    """The experts module of block `layer` (MoE families)."""
    require_moe(lens)
    layer = check_index(layer, lens.n_layers, "layer")
    return lens.adapter.blocks_of(lens.model)[layer].get_submodule(lens.adapter.experts)


def value_vectors(lens, layer: int, expert: int, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values [F, D], bias [D] or None) of one expert, detached, read through `Lens.expert_weight`
    (offloaded weights are loaded): device None, copies on CPU; a device, read-only views where the
    weights already live there (for computing with them)."""
    e = check_expert(lens, expert)
    kw = {"device": "cpu"} if device is None else {"device": device, "copy": False}
    w = lens.expert_weight(layer, e, "mlp_out", **kw)
    return lens.adapter.expert_values(w), lens.expert_weight(layer, e, "mlp_out", "bias", **kw)


def value_norms(lens, layer: int) -> torch.Tensor:
    """||value_{e,n}|| [E, F] of every expert of a layer (computed where the experts compute, on CPU)."""
    device = module_device(experts_of(lens, layer))
    return torch.stack([value_vectors(lens, layer, e, device)[0].norm(dim=-1) for e in range(n_experts(lens))]).to("cpu")


def expert_keys(lens, layer: int, expert: int) -> torch.Tensor:
    """Expert e's FF1 as key vectors [F1, D] (F1 = 2F: its fused gate/up outputs, in the adapter's order),
    detached on CPU: h = x @ keys.T (+ bias)."""
    e = check_expert(lens, expert)
    ad = lens.adapter
    return ad.as_in_out(lens.expert_weight(layer, e, "mlp_in"), ad.expert_layout).T


def expert_ff1(lens, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
    """h [n, F1]: expert e's fused gate/up outputs for inputs x [n, D], computed where x is."""
    e = check_expert(lens, expert)
    w = lens.expert_weight(layer, e, "mlp_in", device=x.device, copy=False)
    return lens.adapter.expert_ff1(w, lens.expert_weight(layer, e, "mlp_in", "bias", device=x.device, copy=False), x)


def expert_activation(lens, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
    """a_e(x) [n, F]: expert e's neuron activations (the input of its FF2) for inputs x [n, D], computed
    where x is (weights through `Lens.expert_weight`, the activation from the adapter's `expert_act`)."""
    return lens.adapter.expert_act(experts_of(lens, layer), expert_ff1(lens, layer, expert, x))


def routing_weight(trace, layer: int, expert: int) -> torch.Tensor:
    """w [T]: the router weight of `expert` at every position (0 where the token was not routed to it)."""
    e = check_expert(trace.lens, expert)
    chosen, weights = trace.router(layer)
    return torch.where(chosen == e, weights, torch.zeros_like(weights)).sum(-1)


@dataclass(eq=False)
class ExpertFactors:
    """One expert of one layer over the positions routed to it (rows [n] long, ascending).

    x [n, D]: its input (mlp_input); h [n, F1]: FF1 outputs; a [n, F]: neuron activations; weight [n]:
    router weights. With gradients: delta_ff2 [n, D] = weight * dL/d(MLP output) (the VJP at the expert's
    FF2 output) and delta_ff1 [n, F1] = dL/dh (delta_ff2 pulled back through FF2 and the activation)."""

    layer: int
    expert: int
    rows: torch.Tensor
    x: torch.Tensor
    h: torch.Tensor
    a: torch.Tensor
    weight: torch.Tensor
    delta_ff2: torch.Tensor | None = None
    delta_ff1: torch.Tensor | None = None


def expert_factors(trace, layer: int, expert: int, *, grads: bool = False) -> ExpertFactors:
    """The forward (and with grads=True backward) factors of one expert at the positions routed to it."""
    layer = check_index(layer, trace.n_layers, "layer")
    lens, ad = trace.lens, trace.adapter
    e = check_expert(lens, expert)
    module = experts_of(lens, layer)
    w_all = routing_weight(trace, layer, e)
    rows = torch.nonzero(trace.router(layer)[0].eq(e).any(-1)).reshape(-1)
    device = module_device(module)
    x = trace.mlp_input(layer)[rows].to(device)
    weight = w_all[rows].to(device, x.dtype)
    with torch.no_grad():
        h = expert_ff1(lens, layer, e, x)
        a = ad.expert_act(module, h)
    out = ExpertFactors(layer, e, rows, x.to("cpu"), h.to("cpu"), a.to("cpu"), weight.to("cpu"))
    if not grads:
        return out
    if not trace.has_backward:
        raise LensvizError("the Backward Lens needs gradients: this trace was run with backward=False")
    delta = trace.mlp_output_grad(layer)[rows].to(device, x.dtype) * weight[:, None]  # [n, D]
    values, _ = value_vectors(lens, layer, e, device)
    with torch.no_grad():
        d_a = delta @ values.T.to(x.dtype)  # dL/da [n, F]
        _, vjp = torch.func.vjp(lambda hh: ad.expert_act(module, hh), h)
        d_h = vjp(d_a)[0]
    out.delta_ff2, out.delta_ff1 = delta.to("cpu"), d_h.to("cpu")
    return out


def expert_activations(trace, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(experts [T, k] long, weights [T, k], activations [T, k, F]): for every token the k experts the
    router chose, their router weights, and each chosen expert's neuron activations a_e(x_t)."""
    layer = check_index(layer, trace.n_layers, "layer")
    module = experts_of(trace.lens, layer)
    chosen, weights = trace.router(layer)
    x = trace.mlp_input(layer)
    device = module_device(module)
    out = None
    with torch.no_grad():
        for e in chosen.unique().tolist():
            rows, slots = torch.where(chosen == e)
            a = expert_activation(trace.lens, layer, e, x[rows].to(device)).to("cpu")
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
    chosen, weights, acts = expert_activations(trace, layer)
    experts, w, a = chosen[t], weights[t].to(acts.dtype), acts[t]
    pairs = [value_vectors(trace.lens, layer, int(e)) for e in experts]
    values = torch.stack([v.to(a.dtype) for v, _ in pairs])  # [k, F, D]
    bias = None if pairs[0][1] is None else torch.stack([b.to(a.dtype) for _, b in pairs])
    subs = w[:, None, None] * a[:, :, None] * values
    out = subs.sum((0, 1)) + (0 if bias is None else (w[:, None] * bias).sum(0))
    return ExpertParts(layer, t, experts, w, a, values, bias, subs, out)


def mlp_output(trace, layer: int) -> torch.Tensor:
    """The MoE MLP output rebuilt from its experts, sum_e w_{t,e} (a_e(x_t) W_down,e + b_e): [T, D]."""
    chosen, weights, acts = expert_activations(trace, layer)
    out = torch.zeros(len(trace), trace.lens.d_model, dtype=acts.dtype)
    for e in chosen.unique().tolist():
        values, bias = value_vectors(trace.lens, layer, e)
        rows, slots = torch.where(chosen == e)
        y = acts[rows, slots] @ values.to(acts.dtype) + (0 if bias is None else bias.to(acts.dtype))
        out.index_add_(0, rows, weights[rows, slots, None].to(acts.dtype) * y)
    return out
