"""Argument checks at the public edge: indices, index lists, numbers, sites and token ids.

Each check returns the plain value the inside works with (a resolved int, a sorted list, a float) or
raises `LensvizError` naming the argument and what is allowed, so the same bad input gives the same
error wherever it is passed.
"""
from __future__ import annotations

import math
import numbers
import operator

from .errors import LensvizError

SITES = ("pre", "mid", "post")


def check_index(value, size: int, what: str) -> int:
    """A 0-based index into `size` items (negative counts from the end; numpy and 0-d tensor integers
    too) -> the index in [0, size), or a LensvizError."""
    ok = not isinstance(value, bool) and hasattr(value, "__index__")
    if ok:
        try:
            value = operator.index(value)  # int, numpy integer, integer 0-d tensor
        except TypeError:
            ok = False
    if not ok:
        raise LensvizError(f"{what} must be an int in [{-size}, {size - 1}], got {value!r}")
    if not -size <= value < size:
        raise LensvizError(f"{what} {value} is out of range: this model has {size} ({-size}..{size - 1} allowed)")
    return value % size


def _items(values, what: str) -> list:
    """An int -> [it]; a list, tuple, range or other iterable (not a str or dict) -> its items."""
    if isinstance(values, int) and not isinstance(values, bool):
        return [values]
    items = None
    if not isinstance(values, (str, bytes, dict)):
        try:
            items = list(values)
        except TypeError:
            items = None
    if not items:
        raise LensvizError(f"{what} must be None, an int or a non-empty list of ints, got {values!r}")
    return items


def check_index_list(values, size: int, what: str, item: str, *, sort: bool = True) -> list[int]:
    """None -> all of range(size); an int -> [it]; a non-empty iterable of ints (numpy / tensor indices
    too) -> checked indices (negatives resolved), sorted and de-duplicated unless sort=False (then in
    the given order). `what` names the argument, `item` one of its entries ("layer", "head", ...)."""
    if values is None:
        return list(range(size))
    checked = [check_index(v, size, item) for v in _items(values, what)]
    return sorted(set(checked)) if sort else checked


def check_layer_list(layers, n_layers: int, *, sort: bool = True, what: str = "layers") -> list[int]:
    """`check_index_list` for layers."""
    return check_index_list(layers, n_layers, what, "layer", sort=sort)


def check_positions(positions, n_tokens: int | None) -> tuple[int, ...] | None:
    """None -> None (every position); an int or a list -> sorted unique positions. With n_tokens None (the
    prompt length is not known yet) only non-negative ints are accepted."""
    if positions is None:
        return None
    items = _items(positions, "positions")
    if n_tokens is None:
        if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in items):
            raise LensvizError(f"positions must be non-negative ints here, got {positions!r}")
        return tuple(sorted(set(items)))
    return tuple(sorted({check_index(p, n_tokens, "position") for p in items}))


def check_site(site) -> str:
    """One of SITES ("pre", "mid", "post")."""
    if site not in SITES:
        raise LensvizError(f"site must be one of {SITES}, got {site!r}")
    return site


def check_number(value, what: str) -> float:
    """A finite real number (not a bool) -> float."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value))):
        raise LensvizError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def check_int(value, what: str, low: int = 0, high: int | None = None) -> int:
    """An int (numpy integers too, not a bool) in [low, high] (high None: no upper bound)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or int(value) < low or (high is not None and int(value) > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise LensvizError(f"{what} must be an int {span}, got {value!r}")
    return int(value)


def check_choice(value, allowed: tuple, what: str):
    """One of `allowed` (compared with ==; a non-hashable value is simply not allowed)."""
    if not any(value is a or (isinstance(value, type(a)) and value == a) for a in allowed):
        raise LensvizError(f"{what} must be one of {allowed}, got {value!r}")
    return value


def check_dims(dims, size: int, what: str = "dims"):
    """Indices in [0, size) as LongTensor [n]: an int gives [1]; lists, numpy arrays and integer tensors
    are accepted (no negative indices)."""
    import torch

    if isinstance(dims, bool):
        raise LensvizError(f"{what} must be an int or a list of ints in [0, {size - 1}], got {dims!r}")
    t = torch.as_tensor(dims).reshape(-1)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise LensvizError(f"{what} must be ints in [0, {size - 1}], got {dims!r}")
    t = t.long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= size):
        raise LensvizError(f"{what} must be in [0, {size - 1}], got {dims!r}")
    return t


def check_token_ids(ids, vocab_size: int, what: str) -> None:
    """Every id in [0, vocab_size), else a LensvizError blaming the tokenizer that made them."""
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise LensvizError(
            f"the tokenizer turned {what} into token id {bad[0]}, outside the model's vocabulary "
            f"[0, {vocab_size - 1}]: is this tokenizer the model's own?")
