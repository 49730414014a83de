"""Forward-pass shift edit preview (Backward Lens, Katz et al. 2024): W_ff2 += eta * x_T e_t^T at one layer,
where x_T is the FF2 input at the edited position and e_t the target's input embedding. Applied as the
exactly equivalent output change d(mlp_out)_i = eta (a_i . x_T) e_t, so weights are never written.

On mixture-of-experts families the edit addresses one expert e (`expert=e`): W_down,e += eta * x_T e_t^T
with x_T = a_e(x_T), expert e's neuron activations at the edited position (which must be routed to e).
Expert e's output at a token i routed to it changes by eta (a_{e,i} . x_T) e_t, so the MLP output changes
by w_{i,e} eta (a_{e,i} . x_T) e_t (router weight w); tokens not routed to e are unchanged."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_index, check_number
from ..errors import LensvizError
from ..hf import materialized
from ..lenses.experts import check_expert, expert_activation, expert_factors
from .base import Patch


@dataclass(frozen=True)
class ShiftEdit(Patch):
    """Preview of the forward-pass shift at `layer` (x_T taken at `position` of the unpatched run;
    target = the run's target). Effect: mlp_out_i += eta * (a_i . x_T) * e_t at every position.
    expert (MoE families, required there): the expert e whose FF2 is edited; x_T = a_e at `position`
    (LensvizError if that position was not routed to e), and the effect at every token i routed to e is
    w_{i,e} * eta * (a_{e,i} . x_T) * e_t (see the module docstring)."""

    layer: int
    eta: float
    position: int = -1
    expert: int | None = None
    needs_base = True

    def validate(self, lens, n_tokens):
        if self.expert is None:
            lens.adapter.require_dense_mlp("ShiftEdit without expert=")
        else:
            check_expert(lens, self.expert)
        check_index(self.layer, lens.n_layers, "layer")
        check_index(self.position, n_tokens, "position")
        check_number(self.eta, "eta")

    def first_layer(self, lens) -> int:
        return check_index(self.layer, lens.n_layers, "layer")

    def install(self, ctx):
        lens = ctx.lens
        layer = self.first_layer(lens)
        with materialized(lens.model, lens.adapter.embed):  # e_t in residual space (through project_in: OPT-350m)
            e_t = lens.adapter.embedding_matrix(lens.model)[ctx.base.target_id].to("cpu", copy=True)
        eta = float(self.eta)
        if self.expert is not None:
            self._install_expert(ctx, layer, eta, e_t)
            return
        x_t = ctx.base.mlp_activations(layer)[self.position]  # [F]

        def hook(mod, args, output):
            a = args[0]
            coef = torch.matmul(a, x_t.to(device=a.device, dtype=a.dtype))  # [B, T]
            return output + eta * coef[..., None] * e_t.to(device=output.device, dtype=output.dtype)

        ctx.forward_hook(ctx.part(layer, "mlp_out"), hook)

    def _install_expert(self, ctx, layer: int, eta: float, e_t: torch.Tensor) -> None:
        """A forward hook on the experts module: out[i] += w_{i,e} eta (a_e(x_i) . x_T) e_t for the tokens i
        routed to expert e (x_T = a_e at the edited position of the unpatched run)."""
        lens, base = ctx.lens, ctx.base
        e = check_expert(lens, self.expert)
        t = check_index(self.position, len(base), "position")
        f = expert_factors(base, layer, e)
        hit = torch.nonzero(f.rows == t).reshape(-1)
        if len(hit) == 0:
            raise LensvizError(f"ShiftEdit(expert={e}): position {t} of layer {layer} was not routed to expert {e} "
                               f"(its experts there: {base.router(layer)[0][t].tolist()}), so the expert has no FF2 "
                               "input x_T there")
        x_t = f.a[int(hit[0])]  # [F]
        module = ctx.block(layer).get_submodule(lens.adapter.experts)

        def hook(mod, args, output):
            x, chosen, weights = args[:3]
            rows, slots = torch.where(chosen == e)
            if len(rows) == 0:
                return None
            a = expert_activation(lens, layer, e, x[rows])  # [n, F]
            coef = (a @ x_t.to(a.device, a.dtype)) * weights[rows, slots].to(a.dtype)  # [n]
            return output.index_add(0, rows, (eta * coef[:, None] * e_t.to(a.device, a.dtype)).to(output.dtype))

        ctx.forward_hook(module, hook)
