"""Activation-patching sweeps between a clean and a corrupted prompt of the same token length.

effect[l, p] = metric(corrupt run with the clean activation patched in at (l, p)) - metric(corrupt run)
for the residual sites "pre" / "mid" / "post" ([n_layers, T]); for site "head" the cell (l, h) patches
head h's output O_h (the input slice of W_O) at every position ([n_layers, n_heads]).

method="exact" re-runs the model: one batched forward per layer (every position, or every head, of that
layer at once), reusing the corrupt run's blocks below the patched one (lensviz.batched). A residual
cell whose clean vector equals the corrupt one (every position before the first token where the prompts
differ) is not run: the patched run is the corrupt run, effect 0.
method="attribution" is the first-order estimate (clean - corrupt activation) . d metric / d activation
at the corrupt run, read off the corrupt trace's captured backward pass (Syed et al. 2023, "Attribution
patching outperforms automated circuit discovery"): one forward + backward per prompt for the whole map.

A single position's resid "mid" fixes that position's block output (the MLP acts per position), so an
exact "mid" cell equals the "post" cell of the same layer and position; their attributions differ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import batched
from .checks import check_choice
from .errors import LensvizError
from .trace import Trace

SWEEP_SITES = ("pre", "mid", "post", "head")
METHODS = ("exact", "attribution")


@dataclass(frozen=True, eq=False)
class PatchingSweep:
    """effect [n_layers, T] (residual sites) or [n_layers, n_heads] (site "head"), float64;
    metric_clean / metric_corrupt: the two unpatched runs' metrics; clean / corrupt: their traces."""

    effect: torch.Tensor
    metric_clean: float
    metric_corrupt: float
    site: str
    method: str
    clean: Trace
    corrupt: Trace

    @property
    def normalized(self) -> torch.Tensor:
        """effect / (metric_clean - metric_corrupt): 1 = the patch restores the clean metric (NaN when the
        two runs' metrics are equal)."""
        denom = self.metric_clean - self.metric_corrupt
        if abs(denom) < 1e-12:
            return torch.full_like(self.effect, float("nan"))
        return self.effect / denom

    @property
    def tokens(self) -> list[str]:
        return list(self.corrupt.tokens)

    def __repr__(self) -> str:
        return (f"PatchingSweep(site={self.site!r}, method={self.method!r}, effect={tuple(self.effect.shape)}, "
                f"metric_clean={self.metric_clean:.4f}, metric_corrupt={self.metric_corrupt:.4f})")


def _traces(lens, clean, corrupt, target, distractor, target_mode, backward_corrupt):
    """The clean and corrupt traces, explaining the same target (the clean run's top-1 when None)."""
    for name, p in (("clean", clean), ("corrupt", corrupt)):
        if isinstance(p, Trace) and (p.lens is not lens or p.patches):
            raise LensvizError(f"{name} must be a prompt or an unpatched Trace made by this Lens")
    if isinstance(clean, Trace):
        if target is None:
            target, distractor = clean.target_ids, clean.distractor_id
            target_mode = "all"
        tr_clean = clean
    else:
        tr_clean = None
    if tr_clean is None:
        tr_clean = lens.trace(clean, target=target, distractor=distractor, target_mode=target_mode, backward=False)
        if target is None:
            target, target_mode = tr_clean.target_ids, "all"
    targets = lens.run_spec(tr_clean.prompt, target, distractor=distractor, target_mode=target_mode)[2]
    d_id = None if distractor is None else lens.token_id(distractor)
    if list(tr_clean.target_ids) != targets or tr_clean.distractor_id != d_id:
        raise LensvizError("the clean trace explains another target: pass its prompt, or the same target")
    prompt = corrupt.prompt if isinstance(corrupt, Trace) else corrupt
    c_ids = lens.run_spec(prompt, targets, distractor=d_id)[0]
    if len(c_ids) != len(tr_clean):
        clean_toks, corrupt_toks = tr_clean.tokens[:tr_clean.prompt_length], [lens.decode(i) for i in c_ids]
        corrupt_toks = corrupt_toks[:len(corrupt_toks) - (len(targets) - 1)]
        raise LensvizError(
            f"clean is {len(clean_toks)} tokens and corrupt {len(corrupt_toks)}: patching pairs positions, so the "
            f"prompts must tokenize to the same length. Align them: change words so that each replaced word is as "
            f"many tokens as the one it replaces, or pad the shorter prompt (e.g. with a leading word). "
            f"clean: {clean_toks!r}; corrupt: {corrupt_toks!r}")
    need = backward_corrupt
    if isinstance(corrupt, Trace) and (corrupt.has_backward or not need) and list(corrupt.target_ids) == targets \
            and corrupt.distractor_id == d_id and corrupt.gradient == "standard":
        tr_corrupt = corrupt
    else:
        tr_corrupt = lens.trace(prompt, target=targets, distractor=d_id, backward=need)
    return tr_clean, tr_corrupt


def _attribution(site: str, clean: Trace, corrupt: Trace) -> torch.Tensor:
    """(clean - corrupt activation) . d metric / d activation at the corrupt run. The trace's gradients
    are of -metric (lensviz.metrics), hence the sign."""
    rows = []
    for layer in range(corrupt.n_layers):
        if site == "head":
            delta = (clean.head_values(layer) - corrupt.head_values(layer)).double()  # [H, T, d]
            rows.append(-(delta * corrupt.head_output_grad(layer).double()).sum((1, 2)))
        else:
            delta = (clean.resid(layer, site) - corrupt.resid(layer, site)).double()  # [T, D]
            rows.append(-(delta * corrupt.resid_grad(layer, site).double()).sum(-1))
    return torch.stack(rows)


def _head_layer(lens, clean: Trace, corrupt: Trace, layer: int, batch_size, report) -> torch.Tensor:
    """metric of the corrupt run with head h's clean output patched in at every position, for each h."""
    src = clean.head_values(layer).transpose(0, 1)  # [T, H, d]

    def install(stack, rows):
        heads = torch.tensor(list(rows))

        def put(o):  # o [B, T, H, d]: row b takes the clean output of head rows[b]
            b = torch.arange(len(heads))
            o[b, :, heads] = src.to(device=o.device, dtype=o.dtype)[:, heads].transpose(0, 1)
            return o

        batched.o_proj_input(stack, lens, layer, put)

    return batched.variant_metrics(corrupt, lens.n_heads, layer, install, batch_size=batch_size, progress=report)


def _resid_layer(lens, clean: Trace, corrupt: Trace, layer: int, site: str, batch_size, report) -> torch.Tensor:
    """metric of the corrupt run with resid(layer, site) at position p the clean one, for each p. A
    position whose clean vector equals the corrupt one (causal masking: every position before the first
    token where the prompts differ) leaves the corrupt run as it is: no run, its metric is the corrupt one."""
    site = "post" if site == "mid" else site  # one position's mid fixes its block output (the MLP is per position)
    src = clean.resid(layer, site)
    first = layer + 1 if site == "post" else layer
    same = (src == corrupt.resid(layer, site)).all(-1)
    changed = [p for p in range(len(corrupt)) if not bool(same[p])]
    out = torch.full((len(corrupt),), float(corrupt.metric), dtype=torch.float64)
    if not changed:
        return out

    def install(stack, rows):
        pos = torch.tensor([changed[r] for r in rows])

        def put(x):  # x [B, T, D]: row b takes the clean vector at position pos[b]
            x = x.clone()
            x[torch.arange(len(pos)), pos] = src.to(device=x.device, dtype=x.dtype)[pos]
            return x

        batched.pre_hook(stack, batched.residual_input(lens, first), put)

    out[changed] = batched.variant_metrics(corrupt, len(changed), first, install, batch_size=batch_size,
                                           progress=report)
    return out


def _exact(site: str, clean: Trace, corrupt: Trace, batch_size, progress) -> torch.Tensor:
    lens = corrupt.lens
    n = lens.n_heads if site == "head" else len(corrupt)
    grid = torch.empty(lens.n_layers, n, dtype=torch.float64)
    total = lens.n_layers * n
    last = [0]

    def tell(k):  # progress(done, total), each count once (cells skipped as unchanged count as done)
        if progress is not None and k != last[0]:
            last[0] = k
            progress(k, total)

    for layer in range(lens.n_layers):
        done = layer * n

        def report(k, _, done=done):
            tell(done + k)

        if site == "head":
            grid[layer] = _head_layer(lens, clean, corrupt, layer, batch_size, report)
        else:
            grid[layer] = _resid_layer(lens, clean, corrupt, layer, site, batch_size, report)
        tell(done + n)
    return grid - corrupt.metric


def patching_sweep(lens, clean, corrupt, target=None, distractor=None, site: str = "post", method: str = "exact",
                   *, target_mode: str = "all", batch_size: int | None = None,
                   progress: Callable | None = None) -> PatchingSweep:
    """Patch the clean run's activations into the corrupt run, one cell at a time (see the module doc).

    clean, corrupt: prompts (str or segment lists) or unpatched Traces of this lens; they must tokenize
    to the same length. target / distractor / target_mode: as in `Lens.trace` (target None: the clean
    run's own top-1). site: "pre" | "mid" | "post" | "head". method: "exact" | "attribution".
    batch_size: variants per batched forward (default: ~4096 tokens per batch). progress(done, total):
    called as exact cells finish. Returns a `PatchingSweep`."""
    check_choice(site, SWEEP_SITES, "site")
    check_choice(method, METHODS, "method")
    if site == "mid" and lens.adapter.is_parallel(lens.model.config):
        raise LensvizError("site 'mid' is not a tensor of a parallel-residual block; use 'pre', 'post' or 'head'")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise LensvizError(f"batch_size must be a positive int or None, got {batch_size!r}")
    tr_clean, tr_corrupt = _traces(lens, clean, corrupt, target, distractor, target_mode, method == "attribution")
    if method == "attribution":
        effect = _attribution(site, tr_clean, tr_corrupt)
    else:
        effect = _exact(site, tr_clean, tr_corrupt, batch_size, progress)
    return PatchingSweep(effect=effect, metric_clean=float(tr_clean.metric), metric_corrupt=float(tr_corrupt.metric),
                         site=site, method=method, clean=tr_clean, corrupt=tr_corrupt)
