"""The Patch protocol: a frozen dataclass that installs itself into one run through a PatchContext.

A patch never touches weights; everything it installs is registered on the run's ExitStack and so
removed when the run ends, also when it raises (capture.run owns that stack).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import LensvizError
from ..trace import check_index, check_layer_list


@dataclass(frozen=True)
class Patch:
    """Base class of every intervention. Subclasses implement `install(ctx)`."""

    #: True when the patch needs an unpatched trace of the same prompt and target (ctx.base)
    needs_base = False

    def validate(self, lens, n_tokens: int) -> None:
        """Raise LensvizError for values that do not fit this model / prompt (called before the run)."""

    def first_layer(self, lens) -> int:
        """The earliest block whose computation this patch changes (blocks before it may be reused)."""
        return 0

    def install(self, ctx) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def check_layers(layers, lens, what: str = "layers") -> tuple[int, ...]:
    """None -> every layer; an int or an iterable of ints -> checked, normalised, sorted, unique."""
    return tuple(check_layer_list(layers, lens.n_layers, what=what))


def check_heads(heads, lens) -> tuple[int, ...]:
    if heads is None:
        return tuple(range(lens.n_heads))
    if isinstance(heads, int) and not isinstance(heads, bool):
        heads = [heads]
    try:
        items = list(heads)
    except TypeError:
        raise LensvizError(f"heads must be None, an int or a list of ints, got {heads!r}") from None
    if not items:
        raise LensvizError("heads is empty")
    return tuple(sorted({check_index(h, lens.n_heads, "head") for h in items}))


def check_number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise LensvizError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def check_positions(positions, n_tokens: int) -> tuple[int, ...] | None:
    if positions is None:
        return None
    if isinstance(positions, int) and not isinstance(positions, bool):
        positions = [positions]
    try:
        items = list(positions)
    except TypeError:
        raise LensvizError(f"positions must be None, an int or a list of ints, got {positions!r}") from None
    if n_tokens is None:  # length not known yet (lens.patched without a base): non-negative ints only
        if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in items):
            raise LensvizError(f"positions must be non-negative ints here, got {positions!r}")
        return tuple(sorted(set(items)))
    return tuple(sorted({check_index(p, n_tokens, "position") for p in items}))


def head_mask(heads: tuple[int, ...], n_heads: int, like):
    """[H, 1, 1] of 1.0 on the chosen heads, 0.0 elsewhere."""
    import torch

    m = torch.zeros(n_heads, 1, 1, dtype=like.dtype, device=like.device)
    m[list(heads)] = 1
    return m
