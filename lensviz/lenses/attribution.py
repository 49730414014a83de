"""Direct logit attribution (DLA): each component's write to the residual read through the final norm
with its scale frozen at this run, then the unembedding row of the target (minus the distractor's).

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
    logit equals x . u + constant with the norm's scale and the logit transform frozen at x."""
    ad, model = lens.adapter, lens.model
    norm, unembed = lens.final_norm_module, lens.unembed_module
    dev = unembed.weight.device
    with torch.no_grad():
        normed = norm(x.to(device=dev, dtype=unembed.weight.dtype)[None])[0].to("cpu", torch.float64)
        w = unembed.weight[token].detach().to("cpu", torch.float64)
        b_u = 0.0 if getattr(unembed, "bias", None) is None else float(unembed.bias[token])
        z = float(normed @ w) + b_u
        logit = float(ad.finish_logits(model.config, torch.tensor([z], dtype=torch.float64))[0])
    xd = x.to(torch.float64)
    centred = ad.norm == "layernorm"
    g = lens.norm_gain(None)
    g = torch.ones_like(xd) if g is None else g.to(torch.float64)
    b = getattr(norm, "bias", None)
    b = torch.zeros_like(xd) if b is None else b.detach().to("cpu", torch.float64)
    xc = xd - xd.mean() if centred else xd
    gx = g * xc
    scale = float(((normed - b) @ gx) / (gx @ gx))  # the norm's scale c(x), read off its own output
    ratio = logit / z if z != 0 else 1.0
    u = g * w * scale * ratio
    if centred:
        u = u - u.mean()
    return u, ratio * (float(b @ w) + b_u), logit


def direct_logit_attribution(trace) -> DirectLogitAttribution:
    """The DLA of `trace`'s metric: of the target logit (summed over a multi-token target's tokens at
    their positions), or of logit(target) - logit(distractor) at the last position."""
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
    for pos, u in dirs:
        embed += float(trace.resid(0, "pre")[pos].double() @ u)
    for layer in range(n_layers):
        outs = trace.head_outputs(layer)  # [H, T, D]
        bias = lens.adapter.part(lens.model, layer, "o_proj").bias
        mlp = (trace.resid(layer, "post") - trace.resid(layer, "mid")).double()
        if bias is not None:
            scale = trace.write_scale(layer, "attn").double()
            bias_write = bias.detach().to("cpu", torch.float64) * scale
        for pos, u in dirs:
            heads[layer] += outs[:, pos].double() @ u
            mlps[layer] += float(mlp[pos] @ u)
            if bias is not None:
                rest += float((bias_write[pos] if bias_write.dim() == 2 else bias_write) @ u)
    if not torch.isfinite(heads).all():
        raise LensvizError("the direct logit attribution is not finite (a zero final-norm input?)")
    return DirectLogitAttribution(heads=heads, mlps=mlps, embed=embed, rest=rest, logit=logit)
