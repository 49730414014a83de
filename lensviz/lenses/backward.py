"""Backward Lens (Katz, Belinkov, Geva & Wolf, EMNLP 2024, "Backward Lens: Projecting Language Model
Gradients into the Vocabulary Space"): vocabulary projections of the low-rank factors of the MLP weight
gradients (dL/dW = sum_i delta_i x_i^T over positions i: FF1 forward inputs x, FF2 VJPs delta), the
gradients rebuilt from those factors, and the "imprint" (FF1) / "shift" (FF2) readouts of one SGD step.

Mixture-of-experts MLPs (Mixtral, Qwen3-MoE, gpt-oss) take `expert=e`: expert e's FF2 VJP at position t
is w_{t,e} delta_t (its router weight times dL/d MLP output), zero at positions not routed to e, and its
FF1 VJP that pulled back through the expert's own activation (lensviz.lenses.experts); its matrices are
"mlp_in" (the fused gate/up slice gate_up_proj[e]) and "mlp_out" (down_proj[e]).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_index, check_index_list, check_int, check_layer_list
from ..errors import LensvizError
from ..hf import module_device
from ..vocab import TopK
from . import experts as ex

FF1_PARTS = ("mlp_in", "mlp_gate")
FF_PARTS = FF1_PARTS + ("mlp_out",)


# helpers -----------------------------------------------------------------------------------------
def _need_backward(trace) -> None:
    if not trace.has_backward:
        raise LensvizError("the Backward Lens needs gradients: this trace was run with backward=False")


def resolve_normalize(trace, normalize) -> bool:
    """`normalize=None` -> True on LayerNorm models (LN(c v) != c LN(v) once eps and the bias count, so
    gradient rankings depend on |v|), False on RMSNorm models (scale-invariant and odd)."""
    if normalize is None:
        return trace.adapter.norm == "layernorm"
    if not isinstance(normalize, bool):
        raise LensvizError(f"normalize must be None (auto), True or False, got {normalize!r}")
    return normalize


def _check_sign(sign) -> int:
    if isinstance(sign, bool) or sign not in (1, -1):
        raise LensvizError(f"sign must be 1 (project delta) or -1 (project -delta), got {sign!r}")
    return int(sign)


# (a) the projection tables -----------------------------------------------------------------------
@dataclass(eq=False)
class ProjectionGrid:
    """One Backward Lens table over [L, T] cells (L = len(layers)).

    top, bottom: TopK with ids/probs [L, T, k] (bottom: least probable first); target_rank [L, T]
    (rank of the trace's target in the projection, 0 = most probable); norm [L, T]: the Euclidean norm
    of the projected vector before any normalisation (|x| for FF1, |delta| for FF2)."""

    top: TopK
    bottom: TopK
    target_rank: torch.Tensor
    norm: torch.Tensor


@dataclass(eq=False)
class BackwardLensTable:
    """Result of `backward_lens`: the FF1 table (projections of the FF1 inputs x) and the FF2 table
    (projections of sign * delta, delta = dL/d(MLP output)), both over `layers` x prompt tokens.

    Cell colour in the paper is |delta_FF2| in both tables: `delta_norm` [L, T] (= ff2.norm)."""

    layers: list[int]
    tokens: list[str]
    target_id: int
    target: str
    k: int
    normalize: bool
    sign: int
    vocab_size: int
    ff1: ProjectionGrid
    ff2: ProjectionGrid
    expert: int | None = None  # MoE: the expert whose tables these are
    routed: torch.Tensor | None = None  # MoE with expert: [L, T] bool, the cells routed to it

    @property
    def delta_norm(self) -> torch.Tensor:
        return self.ff2.norm

    def __repr__(self) -> str:
        return (f"BackwardLensTable(layers={len(self.layers)}, T={len(self.tokens)}, k={self.k}, "
                f"target={self.target!r}, normalize={self.normalize}, sign={self.sign})")


def _grid(lens, vectors: torch.Tensor, k: int, target_id: int, normalize: bool) -> ProjectionGrid:
    top = lens.project(vectors, k, target=target_id, normalize=normalize)
    bottom = lens.project(vectors, k, normalize=normalize, bottom=True)
    return ProjectionGrid(top=top, bottom=bottom, target_rank=top.target_rank, norm=vectors.norm(dim=-1))


def backward_lens(trace, k: int = 5, *, layers=None, normalize: bool | None = None, sign: int = 1,
                  expert: int | None = None) -> BackwardLensTable:
    """The Backward Lens tables of a trace (the paper's FF1 / FF2 projection tables).

    FF1: proj(x_i), x = `trace.mlp_input(l)` [T, D] (the input of FF1, the D-side factor of dL/dW_FF1).
    FF2: proj(sign * delta_i), delta = `trace.mlp_output_grad(l)` [T, D] (the D-side factor of dL/dW_FF2).
    Each table projects all L x T vectors in one batched `lens.project` call (plus one for the bottom-k).

    k: tokens per cell. layers: None (all) or a list of layer indices (negative allowed); rows follow it.
    normalize: project delta/|delta| instead of delta; None = auto (True for LayerNorm models, False for
    RMSNorm). It applies to the gradient table (FF2) only: the FF1 inputs are forward activations and are
    projected as they are, like the logit lens. sign: 1 projects delta, -1 projects -delta (on LayerNorm
    models bottom-k of proj(delta) differs from top-k of proj(-delta); on RMSNorm they coincide).
    Target ranks are for the trace's target. Returns `BackwardLensTable` with [L, T, k] ids/probs and
    [L, T] target ranks and norms per table.
    expert (MoE only): expert e's tables: FF1 projects x_t and FF2 sign * w_{t,e} delta_t at the positions
    routed to e; both vectors are 0 elsewhere (`routed` [L, T] marks the routed cells). Without expert, a
    MoE model's tables are the whole MLP block's (its input, and dL/d of its output).
    """
    _need_backward(trace)
    sign = _check_sign(sign)
    normalize = resolve_normalize(trace, normalize)
    rows = check_layer_list(layers, trace.n_layers, sort=False)  # rows follow the given order
    lens = trace.lens
    x = torch.stack([trace.mlp_input(layer) for layer in rows])  # [L, T, D]
    delta = torch.stack([trace.mlp_output_grad(layer) for layer in rows])  # [L, T, D]
    routed = None
    if expert is not None:
        e = ex.check_expert(lens, expert)
        w = torch.stack([ex.routing_weight(trace, layer, e) for layer in rows]).to(x.dtype)  # [L, T]
        routed = w != 0
        x, delta = x * routed[..., None], delta * w[..., None]
    ff1 = _grid(lens, x, k, trace.target_id, normalize=False)
    ff2 = _grid(lens, sign * delta, k, trace.target_id, normalize=normalize)
    return BackwardLensTable(layers=rows, tokens=list(trace.tokens), target_id=trace.target_id, target=trace.target,
                             k=k, normalize=normalize, sign=sign, vocab_size=lens.vocab_size, ff1=ff1, ff2=ff2,
                             expert=expert, routed=routed)


# (b) weight gradients from the low-rank factors ----------------------------------------------------
def _check_part(trace, part: str, allowed=FF_PARTS, expert=None) -> str:
    if expert is not None:
        ex.check_expert(trace.lens, expert)
        present = tuple(p for p in allowed if p in ("mlp_in", "mlp_out"))
        if part not in present:
            raise LensvizError(f"an expert's matrices are {present} ('mlp_in' is its fused gate/up), got {part!r}")
        return part
    trace.adapter.require_dense_mlp("the Backward Lens without expert=")
    present = tuple(p for p in allowed if getattr(trace.adapter, p) is not None)
    if part not in present:
        raise LensvizError(f"part must be one of {present} for {trace.lens.arch}, got {part!r}")
    return part


def ff1_output_grads(trace, layer: int, *, expert: int | None = None) -> dict[str, torch.Tensor]:
    """delta_FF1 = dL/d(FF1 output) [T, F] for each FF1 matrix of the layer ("mlp_in", and "mlp_gate" on
    gated MLPs), keyed by part name.

    The trace records delta only at the MLP output (delta_FF2). delta_FF1 is its vector-Jacobian product
    back through the MLP's nonlinearity: the layer's own MLP module is run on x = mlp_input(layer) as a
    function of its FF1 outputs (forward hooks substitute them), and `torch.func.vjp` of that function at
    the recorded FF1 outputs is applied to delta_FF2. No activation formula is written here, so GELU,
    SwiGLU (a = act(gate(x)) * up(x)) and any other MLP body come out exact.
    expert (MoE): {"mlp_in": dL/dh [T, F1]} of expert e's fused gate/up outputs h (0 at positions not
    routed to e), the VJP of the adapter's expert activation applied to w_{t,e} delta_t W_down,e^T."""
    _need_backward(trace)
    layer = check_index(layer, trace.n_layers, "layer")
    if expert is not None:
        f = ex.expert_factors(trace, layer, expert, grads=True)
        full = torch.zeros(len(trace), f.delta_ff1.shape[-1], dtype=f.delta_ff1.dtype)
        return {"mlp_in": full.index_copy(0, f.rows, f.delta_ff1)}
    trace.adapter.require_dense_mlp("ff1_output_grads without expert=")
    lens, adapter = trace.lens, trace.adapter
    block = adapter.blocks_of(lens.model)[layer]
    mlp = adapter.mlp_module(block)
    parts = [p for p in FF1_PARTS if getattr(adapter, p) is not None]
    modules = [block.get_submodule(getattr(adapter, p)) for p in parts]
    device = module_device(modules[0])
    x = trace.mlp_input(layer).to(device)[None]  # [1, T, D]
    delta = trace.mlp_output_grad(layer).to(device)[None]

    recorded: dict[int, torch.Tensor] = {}
    subst: dict[int, torch.Tensor] = {}

    def hook_for(j):
        def hook(module, args, output):
            if j in subst:
                return subst[j]  # replaces the FF1 output by the function's argument
            recorded[j] = output.detach()
            return None
        return hook

    handles = [m.register_forward_hook(hook_for(j)) for j, m in enumerate(modules)]
    try:
        with torch.no_grad():
            mlp(x)
        primals = tuple(recorded[j] for j in range(len(modules)))

        def mlp_of_ff1(*hs):
            subst.update(enumerate(hs))
            return mlp(x)

        out, vjp_fn = torch.func.vjp(mlp_of_ff1, *primals)
        grads = vjp_fn(delta.to(out.dtype))
    finally:
        for h in handles:
            h.remove()
    return {p: g[0].detach().to("cpu") for p, g in zip(parts, grads)}


@dataclass(eq=False)
class WeightGradient:
    """dL/dW of one MLP matrix rebuilt from its factors: dL/dW = sum_i delta_i x_i^T over positions i.

    inputs [T, in]: the forward inputs x_i of the matrix (FF1: mlp_input; FF2: activations a).
    vjps [T, out]: delta_i = dL/d(matrix output)_i. weight: dL/dW in the module's own layout
    ([out, in] for nn.Linear, [in, out] for Conv1D). bias: sum_i delta_i [out], or None where the
    module has no bias. rank(weight) <= number of positions with delta_i != 0."""

    layer: int
    part: str
    inputs: torch.Tensor
    vjps: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    expert: int | None = None  # MoE: the expert (inputs and vjps are 0 at positions not routed to it)

    def __repr__(self) -> str:
        e = "" if self.expert is None else f", expert={self.expert}"
        return f"WeightGradient(layer={self.layer}, part={self.part!r}{e}, weight={tuple(self.weight.shape)})"


def weight_gradient(trace, layer: int, part: str, *, expert: int | None = None) -> WeightGradient:
    """dL/dW (and dL/db) of an MLP matrix from the trace, without autograd on the parameters.

    part: "mlp_out" (FF2; factors a = mlp_activations, delta_FF2 = mlp_output_grad), "mlp_in" or
    "mlp_gate" (FF1; factors x = mlp_input, delta_FF1 from `ff1_output_grads`). The weight gradient is
    returned in the module's layout (adapter.weight_layout).

    expert (MoE): expert e's matrix, "mlp_in" (the fused gate/up slice: factors x and dL/dh) or "mlp_out"
    (down: factors a_e and w_{t,e} delta_t), in the layout of the parameter slice (adapter.expert_layout),
    so `weight` is comparable with e.g. `experts.down_proj.grad[e]`; rows of positions not routed to e are 0."""
    _need_backward(trace)
    layer = check_index(layer, trace.n_layers, "layer")
    part = _check_part(trace, part, expert=expert)
    if expert is not None:
        return _expert_weight_gradient(trace, layer, part, expert)
    if part == "mlp_out":
        x, delta = trace.mlp_activations(layer), trace.mlp_output_grad(layer)
    else:
        x, delta = trace.mlp_input(layer), ff1_output_grads(trace, layer)[part]
    grad_in_out = x.T @ delta  # [in, out] = sum_i x_i delta_i^T
    weight = grad_in_out if trace.adapter.weight_layout == "conv1d" else grad_in_out.T.contiguous()
    module = trace.adapter.part(trace.lens.model, layer, part)
    if tuple(weight.shape) != tuple(module.weight.shape):
        raise LensvizError(f"{part} of layer {layer}: rebuilt gradient has shape {tuple(weight.shape)} but the "
                           f"weight is {tuple(module.weight.shape)}; the adapter's weight_layout is wrong")
    bias = delta.sum(0) if getattr(module, "bias", None) is not None else None
    return WeightGradient(layer=layer, part=part, inputs=x, vjps=delta, weight=weight, bias=bias)


def _expert_weight_gradient(trace, layer: int, part: str, expert: int) -> WeightGradient:
    f = ex.expert_factors(trace, layer, expert, grads=True)
    x, delta = (f.a, f.delta_ff2) if part == "mlp_out" else (f.x, f.delta_ff1)
    grad_in_out = x.T @ delta  # [in, out]
    ad = trace.adapter
    weight = grad_in_out if ad.expert_layout == "conv1d" else grad_in_out.T.contiguous()
    w = trace.lens.expert_weight(layer, f.expert, part)
    b = trace.lens.expert_weight(layer, f.expert, part, "bias")
    if tuple(weight.shape) != tuple(w.shape):
        raise LensvizError(f"expert {f.expert} {part} of layer {layer}: rebuilt gradient has shape "
                           f"{tuple(weight.shape)} but the weight is {tuple(w.shape)}; the adapter's expert_layout is wrong")
    n = len(trace)
    inputs = torch.zeros(n, x.shape[-1], dtype=x.dtype).index_copy(0, f.rows, x)
    vjps = torch.zeros(n, delta.shape[-1], dtype=delta.dtype).index_copy(0, f.rows, delta)
    return WeightGradient(layer=layer, part=part, inputs=inputs, vjps=vjps, weight=weight,
                          bias=None if b is None else delta.sum(0), expert=f.expert)


# (c) imprint and shift ---------------------------------------------------------------------------
def shift_tokens(trace, layer: int, position: int = -1, k: int = 10, *, normalize: bool | None = None,
                 expert: int | None = None) -> TopK:
    """The tokens an SGD step writes through FF2 at one position (the paper's "shift"): each active
    neuron's value moves along -delta_i, so this is the top-k of proj(-delta_i), delta = mlp_output_grad.

    On RMSNorm models this is exactly the bottom-k of proj(delta) (the authors' readout; RMSNorm is odd).
    On LayerNorm models the two differ (LN(-v) != -LN(v)); this function follows the written vector -delta,
    and `backward_lens(...).ff2.bottom` gives the bottom-k of proj(delta). normalize: as in `backward_lens`.
    Returns TopK with ids/probs [k] and target_rank [] (0 = the target is the token written most).
    expert (MoE): expert e's FF2 VJP w_{t,e} delta_t; LensvizError if the position was not routed to e."""
    _need_backward(trace)
    layer = check_index(layer, trace.n_layers, "layer")
    position = check_index(position, len(trace), "position")
    delta = trace.mlp_output_grad(layer)[position]
    if expert is not None:
        w = ex.routing_weight(trace, layer, expert)[position]
        if w == 0:
            raise LensvizError(f"position {position} of layer {layer} was not routed to expert {expert}")
        delta = delta * w.to(delta.dtype)
    return trace.lens.project(-delta, k, target=trace.target_id, normalize=resolve_normalize(trace, normalize))


@dataclass(eq=False)
class Imprint:
    """FF1 "imprint" of one SGD step (the paper's "imprint"): neuron n's key moves along
    u_n = -sum_i delta_FF1_i[n] x_i, a mix of the layer's forward inputs weighted by the neuron's VJPs.

    neurons [N]; weights [N, T] = -delta_FF1[:, n] (the coefficient of x_i in u_n); update_norm [N] = |u_n|;
    tokens: TopK of proj(u_n) with ids/probs [N, k] and target_rank [N]."""

    layer: int
    part: str
    neurons: torch.Tensor
    weights: torch.Tensor
    update_norm: torch.Tensor
    tokens: TopK
    normalize: bool
    expert: int | None = None



def imprint_tokens(trace, layer: int, k: int = 10, *, neurons=None, top: int = 5, part: str = "mlp_in",
                   normalize: bool | None = None, expert: int | None = None) -> Imprint:
    """The FF1 imprint readout: project each selected neuron's key update u_n = -sum_i delta_FF1_i[n] x_i
    (minus the gradient's key for neuron n: Linear row n / Conv1D column n of dL/dW_FF1).

    neurons: list of neuron indices, or None for the `top` neurons whose keys move most (largest |u_n|).
    part: "mlp_in" or (gated MLPs) "mlp_gate". normalize: as in `backward_lens` (u_n has gradient scale).
    expert (MoE): expert e's keys, part "mlp_in" (the rows of its fused gate/up: neurons index [0, F1))."""
    part = _check_part(trace, part, FF1_PARTS, expert=expert)
    grad = weight_gradient(trace, layer, part, expert=expert)
    u = -(grad.vjps.T @ grad.inputs)  # [F, D]: row n = -sum_i delta_i[n] x_i
    norms = u.norm(dim=-1)
    if neurons is None:
        check_int(top, "top", 1, u.shape[0])
        idx = norms.topk(top).indices
    else:
        idx = torch.tensor(check_index_list(neurons, u.shape[0], "neurons", "neuron", sort=False), dtype=torch.long)
    normalize = resolve_normalize(trace, normalize)
    tokens = trace.lens.project(u[idx], k, target=trace.target_id, normalize=normalize)
    return Imprint(layer=grad.layer, part=part, neurons=idx, weights=-grad.vjps[:, idx].T, update_norm=norms[idx],
                   tokens=tokens, normalize=normalize, expert=grad.expert)
