"""The Patch protocol: a frozen dataclass that installs itself into one run through a
`capture.PatchContext`, and says what it needs (a base trace, the prompt, a fixed prompt length).

A patch never touches weights; everything it installs is registered on the run's ExitStack and so
removed when the run ends, also when it raises (capture.run owns that stack).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..checks import check_index_list


@dataclass(frozen=True)
class Patch:
    """Base class of every intervention. Subclasses implement `install(ctx)`."""

    #: True when the patch needs an unpatched trace of the same prompt and target (ctx.base)
    needs_base = False
    #: True when lens.patched needs base=<a trace of the prompt> to know which tokens it acts on
    needs_prompt = False
    #: False when the patch acts on one prompt's [T]-sized positions or [T, T] maps and so cannot apply
    #: to generate's one-token decoding steps
    applies_while_decoding = True

    def validate(self, lens, n_tokens: int) -> None:
        """Raise LensvizError for values that do not fit this model / prompt (called before the run)."""

    def first_layer(self, lens) -> int:
        """The earliest block whose computation this patch changes (blocks before it may be reused)."""
        return 0

    def install(self, ctx) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def check_layers(layers, lens, what: str = "layers") -> tuple[int, ...]:
    """None -> every layer; an int or an iterable of ints -> checked, normalised, sorted, unique."""
    return tuple(check_index_list(layers, lens.n_layers, what, "layer"))


def check_heads(heads, lens) -> tuple[int, ...]:
    """None -> every head; an int or an iterable of ints -> checked, normalised, sorted, unique."""
    return tuple(check_index_list(heads, lens.n_heads, "heads", "head"))
