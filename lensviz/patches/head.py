"""Head activation patching: copy heads' outputs O_h (the input slice of W_O) from a source trace, the
head-site cell of a patching sweep (lensviz.sweeps, site "head") as one patch."""
from __future__ import annotations

from dataclasses import dataclass

from ..checks import check_index
from ..errors import LensvizError
from ..trace import Trace
from .base import Patch, check_heads


@dataclass(frozen=True)
class HeadPatch(Patch):
    """Replace the outputs O_h of `heads` in `layer` by the `source` trace's at every position (source
    and this prompt must have the same token length)."""

    source: Trace
    layer: int
    heads: object
    applies_while_decoding = False

    def validate(self, lens, n_tokens):
        if not isinstance(self.source, Trace) or self.source.lens is not lens:
            raise LensvizError("source must be a Trace made by the same Lens")
        check_index(self.layer, lens.n_layers, "layer")
        if self.heads is None:
            raise LensvizError("heads must be an int or a list of head indices")
        check_heads(self.heads, lens)
        if n_tokens is not None and len(self.source) != n_tokens:
            raise LensvizError(f"source has {len(self.source)} tokens and this prompt {n_tokens}: head patching "
                               "needs prompts of the same token length")

    def first_layer(self, lens) -> int:
        return check_index(self.layer, lens.n_layers, "layer")

    def install(self, ctx):
        heads = list(check_heads(self.heads, ctx.lens))
        src = self.source.head_values(self.first_layer(ctx.lens))[heads]  # [h, T, d]

        def put(out):  # [B, H, T, d]
            out = out.clone()
            out[:, heads] = src.to(device=out.device, dtype=out.dtype)
            return out

        ctx.rec.edit(self.first_layer(ctx.lens)).outputs.append(put)
