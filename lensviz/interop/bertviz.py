"""bertviz interop: a Trace's forward attention A or Reversed Attention RA in the form bertviz's
`head_view` / `model_view` take (per-layer [1, H, T, T] tensors, the token list, include_layers).
bertviz itself is not imported here; install it to view (`pip install bertviz`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..checks import check_layer_list
from ..errors import LensvizError

KINDS = ("forward", "reversed")
SCALES = ("head", "layer", "all", None)


class BertvizInput(Mapping):
    """Keyword arguments for bertviz: `head_view(**x)` or `model_view(**x)`.

    attention: tuple of n_layers tensors [1, H, T, T] (one per model layer, so bertviz labels layers
        with their real index; layers not selected hold a zero placeholder that bertviz never reads,
        because include_layers leaves them out).
    tokens: list of T str (the trace's tokens; a newline shows as ↵, and "</" as "<\u2060/" so that a
        token cannot close bertviz's inline <script>).
    include_layers: the selected layers (sorted).
    kind, scale: what the weights are (see `to_bertviz`); not passed to bertviz.
    """

    _keys = ("attention", "tokens", "include_layers")

    def __init__(self, attention: tuple, tokens: list, include_layers: list, kind: str, scale):
        self.attention, self.tokens, self.include_layers = attention, tokens, include_layers
        self.kind, self.scale = kind, scale

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        shape = tuple(self.attention[self.include_layers[0]].shape)
        return (f"BertvizInput(kind={self.kind!r}, scale={self.scale!r}, layers={self.include_layers}, "
                f"shape per layer={shape})")


def _token(text: str) -> str:
    return text.replace("\n", "↵").replace("</", "<\u2060/")


def to_bertviz(trace, kind: str = "forward", layers=None, *, scale: str | None = "head") -> BertvizInput:
    """bertviz input for `trace`: `from bertviz import head_view; head_view(**to_bertviz(trace, "reversed"))`.

    kind="forward": the attention probabilities A the model used (rows sum to 1), as bertviz expects.
    kind="reversed": Reversed Attention. bertviz draws each weight as a line opacity in [0, 1], so by
        default (scale="head") it gets |RA| divided by the largest |RA| of that head: every head's
        strongest gradient entry is drawn opaque, and the sign is dropped (see it in
        `lensviz.plot.reversed_attention`, red = negative, blue = positive). scale="layer" divides by the
        largest |RA| of the layer (heads comparable within a layer), scale="all" by the largest |RA| of
        the selected layers (everything comparable). scale=None passes the signed raw RA = dL/d(q.k):
        the values are exact in the HTML but negative entries are drawn invisible and the rest very faint.
        A head whose RA is all zero stays zero.
    layers: None (all), an int, or a list of layer indices (negative allowed); others are left out of the
        view through bertviz's include_layers (and not computed).
    Returns a `BertvizInput` mapping with keys attention, tokens, include_layers.
    """
    if kind not in KINDS:
        raise LensvizError(f"kind must be one of {KINDS}, got {kind!r}")
    if scale not in SCALES:
        raise LensvizError(f"scale must be one of {SCALES}, got {scale!r}")
    chosen = check_layer_list(layers, trace.n_layers)
    maps = {}
    for layer in chosen:
        m = trace.attention(layer) if kind == "forward" else trace.reversed_attention(layer)
        if kind == "reversed" and scale is not None:
            m = m.abs()
            if scale == "head":
                m = m / m.flatten(1).amax(1).clamp_min(torch.finfo(m.dtype).tiny)[:, None, None]
        maps[layer] = m
    if kind == "reversed" and scale in ("layer", "all"):
        if scale == "layer":
            maps = {layer: m / m.max().clamp_min(torch.finfo(m.dtype).tiny) for layer, m in maps.items()}
        else:
            top = max(float(m.max()) for m in maps.values())
            maps = {layer: m / top if top > 0 else m for layer, m in maps.items()}
    first = maps[chosen[0]]
    placeholder = torch.zeros((), dtype=first.dtype).expand(1, *first.shape)
    attention = tuple(maps[layer][None] if layer in maps else placeholder for layer in range(trace.n_layers))
    return BertvizInput(attention, [_token(t) for t in trace.tokens], chosen, kind,
                        scale if kind == "reversed" else None)
