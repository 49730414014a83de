"""Forward-pass shift edit preview (Backward Lens, Katz et al. 2024): W_ff2 += eta * x_T e_t^T at one layer,
where x_T is the FF2 input at the edited position and e_t the target's input embedding. Applied as the
exactly equivalent output change d(mlp_out)_i = eta (a_i . x_T) e_t, so weights are never written."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_index, check_number
from ..hf import materialized
from .base import Patch


@dataclass(frozen=True)
class ShiftEdit(Patch):
    """Preview of the forward-pass shift at `layer` (x_T taken at `position` of the unpatched run;
    target = the run's target). Effect: mlp_out_i += eta * (a_i . x_T) * e_t at every position."""

    layer: int
    eta: float
    position: int = -1
    needs_base = True

    def validate(self, lens, n_tokens):
        check_index(self.layer, lens.n_layers, "layer")
        check_index(self.position, n_tokens, "position")
        check_number(self.eta, "eta")

    def first_layer(self, lens) -> int:
        return check_index(self.layer, lens.n_layers, "layer")

    def install(self, ctx):
        lens = ctx.lens
        layer = self.first_layer(lens)
        x_t = ctx.base.mlp_activations(layer)[self.position]  # [F]
        with materialized(lens.model, lens.adapter.embed):  # e_t in residual space (through project_in: OPT-350m)
            e_t = lens.adapter.embedding_matrix(lens.model)[ctx.base.target_id].to("cpu", copy=True)
        eta = float(self.eta)

        def hook(mod, args, output):
            a = args[0]
            coef = torch.matmul(a, x_t.to(device=a.device, dtype=a.dtype))  # [B, T]
            return output + eta * coef[..., None] * e_t.to(device=output.device, dtype=output.dtype)

        ctx.forward_hook(ctx.part(layer, "mlp_out"), hook)
