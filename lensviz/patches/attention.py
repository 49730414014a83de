"""Attention interventions: Reversed-Attention patching (A' = A + eta * P after the softmax) and
top-k attention (keep the k largest scores per query before the softmax), with a fidelity report.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int, check_number
from ..errors import LensvizError
from .base import Patch, check_heads, check_layers


def head_mask(heads: tuple[int, ...], n_heads: int, like: torch.Tensor) -> torch.Tensor:
    """[H, 1, 1] of 1.0 on the chosen heads, 0.0 elsewhere (like's dtype and device)."""
    m = torch.zeros(n_heads, 1, 1, dtype=like.dtype, device=like.device)
    m[list(heads)] = 1
    return m


@dataclass(frozen=True)
class AttentionPatch(Patch):
    """A'_h = A_h + eta * P_h after the softmax, on `layers` x `heads` (attention patching with Reversed
    Attention maps, Katz & Wolf 2025, "Reversed Attention").

    maps=None: P = the Reversed Attention of the same prompt and target (self-patching); else a dict
    {layer: Tensor[H, T, T]}, e.g. from `lensviz.lenses.reversed.average_reversed_attention`.
    Negative eta is the descent direction. eta = 0 installs nothing (bit-identical logits).
    """

    eta: float
    maps: dict | None = None
    layers: object = None
    heads: object = None

    @property
    def needs_base(self) -> bool:
        return self.maps is None and self.eta != 0

    @property
    def applies_while_decoding(self) -> bool:  # eta != 0 adds [T, T] maps of one prompt length
        return self.eta == 0

    def _layers(self, lens):
        if self.maps is not None and self.layers is None:
            return check_layers(list(self.maps), lens, "maps layers")
        return check_layers(self.layers, lens)

    def validate(self, lens, n_tokens):
        check_number(self.eta, "eta")
        check_heads(self.heads, lens)
        layers = self._layers(lens)
        if self.maps is not None:
            if not isinstance(self.maps, dict):
                raise LensvizError("maps must be a dict {layer: Tensor[H, T, T]}")
            keyed = {(k % lens.n_layers if isinstance(k, int) else k): v for k, v in self.maps.items()}
            for layer in layers:
                m = keyed.get(layer)
                t = n_tokens if n_tokens is not None else (m.shape[-1] if isinstance(m, torch.Tensor) else -1)
                if not isinstance(m, torch.Tensor) or tuple(m.shape) != (lens.n_heads, t, t):
                    raise LensvizError(f"maps[{layer}] must be a Tensor of shape [{lens.n_heads}, {n_tokens}, "
                                       f"{n_tokens}] (heads, tokens, tokens) for this prompt")

    def first_layer(self, lens) -> int:
        return self._layers(lens)[0] if self.eta != 0 else lens.n_layers

    def install(self, ctx):
        if self.eta == 0:
            return
        lens = ctx.lens
        heads = check_heads(self.heads, lens)
        keyed = None if self.maps is None else {k % lens.n_layers: v for k, v in self.maps.items()}
        for layer in self._layers(lens):
            p = ctx.base.reversed_attention(layer) if keyed is None else keyed[layer]
            ctx.rec.edit(layer).added.append(p * head_mask(heads, lens.n_heads, p) * self.eta)


@dataclass(frozen=True)
class TopKAttention(Patch):
    """Keep the k largest (scaled, masked) scores per query and head before the softmax; the softmax
    then normalises over the kept keys only (top-k attention, Gupta et al. 2021, "Memory-efficient
    Transformers via Top-k Attention"). Rows with fewer than k allowed keys keep all."""

    k: int
    layers: object = None
    heads: object = None

    def validate(self, lens, n_tokens):
        check_int(self.k, "k", 1)
        check_layers(self.layers, lens)
        check_heads(self.heads, lens)

    def first_layer(self, lens) -> int:
        return check_layers(self.layers, lens)[0]

    def install(self, ctx):
        heads = check_heads(self.heads, ctx.lens)
        k = self.k

        def keep(scores):  # scores [B, H, q, T], scaled and masked: the k largest per query are kept
            kk = min(k, scores.shape[-1])
            kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(kk, dim=-1).indices, True)
            if len(heads) < scores.shape[1]:
                others = torch.ones(scores.shape[1], dtype=torch.bool, device=scores.device)
                others[list(heads)] = False
                kept |= others[None, :, None, None]
            return kept

        for layer in check_layers(self.layers, ctx.lens):
            ctx.rec.edit(layer).keep.append(keep)


def topk_fidelity(lens, prompt, ks=(1, 2, 4, 8, 16, 32), layers=None) -> list[dict]:
    """How faithful top-k attention is, per k: mean KL(full || top-k) of the next-token distributions
    over all positions (nats), top-1 agreement over positions, KL and agreement at the last position,
    and the mean attention mass the kept keys hold under the full softmax (retained mass rho)."""
    full = lens.trace(prompt, backward=False)
    logp_full = torch.log_softmax(full.logits.double(), -1)
    chosen = check_layers(layers, lens)
    attn = {layer: full.attention(layer) for layer in chosen}
    rows = []
    for k in ks:
        tr = lens.trace(prompt, patches=(TopKAttention(k, layers=layers),), backward=False, base=full)
        logp = torch.log_softmax(tr.logits.double(), -1)
        kl = (logp_full.exp() * (logp_full - logp)).sum(-1)
        agree = (logp.argmax(-1) == logp_full.argmax(-1)).double()
        rho = torch.stack([a.topk(min(k, a.shape[-1]), dim=-1).values.sum(-1).mean() for a in attn.values()]).mean()
        rows.append({"k": int(k), "mean_kl": float(kl.mean()), "top1_agreement": float(agree.mean()),
                     "last_kl": float(kl[-1]), "last_top1_agrees": bool(agree[-1]), "retained_mass": float(rho)})
    return rows
