"""Direct logit attribution (DLA): each component's write to the residual read through the final norm
with its scale frozen at this run, then the unembedding row of the target (minus the distractor's).
In post-LN blocks (OPT-350m) the residual is renormalised by every later block: the direction is pulled
back through each frozen LayerNorm (see `direct_logit_attribution`).

The final residual x = embed + sum_l (sum_h head_{l,h} + attention bias_l + mlp_l). With the norm's
scale c(x) frozen, N(x) = g * (x - mean x) * c + b (LayerNorm; RMSNorm: g * x * c) is affine in x, and
so is the target's logit z = W_U[t] . N(x) + b_U[t]; the family's logit transform f (Cohere's and
Granite's scaling, Gemma 2's soft-cap) is frozen the same way, as the factor f(z) / z. Each part v then
contributes v . u with u = (f(z)/z) * centre(g * W_U[t]) * c, and the constants (the norm's bias, the
unembedding bias) go to `rest` with the attention biases, so `total` equals the target's logit. A
multi-token target sums its tokens' logits at their positions; with a distractor the parts are those of
logit(target) - logit(distractor) at the last position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LensvizError


@dataclass(frozen=True, eq=False)
class DirectLogitAttribution:
    """heads [n_layers, n_heads], mlps [n_layers], embed, rest (attention and norm / unembedding biases)
    in logit units (float64); logit: the model's own target logit (or logit difference) it decomposes."""

    heads: torch.Tensor
    mlps: torch.Tensor
    embed: float
    rest: float
    logit: float

    @property
    def total(self) -> float:
        """embed + heads + mlps + rest: equal to `logit` (to the precision of the model's norms)."""
        return float(self.embed + self.heads.sum() + self.mlps.sum() + self.rest)

    def __repr__(self) -> str:
        return f"DirectLogitAttribution(heads={tuple(self.heads.shape)}, total={self.total:.6f}, logit={self.logit:.6f})"


def _frozen_direction(lens, x: torch.Tensor, token: int) -> tuple[torch.Tensor, float, float]:
    """(u [D], constant, the model's logit) of one token's logit read from final-norm input x [D]: the
    logit equals x . u + constant with the norm's scale and the logit transform frozen at x. Without a
    final norm (post-LN OPT) the readout is linear: u = W_U[t] in residual space (through project_out)."""
    ad, model = lens.adapter, lens.model
    norm, unembed = lens.final_norm_module, lens.unembed_module
    dev = unembed.weight.device
    w_res = ad.unembedding_matrix(model)[token].to("cpu", torch.float64)  # W_U[t] (W_out composed) [D]
    b_u = 0.0 if getattr(unembed, "bias", None) is None else float(unembed.bias[token])
    with torch.no_grad():
        normed = x.to(device=dev, dtype=unembed.weight.dtype)[None]
        normed = (normed if norm is None else norm(normed))[0].to("cpu", torch.float64)
        z = float(normed @ w_res) + b_u
        logit = float(ad.finish_logits(model.config, torch.tensor([z], dtype=torch.float64))[0])
    ratio = logit / z if z != 0 else 1.0
    if norm is None:
        return w_res * ratio, ratio * b_u, logit
    xd = x.to(torch.float64)
    centred = ad.norm == "layernorm"
    g = lens.norm_gain(None)
    g = torch.ones_like(xd) if g is None else g.to(torch.float64)
    b = getattr(norm, "bias", None)
    b = torch.zeros_like(xd) if b is None else b.detach().to("cpu", torch.float64)
    xc = xd - xd.mean() if centred else xd
    gx = g * xc
    scale = float(((normed - b) @ gx) / (gx @ gx))  # the norm's scale c(x), read off its own output
    u = g * w_res * scale * ratio
    if centred:
        u = u - u.mean()
    return u, ratio * (float(b @ w_res) + b_u), logit


def direct_logit_attribution(trace) -> DirectLogitAttribution:
    """The DLA of `trace`'s metric: of the target logit (summed over a multi-token target's tokens at
    their positions), or of logit(target) - logit(distractor) at the last position.

    Each block's output is carried(resid before) + the sublayer's write (`Trace.carried`, `Trace.write`).
    In additive blocks the carried map is the identity, so every part is read along the final direction
    u; in post-LN blocks (OPT-350m) it is the frozen norm's affine map, so u is pulled back through each
    norm (`Trace.carry_back`) on the way down and the norms' biases go to `rest`."""
    lens = trace.lens
    n_layers, n_heads = lens.n_layers, lens.n_heads
    last = trace.resid(n_layers - 1, "post")
    if trace.distractor_id is not None:
        terms = [(len(trace) - 1, trace.target_id, 1.0), (len(trace) - 1, trace.distractor_id, -1.0)]
    else:
        terms = [(p, t, 1.0) for p, t in zip(trace.explained_positions, trace.target_ids)]
    heads = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    mlps = torch.zeros(n_layers, dtype=torch.float64)
    embed = rest = logit = 0.0
    dirs = []
    for pos, token, sign in terms:
        u, const, lg = _frozen_direction(lens, last[pos], token)
        dirs.append((pos, sign * u))
        rest += sign * const
        logit += sign * lg
    post_ln = lens.adapter.post_ln
    for layer in reversed(range(n_layers)):
        outs = trace.head_outputs(layer)  # [H, T, D]
        bias = lens.adapter.part(lens.model, layer, "o_proj").bias
        carried_mlp = trace.carried(layer, "mlp").double()
        mlp = trace.resid(layer, "post").double() - carried_mlp  # the MLP's write
        if post_ln:
            carried_attn = trace.carried(layer, "attn").double()
            # the norms' biases: carried minus its linear part
            b_mlp = carried_mlp - trace.write(layer, "mlp", trace.resid(layer, "mid")).double()
            b_attn = carried_attn - trace.write(layer, "attn", trace.resid(layer, "pre")).double()
        if bias is not None:
            bias_write = trace.write(layer, "attn", bias.detach().to("cpu", torch.float64)
                                     .expand(len(trace), -1).to(outs.dtype)).double()
        new_dirs = []
        for pos, u in dirs:
            mlps[layer] += float(mlp[pos] @ u)
            if post_ln:
                rest += float(b_mlp[pos] @ u)
            u = trace.carry_back(layer, "mlp", u, pos)  # direction on resid "mid"
            heads[layer] += outs[:, pos].double() @ u
            if bias is not None:
                rest += float(bias_write[pos] @ u)
            if post_ln:
                rest += float(b_attn[pos] @ u)
            new_dirs.append((pos, trace.carry_back(layer, "attn", u, pos)))  # on resid "pre"
        dirs = new_dirs
    for pos, u in dirs:
        embed += float(trace.resid(0, "pre")[pos].double() @ u)
    if not torch.isfinite(heads).all():
        raise LensvizError("the direct logit attribution is not finite (a zero final-norm input?)")
    return DirectLogitAttribution(heads=heads, mlps=mlps, embed=embed, rest=rest, logit=logit)
