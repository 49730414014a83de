"""Activation patching: copy a residual site from a source trace (clean -> corrupt) into this run,
at chosen positions; and a sweep over layers x positions giving the effect grid on the target."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import SITES, check_index, check_positions
from ..errors import LensvizError
from ..hf import args_hidden
from ..trace import Trace
from .base import Patch, check_layers


@dataclass(frozen=True)
class ActivationPatch(Patch):
    """Replace resid(layer, site) by the `source` trace's at `positions`.

    positions: None = every position (source and this prompt must have the same length); a list of
    ints = those positions in both; a list of (position, source_position) pairs = chosen alignment.
    site "mid" needs a sequential block (in a parallel-residual block it is not a tensor of the graph).
    "mid" is the residual between attention and MLP as the block adds it: on families whose attention
    output passes a post-attention norm (Gemma 2/3, OLMo 2) the norm's output is set, and where a
    residual multiplier scales it (Granite) the attention output is set to (target - pre) / multiplier,
    so the residual after the addition is the source's exactly. In post-LN blocks (OPT-350m) mid is the
    post-attention LayerNorm's output LN_1(pre + attention output): that output is set.
    """

    source: Trace
    layer: int
    site: str = "post"
    positions: object = None
    applies_while_decoding = False

    def _pairs(self, n_tokens: int | None) -> list[tuple[int, int]]:
        n_src = len(self.source)
        n_tokens = n_src if n_tokens is None else n_tokens
        if self.positions is None:
            if n_src != n_tokens:
                raise LensvizError(f"source has {n_src} tokens and this prompt {n_tokens}: give positions "
                                   "(ints, or (position, source_position) pairs)")
            return [(i, i) for i in range(n_tokens)]
        items = [self.positions] if isinstance(self.positions, int) else list(self.positions)
        if not items:
            raise LensvizError("positions is empty")
        pairs = []
        for item in items:
            dst, src = (item, item) if not isinstance(item, (tuple, list)) else tuple(item)
            pairs.append((check_index(dst, n_tokens, "position"), check_index(src, n_src, "source position")))
        return pairs

    def validate(self, lens, n_tokens):
        if not isinstance(self.source, Trace) or self.source.lens is not lens:
            raise LensvizError("source must be a Trace made by the same Lens")
        check_index(self.layer, lens.n_layers, "layer")
        if self.site not in SITES:
            raise LensvizError(f"site must be one of {SITES}, got {self.site!r}")
        if self.site == "mid" and lens.adapter.is_parallel(lens.model.config):
            raise LensvizError("site 'mid' cannot be patched in a parallel-residual block; use 'pre' or 'post'")
        self._pairs(n_tokens)

    def first_layer(self, lens) -> int:
        layer = check_index(self.layer, lens.n_layers, "layer")
        return layer + 1 if self.site == "post" else layer

    def _values(self, n_tokens):
        pairs = self._pairs(n_tokens)
        dst = [d for d, _ in pairs]
        src = self.source.resid(self.layer, self.site)[[s for _, s in pairs]]
        return dst, src

    def install(self, ctx):
        lens = ctx.lens
        layer = check_index(self.layer, lens.n_layers, "layer")
        dst, src = self._values(len(ctx.input_ids))

        def put(x):
            x = x.clone()
            x[:, dst] = src.to(device=x.device, dtype=x.dtype)
            return x

        if self.site == "pre" or (self.site == "post" and layer + 1 < lens.n_layers):
            ctx.replace_block_input(layer if self.site == "pre" else layer + 1, put)
        elif self.site == "post":  # last block: its output is the final norm's input
            ctx.replace_input(lens.final_input_module, put)
        else:
            self._install_mid(ctx, layer, dst, src)

    @staticmethod
    def _install_mid(ctx, layer, dst, src):
        """mid = pre + w(attention output), w the write into the residual: the identity, Granite's
        m * y, or a post-attention norm N(y) (Gemma 2/3, OLMo 2). Set w's output to source_mid - pre at
        `dst`: on the post-norm's output where the family has one, else on the attention output
        divided by the multiplier m."""
        ad = ctx.adapter
        block_in = {}
        m = ad.multiplier(ctx.model.config)

        def keep_input(mod, args, kwargs):
            block_in["x"] = args_hidden(args, kwargs)

        def set_write(mod, args, output, scale):
            out = output[0] if isinstance(output, tuple) else output
            new = out.clone()
            x = block_in["x"]
            carried = 0 if ad.post_ln else x[:, dst]  # post-LN: the norm's output is mid itself
            new[:, dst] = ((src.to(device=out.device, dtype=out.dtype) - carried) / scale).to(out.dtype)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        ctx.pre_hook(ctx.block(layer), keep_input, with_kwargs=True)
        if ad.post_attn_norm is not None:
            ctx.forward_hook(ctx.part(layer, "post_attn_norm"), lambda mod, a, o: set_write(mod, a, o, 1.0))
        else:
            ctx.forward_hook(ctx.part(layer, "attn"), lambda mod, a, o: set_write(mod, a, o, m))


def activation_patching_sweep(lens, clean: Trace, corrupt, site: str = "post", layers=None,
                              positions=None) -> dict:
    """Patch resid(layer, site) at one position at a time from `clean` into the `corrupt` prompt (same
    token length) and measure the target's log-probability (the clean trace's target).

    Returns {"effect": Tensor[len(layers), len(positions)] = (lp_patched - lp_corrupt) / (lp_clean -
    lp_corrupt) (1 = fully restored), "logprob": the raw log-probs, "layers", "positions", "tokens",
    "clean_logprob", "corrupt_logprob"}. Runs are forward-only and reuse the corrupt run's blocks
    before the patched layer.
    """
    if not isinstance(clean, Trace):
        raise LensvizError("clean must be a Trace")
    base = corrupt if isinstance(corrupt, Trace) else lens.trace(corrupt, target=clean.target_id, backward=False)
    if len(base) != len(clean):
        raise LensvizError(f"clean has {len(clean)} tokens and corrupt {len(base)}: the sweep needs equal lengths")
    layers = check_layers(layers, lens)
    positions = check_positions(positions, len(clean)) or tuple(range(len(clean)))
    tid = clean.target_id

    def logprob(tr):
        return float(torch.log_softmax(tr.logits[-1].double(), -1)[tid])

    lp_clean, lp_corrupt = logprob(clean), logprob(base)
    grid = torch.zeros(len(layers), len(positions), dtype=torch.float64)
    for i, layer in enumerate(layers):
        for j, pos in enumerate(positions):
            patch = ActivationPatch(clean, layer, site, positions=[pos])
            tr = lens.trace(base.prompt, target=tid, patches=(patch,), backward=False, base=base)
            grid[i, j] = logprob(tr)
    denom = lp_clean - lp_corrupt
    effect = (grid - lp_corrupt) / denom if abs(denom) > 1e-12 else torch.full_like(grid, float("nan"))
    return {"effect": effect, "logprob": grid, "layers": list(layers), "positions": list(positions),
            "tokens": [base.tokens[p] for p in positions], "clean_logprob": lp_clean, "corrupt_logprob": lp_corrupt}
