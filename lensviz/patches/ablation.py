"""Ablations: zero attention heads (their slice of the output-projection input) and set FFN neurons
(the on/off switches of LM-Debugger, Geva et al. 2022)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_index, check_index_list, check_number, check_positions
from ..errors import LensvizError
from ..lenses.experts import expert_activation, value_vectors
from ..lenses.neurons import top_sub_updates
from .base import Patch, check_heads

NEURON_MODES = ("set", "scale", "on")


@dataclass(frozen=True)
class HeadAblation(Patch):
    """Zero heads' outputs O_h (the input slice of W_O) at every position of `layer`."""

    layer: int
    heads: object

    def validate(self, lens, n_tokens):
        check_index(self.layer, lens.n_layers, "layer")
        if self.heads is None:
            raise LensvizError("heads must be an int or a list of head indices")
        check_heads(self.heads, lens)

    def first_layer(self, lens) -> int:
        return check_index(self.layer, lens.n_layers, "layer")

    def install(self, ctx):
        heads = list(check_heads(self.heads, ctx.lens))

        def zero(out):  # [B, H, T, d]
            out = out.clone()
            out[:, heads] = 0
            return out

        ctx.rec.edit(self.first_layer(ctx.lens)).outputs.append(zero)


@dataclass(frozen=True)
class NeuronPatch(Patch):
    """Set FFN activations m_i (the input of the MLP output matrix) of `neurons` in `layer`.

    mode "set": m_i = value; "scale": m_i *= value; "on": m_i = the layer's largest sub-update score
    |m_j|·||v_j|| at the last position of the unpatched run, plus 0.01 (LM-Debugger's "on" value,
    applied to m_i directly since SwiGLU has no single pre-activation). positions: None = all.
    expert: on mixture-of-experts families, the expert e whose neurons a_{e,i} are set, at the positions
    routed to it; the MLP output changes by w_e (a'_e - a_e) W_down,e there. Its "on" value is the layer's
    largest sub-update score |w_e' a_{e',j}|·||v_{e',j}|| over the experts routed at the last position,
    plus 0.01 (`lenses.neurons.top_sub_updates`).
    """

    layer: int
    neurons: object
    value: float = 0.0
    mode: str = "set"
    positions: object = None
    expert: int | None = None

    @property
    def needs_base(self) -> bool:
        return self.mode == "on"

    def _neurons(self, lens):
        if self.neurons is None:
            raise LensvizError("neurons must be an int or a list of neuron indices")
        return check_index_list(self.neurons, lens.d_mlp, "neurons", "neuron")

    def validate(self, lens, n_tokens):
        if self.expert is None:
            lens.adapter.require_dense_mlp("NeuronPatch without expert=")
        elif not lens.adapter.moe:
            raise LensvizError(f"NeuronPatch(expert=...) needs a mixture-of-experts model; {lens.arch} has a dense MLP")
        else:
            check_index(self.expert, lens.adapter.n_experts(lens.model.config), "expert")
        check_index(self.layer, lens.n_layers, "layer")
        self._neurons(lens)
        check_number(self.value, "value")
        if self.mode not in NEURON_MODES:
            raise LensvizError(f"mode must be one of {NEURON_MODES}, got {self.mode!r}")
        check_positions(self.positions, n_tokens)

    def first_layer(self, lens) -> int:
        return check_index(self.layer, lens.n_layers, "layer")

    def on_value(self, base) -> float:
        """LM-Debugger's "on" coefficient for this layer: max_j |m_j|·||v_j|| at the last position + 0.01."""
        layer = self.first_layer(base.lens)
        if self.expert is not None:
            return float(top_sub_updates(base, 1, layers=[layer], positions=[-1]).scores.max()) + 0.01
        w = base.adapter.as_in_out(base.lens.weight(layer, "mlp_out"))  # [F, D]
        scores = base.mlp_activations(layer)[-1].abs() * w.norm(dim=-1).to(base.mlp_activations(layer).dtype)
        return float(scores.max()) + 0.01

    def install(self, ctx):
        lens = ctx.lens
        layer, neurons = self.first_layer(lens), self._neurons(lens)
        positions = check_positions(self.positions, len(ctx.input_ids) or None)
        value = self.on_value(ctx.base) if self.mode == "on" else float(self.value)
        rows = slice(None) if positions is None else list(positions)
        if self.expert is not None:
            self._install_expert(ctx, layer, neurons, value, positions)
            return

        def hook(mod, args):
            flat = args[0].dim() == 2  # [T, F]: a family that flattens the MLP's tokens (OPT)
            a = args[0].clone()
            a = a[None] if flat else a
            sel = a[:, rows][..., neurons]
            new = sel * value if self.mode == "scale" else torch.full_like(sel, value)
            block = a[:, rows]
            block[..., neurons] = new
            a[:, rows] = block
            return (a[0] if flat else a, *args[1:])

        ctx.pre_hook(ctx.part(layer, "mlp_out"), hook)

    def _install_expert(self, ctx, layer, neurons, value, positions):
        """A forward hook on the experts module: out[t] += w_e (a'_e(x_t) - a_e(x_t))[neurons] values_e[neurons]
        for the tokens t routed to expert e (and in `positions`)."""
        lens, ad = ctx.lens, ctx.adapter
        e = check_index(self.expert, ad.n_experts(ctx.model.config), "expert")
        module = ctx.block(layer).get_submodule(ad.experts)

        def hook(mod, args, output):
            x, chosen, weights = args[:3]
            hit = chosen == e  # [n, k]
            if positions is not None:
                keep = torch.zeros(hit.shape[0], dtype=torch.bool, device=hit.device)
                keep[list(positions)] = True
                hit = hit & keep[:, None]
            rows, slots = torch.where(hit)
            if len(rows) == 0:
                return None
            a = expert_activation(lens, layer, e, x[rows])[:, neurons]
            new = a * value if self.mode == "scale" else torch.full_like(a, value)
            values, _ = value_vectors(lens, layer, e, x.device)
            delta = ((new - a) @ values[neurons]) * weights[rows, slots, None].to(a.dtype)
            return output.index_add(0, rows, delta.to(output.dtype))

        ctx.forward_hook(module, hook)
