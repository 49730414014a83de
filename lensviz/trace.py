"""Trace: what one forward + backward pass recorded, and the maps derived from it on demand.

Stored per layer: residuals (pre / mid / post), q, k, v after RoPE, the concatenated head outputs
before W_O, MLP activations, and the gradients at the residual sites and at the head outputs.
Attention A and Reversed Attention RA are computed per layer when asked, so a long prompt never
holds n_layers * H * T^2 floats.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch

from .adapters import Adapter, Dims
from .capture import attention_probs, causal_allowed, repeat_kv
from .errors import LensvizError

SITES = ("pre", "mid", "post")


def check_index(value, size: int, what: str) -> int:
    """A 0-based index into `size` items (negative counts from the end), or a LensvizError."""
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


def check_layer_list(layers, n_layers: int, *, sort: bool = True, what: str = "layers") -> list[int]:
    """None -> every layer; an int -> [it]; a non-empty list, tuple, range or other iterable of ints
    (numpy / tensor indices too) -> checked indices (negatives resolved), sorted and de-duplicated unless
    sort=False (then in the given order). `what` names the argument in error messages."""
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if isinstance(layers, (str, bytes, dict)):
        items = None
    else:
        try:
            items = list(layers)
        except TypeError:
            items = None
    if not items:
        raise LensvizError(f"{what} must be None, an int or a non-empty list of ints, got {layers!r}")
    checked = [check_index(layer, n_layers, "layer") for layer in items]
    return sorted(set(checked)) if sort else checked


def check_site(site) -> str:
    if site not in SITES:
        raise LensvizError(f"site must be one of {SITES}, got {site!r}")
    return site


@dataclass(eq=False)
class Trace:
    """One prompt run through the model: forward activations, gradients of the last-token NLL of
    `target`, and per-layer derived maps. All tensors are detached, on CPU, in the model dtype."""

    tokens: list[str]
    input_ids: torch.Tensor  # [T]
    target_id: int
    target: str
    loss: float
    logits: torch.Tensor  # [T, V]
    segments: list[tuple[int, int]]
    has_backward: bool
    _data: dict = field(repr=False)
    _lens: object = field(repr=False)
    gradient: str = "standard"
    patches: tuple = ()
    layer_losses: list | None = None  # gradient="layer_causal": each layer's logit-lens NLL of the target
    prompt: object = None  # the prompt as given (str or list of segments)

    # shape helpers ---------------------------------------------------------------------------------
    @property
    def adapter(self) -> Adapter:
        return self._lens.adapter

    @property
    def dims(self) -> Dims:
        return self._lens.dims

    @property
    def n_layers(self) -> int:
        return self.dims.n_layers

    def __len__(self) -> int:
        return len(self.tokens)

    def _layer(self, layer) -> int:
        return check_index(layer, self.n_layers, "layer")

    def _grad(self, name: str, layer: int) -> torch.Tensor:
        if not self.has_backward:
            raise LensvizError("this trace was run with backward=False: gradients were not recorded")
        return self._data[name][layer]

    # residual stream ---------------------------------------------------------------------------------
    def resid(self, layer: int, site: str = "post") -> torch.Tensor:
        """Residual stream [T, D] at `site`: "pre" block input, "mid" after attention, "post" block output
        (before the final norm)."""
        return self._data[check_site(site)][self._layer(layer)]

    def resid_grad(self, layer: int, site: str = "post") -> torch.Tensor:
        """dL/d resid(layer, site), [T, D]. With a parallel residual (GPT-NeoX) "mid" is not a tensor of
        the graph and its gradient equals the block output's."""
        return self._grad("g_" + check_site(site), self._layer(layer))

    # attention -------------------------------------------------------------------------------------
    def qkv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [H, T, d], k [H_kv, T, d], v [H_kv, T, d] as the attention saw them (q, k after RoPE)."""
        layer = self._layer(layer)
        return self._data["q"][layer], self._data["k"][layer], self._data["v"][layer]

    def attention_scaling(self, layer: int) -> float:
        """The score multiplier s of this layer (1/sqrt(d), or GPT-2's per-layer variant)."""
        return self._data["scaling"][self._layer(layer)]

    def _allowed(self, layer: int) -> torch.Tensor:
        t = len(self)
        return causal_allowed(self._data["mask"][layer], t, t)

    def _edit(self, layer: int):
        return self._data.get("attn_edits", {}).get(layer)

    def _softmax(self, layer: int) -> torch.Tensor:
        """softmax of the (possibly patched, e.g. top-k) scores: the A that Reversed Attention differentiates."""
        q, k, _ = self.qkv(layer)
        edit = self._edit(layer)
        if edit is None or not (edit.scores or edit.keep):
            return attention_probs(q, k, self._data["scaling"][layer], self._allowed(layer))
        from .capture import kept_keys  # the same key selections and score edits as the run

        k = repeat_kv(k, q.shape[-3] // k.shape[-3])
        scores = torch.matmul(q, k.transpose(-1, -2)) * self._data["scaling"][layer]
        scores = scores.masked_fill(~self._allowed(layer), float("-inf"))[None]
        if edit.keep:
            scores = scores.masked_fill(~kept_keys(scores, edit.keep), float("-inf"))
        for fn in edit.scores:
            scores = fn(scores, slice(0, len(self)))
        return torch.softmax(scores, dim=-1)[0]

    def attention(self, layer: int) -> torch.Tensor:
        """Attention probabilities A [H, T, T] the model used (rows sum to 1; zero above the diagonal).
        Under an AttentionPatch this is A' = A + eta * P; under TopKAttention the sparsified softmax."""
        layer = self._layer(layer)
        probs = self._softmax(layer)
        edit = self._edit(layer)
        for fn in (edit.probs if edit is not None else ()):
            probs = fn(probs[None], slice(0, len(self)))[0]
        for p in (edit.added if edit is not None else ()):
            probs = probs + p.to(probs.dtype)
        return probs

    def head_output_grad(self, layer: int) -> torch.Tensor:
        """delta_O [H, T, d]: dL/d of each head's output before W_O (the o_proj input)."""
        layer = self._layer(layer)
        g = self._grad("g_o", layer)
        return g.reshape(len(self), self.dims.n_heads, -1).transpose(0, 1)

    def reversed_attention(self, layer: int) -> torch.Tensor:
        """Reversed Attention RA [H, T, T] = dL/d(Q_h K_h^T), the gradient w.r.t. the unscaled scores:
        RA_h = s * A_h * (G_h - rowsum(A_h * G_h)) with G_h = delta_h V_h^T (GQA: V of kv head h // n_rep).
        Rows sum to 0; zero above the diagonal."""
        layer = self._layer(layer)
        delta = self.head_output_grad(layer)
        a = self._softmax(layer)
        v = repeat_kv(self._data["v"][layer], self.dims.n_heads // self.dims.n_kv_heads)
        g = torch.matmul(delta, v.transpose(-1, -2))
        return self._data["scaling"][layer] * a * (g - (a * g).sum(-1, keepdim=True))

    def head_values(self, layer: int) -> torch.Tensor:
        """O_h [H, T, d]: each head's output before W_O, as the model fed it to the output projection
        (ablations included)."""
        layer = self._layer(layer)
        return self._data["o"][layer].reshape(len(self), self.dims.n_heads, -1).transpose(0, 1)

    def head_outputs(self, layer: int) -> torch.Tensor:
        """Each head's write to the residual, O_h W_O,h: [H, T, D]. Their sum plus the o_proj bias is the
        attention output."""
        layer = self._layer(layer)
        o = self._data["o"][layer].reshape(len(self), self.dims.n_heads, -1).transpose(0, 1)  # [H, T, d]
        w = self._lens.weight(layer, "o_proj")
        w_o = self.adapter.o_by_head(w, self.dims.n_heads, self.dims.d_head).to(o.dtype)
        return torch.matmul(o, w_o)

    # block inputs after the norms (recomputed on demand from the residual and the norm modules) -----
    def _normed(self, layer: int, norm_part: str, site: str) -> torch.Tensor:
        module = self.adapter.blocks_of(self._lens.model)[layer].get_submodule(getattr(self.adapter, norm_part))
        from .capture import module_device

        x = self._data[site][layer].to(module_device(module))
        with torch.no_grad():
            return module(x).to("cpu")

    def attn_input(self, layer: int) -> torch.Tensor:
        """X [T, D]: the input of the attention projections (the first norm applied to resid "pre")."""
        return self._normed(self._layer(layer), "ln1", "pre")

    def mlp_input(self, layer: int) -> torch.Tensor:
        """x [T, D]: the input of the MLP's first matrices (FF1 / up & gate), the second norm applied to
        resid "mid" (or to "pre" in a parallel-residual block)."""
        layer = self._layer(layer)
        return self._normed(layer, "ln2", "pre" if self.adapter.is_parallel(self._lens.model.config) else "mid")

    # MLP ---------------------------------------------------------------------------------------------
    def mlp_activations(self, layer: int) -> torch.Tensor:
        """a [T, F]: the input of the MLP's output matrix (after the nonlinearity / gating)."""
        return self._data["a"][self._layer(layer)]

    def mlp_output_grad(self, layer: int) -> torch.Tensor:
        """delta [T, D] at the MLP output (the Backward Lens FF2 VJP). It equals the block output's
        gradient, since the MLP output is added straight onto the residual."""
        return self._grad("g_post", self._layer(layer))

    # vocabulary --------------------------------------------------------------------------------------
    def logit_lens(self, k: int = 10, site: str = "post"):
        """Vocabulary projection of resid(l, site) for every layer l and position: `TopK` with leading
        dims [n_layers, T] and target_rank for this trace's target."""
        from .lenses.vocab import logit_lens

        key = ("logit_lens", k, site)
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = logit_lens(self, k, site)
        return cache[key]

    def to_bertviz(self, kind: str = "forward", layers=None, *, scale: str | None = "head"):
        """Input for bertviz: `head_view(**trace.to_bertviz("reversed"))` (see lensviz.interop.bertviz)."""
        from .interop.bertviz import to_bertviz

        return to_bertviz(self, kind, layers, scale=scale)

    def __repr__(self) -> str:
        return (f"Trace({len(self)} tokens, target={self.target!r}, loss={self.loss:.4f}, "
                f"layers={self.n_layers}, backward={self.has_backward})")
