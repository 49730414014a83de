"""Reversed Attention lenses: per-head norms and rankings, forward-vs-reversed comparison, and RA maps
averaged over prompts of equal token length (the maps the paper patches with).

RA_h = dL/d(Q_h K_h^T) itself comes from `Trace.reversed_attention`; this module summarises it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_choice, check_index, check_layer_list
from ..errors import LensvizError


def head_norms(trace, kind: str = "reversed", layers=None) -> torch.Tensor:
    """Frobenius norm of each head's map: [len(layers), H]. kind "reversed" (||RA||_F) or "forward" (||A||_F)."""
    check_choice(kind, ("reversed", "forward"), "kind")
    get = trace.reversed_attention if kind == "reversed" else trace.attention
    return torch.stack([get(layer).flatten(1).norm(dim=1) for layer in check_layer_list(layers, trace.n_layers)])


@dataclass(frozen=True)
class HeadScore:
    layer: int
    head: int
    score: float


def rank_heads(trace, kind: str = "reversed", top: int | None = None) -> list[HeadScore]:
    """Heads sorted by decreasing map norm (||RA||_F by default), the paper's head ranking."""
    norms = head_norms(trace, kind)
    order = norms.flatten().argsort(descending=True)
    if top is not None:
        order = order[:top]
    n_heads = norms.shape[1]
    return [HeadScore(int(i) // n_heads, int(i) % n_heads, float(norms.flatten()[i])) for i in order]


def compare(trace, layer: int, head: int) -> dict:
    """Forward map A and Reversed Attention RA of one head side by side ([T, T] each) with summary
    numbers: both Frobenius norms, the share of |map| mass in the top 10% of causal entries (a sparsity
    measure; the paper calls RA sparser), and the Pearson correlation of A with |RA| over causal entries."""
    layer = check_index(layer, trace.n_layers, "layer")
    head = check_index(head, trace.dims.n_heads, "head")
    a, ra = trace.attention(layer)[head], trace.reversed_attention(layer)[head]
    t = a.shape[0]
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def top_share(m):
        vals = m[causal].abs().double()
        n = max(1, int(round(0.1 * vals.numel())))
        total = vals.sum()
        return float(vals.topk(n).values.sum() / total) if total > 0 else 0.0

    x, y = a[causal].double(), ra[causal].abs().double()
    corr = float(torch.corrcoef(torch.stack([x, y]))[0, 1]) if x.std() > 0 and y.std() > 0 else float("nan")
    return {"layer": layer, "head": head, "tokens": list(trace.tokens), "forward": a, "reversed": ra,
            "forward_norm": float(a.norm()), "reversed_norm": float(ra.norm()),
            "forward_top10_share": top_share(a), "reversed_top10_share": top_share(ra), "correlation": corr}


def average_reversed_attention(lens, prompts, targets, layers=None) -> dict[int, torch.Tensor]:
    """Mean RA over prompts of the same token length: {layer: Tensor[H, T, T]}.

    prompts: list of str (or segment lists); targets: one target per prompt (str/int), or a single target
    for all. These are the maps the Reversed Attention paper (Katz & Wolf) patches with: one map per layer
    for every prompt of that token length. Each map explains the first token of its target (the maps
    cover the prompt's T positions, so a multi-token target is not appended).
    """
    if isinstance(prompts, str) or not prompts:
        raise LensvizError("prompts must be a non-empty list of prompts")
    if isinstance(targets, (list, tuple)):
        if len(targets) != len(prompts):
            raise LensvizError(f"got {len(targets)} targets for {len(prompts)} prompts")
    else:
        targets = [targets] * len(prompts)
    lengths = {len(lens.encode(p)[0]) for p in prompts}
    if len(lengths) != 1:
        raise LensvizError(f"averaged maps need prompts of one token length; got lengths {sorted(lengths)}")
    total: dict[int, torch.Tensor] = {}
    for prompt, target in zip(prompts, targets):
        tr = lens.trace(prompt, target=target, target_mode="first")
        for layer in check_layer_list(layers, tr.n_layers):
            ra = tr.reversed_attention(layer)
            total[layer] = ra if layer not in total else total[layer] + ra
    return {layer: m / len(prompts) for layer, m in total.items()}
