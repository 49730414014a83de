"""Head importance, one [n_layers, n_heads] map per measure, each a function of a trace:

* "dla": the head's direct logit attribution (lenses/attribution.py);
* "ablation": the exact effect on the metric of zeroing the head's output O_h at every position,
  metric(ablated) - metric (one batched forward per layer, reusing the blocks below it);
* "ra": ||RA_h||_F, the Reversed Attention norm (Katz & Wolf's head ranking).

Also the Reversed Attention ranking over many prompts (mean and std of ||RA||_F) and the keep-top-p
sweep of that paper: keep the top fraction p of heads by a score, zero every other head, metric vs p.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import batched
from ..checks import check_choice
from ..errors import LensvizError
from .attribution import direct_logit_attribution
from .reversed import head_norms

MEASURES = ("dla", "ablation", "ra")


def _check_trace(trace, what: str) -> None:
    if trace.patches or trace.gradient != "standard":
        raise LensvizError(f"{what} needs an unpatched trace with the standard gradient")


def ablation_effects(trace, *, batch_size: int | None = None, progress=None) -> torch.Tensor:
    """metric(run with head h of layer l zeroed at every position) - metric(run): [n_layers, n_heads]."""
    _check_trace(trace, "ablation")
    lens = trace.lens
    out = torch.empty(lens.n_layers, lens.n_heads, dtype=torch.float64)
    for layer in range(lens.n_layers):
        def install(stack, rows, layer=layer):
            heads = torch.tensor(list(rows))

            def zero(o):  # [B, T, H, d]: row b zeroes head rows[b]
                o[torch.arange(len(heads)), :, heads] = 0
                return o

            batched.o_proj_input(stack, lens, layer, zero)

        out[layer] = batched.variant_metrics(trace, lens.n_heads, layer, install, batch_size=batch_size)
        if progress is not None:
            progress(layer + 1, lens.n_layers)
    return out - trace.metric


def head_importance(trace, measure: str = "dla", **kwargs) -> torch.Tensor:
    """[n_layers, n_heads] float64: "dla" (direct logit attribution), "ablation" (exact zero-ablation
    effect on the metric) or "ra" (||RA||_F; the trace needs its backward pass)."""
    check_choice(measure, MEASURES, "measure")
    if measure == "dla":
        return direct_logit_attribution(trace).heads
    if measure == "ablation":
        return ablation_effects(trace, **kwargs)
    if not trace.has_backward:
        raise LensvizError("measure 'ra' needs the backward pass: trace with backward=True")
    return head_norms(trace, "reversed").double()


@dataclass(frozen=True, eq=False)
class HeadRanking:
    """||RA_{l,h}||_F over prompts: norms [n_prompts, L, H], mean / std [L, H] (std 0 for one prompt)."""

    norms: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.norms.mean(0)

    @property
    def std(self) -> torch.Tensor:
        return self.norms.std(0, unbiased=False)

    @property
    def order(self) -> list[tuple[int, int]]:
        """(layer, head) by decreasing mean ||RA||_F."""
        h = self.norms.shape[2]
        return [(int(i) // h, int(i) % h) for i in self.mean.flatten().argsort(descending=True)]


def ra_head_ranking(lens, prompts, target=None, *, distractor=None) -> HeadRanking:
    """The Reversed Attention head ranking: ||RA||_F of every head for each prompt (one forward +
    backward each), averaged. target: one for all prompts, or a list with one per prompt (None: each
    prompt's top-1)."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise LensvizError("prompts must be a non-empty list of prompts")
    targets = list(target) if isinstance(target, list) else [target] * len(prompts)
    if len(targets) != len(prompts):
        raise LensvizError(f"got {len(targets)} targets for {len(prompts)} prompts")
    norms = [head_norms(lens.trace(p, target=t, distractor=distractor), "reversed").double()
             for p, t in zip(prompts, targets)]
    return HeadRanking(torch.stack(norms))


@dataclass(frozen=True, eq=False)
class KeepTopSweep:
    """fractions [n]; kept [n] heads kept; metric [n] of the run with every other head zeroed;
    metric_full the unablated run's."""

    fractions: torch.Tensor
    kept: torch.Tensor
    metric: torch.Tensor
    metric_full: float


def keep_top_heads(trace, scores, fractions=None, *, batch_size: int | None = None) -> KeepTopSweep:
    """Keep the top fraction p of heads by `scores` [n_layers, n_heads] (higher = kept first), zero the
    others' outputs at every position, and measure the metric; all fractions in batched forwards."""
    _check_trace(trace, "keep_top_heads")
    lens = trace.lens
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.shape != (lens.n_layers, lens.n_heads):
        raise LensvizError(f"scores must be [n_layers, n_heads] = {[lens.n_layers, lens.n_heads]}, "
                           f"got {list(scores.shape)}")
    fr = torch.linspace(0, 1, 11, dtype=torch.float64) if fractions is None else torch.as_tensor(
        fractions, dtype=torch.float64).flatten()
    if fr.numel() == 0 or not torch.all((fr >= 0) & (fr <= 1)):
        raise LensvizError("fractions must be numbers in [0, 1]")
    n = scores.numel()
    order = scores.flatten().argsort(descending=True)
    kept = torch.round(fr * n).long()
    masks = torch.zeros(len(fr), n, dtype=torch.float64)
    for i, k in enumerate(kept.tolist()):
        masks[i, order[:k]] = 1.0
    masks = masks.reshape(len(fr), lens.n_layers, lens.n_heads)

    def install(stack, rows):
        m = masks[list(rows)]
        for layer in range(lens.n_layers):
            def keep(o, layer=layer):  # [B, T, H, d]
                return o * m[:, layer].to(device=o.device, dtype=o.dtype)[:, None, :, None]

            batched.o_proj_input(stack, lens, layer, keep)

    metric = batched.variant_metrics(trace, len(fr), 0, install, batch_size=batch_size)
    return KeepTopSweep(fractions=fr, kept=kept, metric=metric, metric_full=float(trace.metric))
