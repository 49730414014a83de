"""Trace: what one forward + backward pass recorded (a capture `Recording`), and the maps derived from
it on demand.

Stored per layer: residuals (pre / mid / post), q, k, v after RoPE, the concatenated head outputs
before W_O, MLP activations, and the gradients at the residual sites and at the head outputs.
Attention A and Reversed Attention RA are computed per layer when asked, so a long prompt never
holds n_layers * H * T^2 floats.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import (attention_probs, causal_allowed, edited_probs, edited_scores, repeat_kv, softcap_slope,
                        softmax_rows)
from .capture import Recording
from .checks import check_index, check_index_list, check_site
from .errors import LensvizError
from .hf import module_device
from .vocab import TopK, project


@dataclass(eq=False)
class Trace:
    """One prompt run through the model: forward activations, gradients of the last-token NLL of
    `target`, and per-layer derived maps. All tensors are detached, on CPU, in the model dtype.

    `lens` is the Lens that made it; `recording` the raw capture (`capture.Recording`)."""

    tokens: list[str]
    input_ids: torch.Tensor  # [T]
    target: str
    segments: list[tuple[int, int]]
    has_backward: bool
    recording: Recording = field(repr=False)
    lens: object = field(repr=False)
    gradient: str = "standard"
    patches: tuple = ()
    prompt: object = None  # the prompt as given (str or list of segments)
    n_prompt: int | None = None  # the prompt's tokens; those after it are a multi-token target's, appended

    # what the run computed, and sizes -----------------------------------------------------------------
    target_id = property(lambda self: self.recording.target_id, doc="int: the (first) explained token's id")
    target_ids = property(lambda self: list(self.recording.target_ids),
                          doc="list[int]: every target token, explained at the last len(target_ids) positions")
    loss = property(lambda self: self.recording.loss,
                    doc="float: the target's NLL, L = -sum_k log softmax(logits[P-1+k])[target_k]")
    metric = property(lambda self: self.recording.metric,
                      doc="float: -loss, or logit(target) - logit(distractor) at the last position")
    distractor_id = property(lambda self: self.recording.distractor_id, doc="int or None: the distractor token")

    @property
    def distractor(self) -> str | None:
        """The distractor token's text (None without one)."""
        d = self.recording.distractor_id
        return None if d is None else self.lens.decode(d)

    @property
    def appended(self) -> list[int]:
        """Positions of the target tokens appended to the prompt (teacher forcing a multi-token target)."""
        return list(range(self.prompt_length, len(self)))

    @property
    def prompt_length(self) -> int:
        """P: the prompt's own tokens (the run holds P + len(target_ids) - 1)."""
        return len(self) if self.n_prompt is None else self.n_prompt

    @property
    def explained_positions(self) -> list[int]:
        """The positions whose next-token logits the loss reads: P-1 .. T-1."""
        return list(range(len(self) - len(self.recording.target_ids), len(self)))
    logits = property(lambda self: self.recording.logits, doc="Tensor [T, V]: the output logits")
    adapter = property(lambda self: self.lens.adapter, doc="Adapter: the family description")
    dims = property(lambda self: self.lens.dims, doc="Dims: the model sizes")
    n_layers = property(lambda self: self.lens.dims.n_layers)

    @property
    def layer_losses(self) -> list | None:
        """gradient="layer_causal": each layer's logit-lens NLL of the target (else None)."""
        losses = self.recording.layer_losses
        return None if losses is None else list(losses)

    def __len__(self) -> int:
        return len(self.tokens)

    def _layer(self, layer) -> int:
        return check_index(layer, self.n_layers, "layer")

    def _site(self, name: str, layer: int):
        return self.recording.at(name, layer)

    def _grad(self, name: str, layer: int) -> torch.Tensor:
        if not self.has_backward:
            raise LensvizError("this trace was run with backward=False: gradients were not recorded")
        return self._site(name, layer)

    # residual stream ---------------------------------------------------------------------------------
    def resid(self, layer: int, site: str = "post") -> torch.Tensor:
        """Residual stream [T, D] at `site`: "pre" block input, "mid" after attention, "post" block output
        (before the final norm). In post-LN blocks (OPT-350m) "mid" is the post-attention LayerNorm's
        output LN_1(pre + attention output), the MLP's input, and "post" LN_2(mid + MLP output)."""
        return self._site(check_site(site), self._layer(layer))

    def resid_grad(self, layer: int, site: str = "post") -> torch.Tensor:
        """dL/d resid(layer, site), [T, D]. With a parallel residual (GPT-NeoX) "mid" is not a tensor of
        the graph and its gradient equals the block output's."""
        return self._grad("g_" + check_site(site), self._layer(layer))

    # attention -------------------------------------------------------------------------------------
    def qkv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [H, T, d], k [H_kv, T, d], v [H_kv, T, d] as the attention saw them (q, k after RoPE)."""
        layer = self._layer(layer)
        return self._site("q", layer), self._site("k", layer), self._site("v", layer)

    def attention_scaling(self, layer: int) -> float:
        """The score multiplier s of this layer (1/sqrt(d), or GPT-2's per-layer variant)."""
        return self._site("scaling", self._layer(layer))

    def attention_mask(self, layer: int) -> torch.Tensor:
        """Bool [T, T], True where query i may attend key j in this layer (causal, segment masks included)."""
        t = len(self)
        return causal_allowed(self._site("mask", self._layer(layer)), t, t)

    def _edit(self, layer: int):
        return self.recording.attn_edits.get(layer)

    def _softmax(self, layer: int) -> torch.Tensor:
        """softmax of the (possibly patched, e.g. top-k; soft-capped; with sinks) scores: the A that
        Reversed Attention differentiates."""
        q, k, _ = self.qkv(layer)
        edit, scaling, allowed = self._edit(layer), self._site("scaling", layer), self.attention_mask(layer)
        softcap, sinks = self._site("softcap", layer), self._site("sinks", layer)
        if edit is None or not edit.edits_scores():
            return attention_probs(q, k, scaling, allowed, softcap, sinks)
        k = repeat_kv(k, q.shape[-3] // k.shape[-3])  # the same key selections and score edits as the run
        scores = edited_scores(q[None], k[None], scaling, allowed, edit, slice(0, len(self)), softcap)
        return softmax_rows(scores, sinks)[0]

    def attention(self, layer: int) -> torch.Tensor:
        """Attention probabilities A [H, T, T] the model used (rows sum to 1, or less with attention sinks;
        zero above the diagonal and outside sliding windows).
        Under an AttentionPatch this is A' = A + eta * P; under TopKAttention the sparsified softmax."""
        layer = self._layer(layer)
        return edited_probs(self._softmax(layer)[None], self._edit(layer), slice(0, len(self)))[0]

    def head_output_grad(self, layer: int) -> torch.Tensor:
        """delta_O [H, T, d]: dL/d of each head's output before W_O (the o_proj input)."""
        layer = self._layer(layer)
        g = self._grad("g_o", layer)
        return g.reshape(len(self), self.dims.n_heads, -1).transpose(0, 1)

    def reversed_attention(self, layer: int) -> torch.Tensor:
        """Reversed Attention RA [H, T, T] = dL/d(Q_h K_h^T), the gradient w.r.t. the unscaled scores:
        RA_h = s * A_h * (G_h - rowsum(A_h * G_h)) with G_h = delta_h V_h^T (GQA: V of kv head h // n_rep).
        With attention-logit soft-capping c (Gemma 2) the chain runs through the tanh: each entry is
        multiplied by 1 - tanh^2(s q.k / c). Rows sum to 0 (not with soft-capping, nor with sinks, which
        take their share of the softmax); zero above the diagonal."""
        layer = self._layer(layer)
        delta = self.head_output_grad(layer)
        a = self._softmax(layer)
        v = repeat_kv(self._site("v", layer), self.dims.n_heads // self.dims.n_kv_heads)
        g = torch.matmul(delta, v.transpose(-1, -2))
        scaling, softcap = self._site("scaling", layer), self._site("softcap", layer)
        ra = scaling * a * (g - (a * g).sum(-1, keepdim=True))
        if softcap is not None:
            q, k, _ = self.qkv(layer)
            ra = ra * softcap_slope(q, k, scaling, softcap)
        return ra

    def head_values(self, layer: int) -> torch.Tensor:
        """O_h [H, T, d]: each head's output before W_O, as the model fed it to the output projection
        (ablations included)."""
        layer = self._layer(layer)
        return self._site("o", layer).reshape(len(self), self.dims.n_heads, -1).transpose(0, 1)

    def head_outputs(self, layer: int) -> torch.Tensor:
        """Each head's write to the residual, `write(layer, "attn", O_h W_O,h)`: [H, T, D]. Their sum plus
        the written o_proj bias is the attention's write: resid "mid" = carried(layer, "attn") + that."""
        o = self.head_values(layer)  # [H, T, d]
        w = self.lens.weight(self._layer(layer), "o_proj")
        w_o = self.adapter.o_by_head(w, self.dims.n_heads, self.dims.d_head).to(o.dtype)
        return self.write(layer, "attn", torch.matmul(o, w_o))

    def _norm_input(self, layer: int, sublayer: str) -> torch.Tensor:
        """The post-norm's input x [T, D]: the raw sublayer output y, or residual + y in post-LN blocks."""
        y = self._site("attn_y" if sublayer == "attn" else "mlp_y", layer)
        if self.adapter.post_ln:
            y = self._site("pre" if sublayer == "attn" else "mid", layer) + y
        return y

    def write_scale(self, layer: int, sublayer: str) -> torch.Tensor:
        """The factor of the map from a part u of a sublayer's raw output (a head's O_h W_O,h, a neuron's
        a_n value_n, a bias) to its write to the residual, [T, D] (or a 0-d tensor); the map itself is
        `write` (u -> factor * P u, P the centring of a LayerNorm post-norm, else the identity).

        1 where the family adds outputs as they are; Granite's residual_multiplier m; with a post-norm
        (Gemma 2/3, OLMo 2; post-LN OPT) the norm with its scale frozen at this run's value, g * c(x) with
        c(x) = 1 / rms(x) (RMSNorm) or 1 / std(x) (LayerNorm) of the norm's input x: the summed output y,
        or in post-LN blocks the residual plus it. So the parts' writes (plus the carried residual and the
        norm's bias, `carried`) sum to the real output N(x), to the norm's precision (HF computes RMSNorm
        in float32). sublayer: "attn" or "mlp"."""
        layer = self._layer(layer)
        if sublayer not in ("attn", "mlp"):
            raise LensvizError(f"sublayer must be 'attn' or 'mlp', got {sublayer!r}")
        ad, config = self.adapter, self.lens.model.config
        norm_path = ad.post_attn_norm if sublayer == "attn" else ad.post_mlp_norm
        scale = torch.tensor(ad.multiplier(config), dtype=self._site("pre", layer).dtype)
        if norm_path is None:
            return scale
        x = self._norm_input(layer, sublayer)
        norm = ad.blocks_of(self.lens.model)[layer].get_submodule(norm_path)
        with torch.no_grad():
            return ad.frozen_norm_gain(norm, x.to(torch.float64)).to(x.dtype) * scale

    def write(self, layer: int, sublayer: str, u: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """The write to the residual of parts u of a sublayer's raw output: u [..., T, D] (position None)
        or u [..., D] read at `position` -> same shape, write_scale * P u (P: LayerNorm post-norms centre,
        see `Adapter.frozen_norm_write`; the identity otherwise)."""
        scale = self.write_scale(layer, sublayer)
        if position is not None and scale.dim() == 2:
            scale = scale[check_index(position, len(self), "position")]
        return self.adapter.frozen_norm_write(scale.to(u.dtype), u) if scale.dim() else u * scale.to(u.dtype)

    def carried(self, layer: int, sublayer: str) -> torch.Tensor:
        """The part of the residual after a sublayer that is not the sublayer's write, [T, D]: the residual
        before it (resid "pre" for "attn", "mid" for "mlp"; a parallel block's "mid" is pre + attention
        output), so that resid after = carried + the sublayer's write. In post-LN blocks (OPT-350m) the
        residual passes the frozen norm too: carried = write_scale * P r + b, b the norm's bias."""
        layer = self._layer(layer)
        if sublayer not in ("attn", "mlp"):
            raise LensvizError(f"sublayer must be 'attn' or 'mlp', got {sublayer!r}")
        r = self._site("pre" if sublayer == "attn" else "mid", layer)
        if not self.adapter.post_ln:
            return r
        out = self.write(layer, sublayer, r)
        b = self.adapter.post_norm_bias(self.lens.model, layer, sublayer)
        return out if b is None else out + b.to(out.dtype)

    def carry_back(self, layer: int, sublayer: str, u: torch.Tensor, position: int) -> torch.Tensor:
        """The transpose of the carried map at `position`: a direction u [D] read off the residual after the
        sublayer, as a direction on the residual before it (d(u . after) / d before with the norm's scale
        frozen). The identity except in post-LN blocks, where it is P (write_scale * u)."""
        if not self.adapter.post_ln:
            return u
        scale = self.write_scale(layer, sublayer)[check_index(position, len(self), "position")].to(u.dtype)
        v = scale * u
        return v - v.mean(-1, keepdim=True)

    # block inputs after the norms (recomputed on demand from the residual and the norm modules) -----
    def _normed(self, layer: int, norm_part: str, site: str) -> torch.Tensor:
        path = getattr(self.adapter, norm_part)
        if path is None:  # no norm before this sublayer (OLMo 2): it reads the residual itself
            return self._site(site, layer)
        module = self.adapter.blocks_of(self.lens.model)[layer].get_submodule(path)
        x = self._site(site, layer).to(module_device(module))
        with torch.no_grad():
            return module(x).to("cpu")

    def attn_input(self, layer: int) -> torch.Tensor:
        """X [T, D]: the input of the attention projections (the first norm applied to resid "pre")."""
        return self._normed(self._layer(layer), "ln1", "pre")

    def mlp_input(self, layer: int) -> torch.Tensor:
        """x [T, D]: the input of the MLP's first matrices (FF1 / up & gate), the second norm applied to
        resid "mid" (or to "pre" in a parallel-residual block)."""
        layer = self._layer(layer)
        return self._normed(layer, "ln2", "pre" if self.adapter.is_parallel(self.lens.model.config) else "mid")

    # MLP ---------------------------------------------------------------------------------------------
    def mlp_activations(self, layer: int) -> torch.Tensor:
        """a [T, F]: the input of the MLP's output matrix (after the nonlinearity / gating)."""
        if self.adapter.moe:
            raise LensvizError(f"{self.adapter.family} has a mixture-of-experts MLP: its neurons are per expert and "
                               "no single activation matrix is recorded (see trace.router(layer))")
        return self._site("a", self._layer(layer))

    def mlp_output_grad(self, layer: int) -> torch.Tensor:
        """delta [T, D] at the MLP output (the Backward Lens FF2 VJP). It equals the block output's
        gradient where the MLP output is added straight onto the residual; with a post-norm or a residual
        multiplier it is recorded at the MLP output itself."""
        layer = self._layer(layer)
        if self.has_backward and self._site("g_mlp", layer) is not None:
            return self._grad("g_mlp", layer)
        return self._grad("g_post", layer)

    def router(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixture-of-experts routing of a layer: (experts [T, k] long, weights [T, k]), the top-k experts
        each token was sent to and the router weights their outputs were multiplied by."""
        layer = self._layer(layer)
        if not self.adapter.moe:
            raise LensvizError(f"{self.adapter.family} has a dense MLP: there is no router")
        return self._site("router_experts", layer), self._site("router_weights", layer)

    # vocabulary --------------------------------------------------------------------------------------
    def logit_lens(self, k: int = 10, site: str = "post", positions=None) -> TopK:
        """Vocabulary projection proj(v) = softmax(W_U N_f(v)) of resid(l, site) for every layer l and
        position: `TopK` with leading dims [n_layers, T] and target_rank for this trace's target (cached).

        positions: None (all, cached) or an int / list / range of positions (negatives count from the end)
        -> leading dims [n_layers, len(positions)], the same cells in one batched projection of only those
        rows (sliced from the cached full grid where that exists; not cached itself)."""
        site = check_site(site)
        key = ("logit_lens", k, site)
        cache = self.__dict__.setdefault("_cache", {})
        if positions is not None:
            idx = torch.tensor(check_index_list(positions, len(self), "positions", "position", sort=False))
            if key in cache:
                full = cache[key]
                return TopK(ids=full.ids[:, idx], probs=full.probs[:, idx], target_rank=full.target_rank[:, idx],
                            _strings=self.lens.token_strings)
            rows = torch.stack([self._site(site, layer)[idx] for layer in range(self.n_layers)])
            return project(self.lens, rows, k, target=self.target_id)
        if key not in cache:
            stacked = torch.stack([self._site(site, layer) for layer in range(self.n_layers)])
            cache[key] = project(self.lens, stacked, k, target=self.target_id)
        return cache[key]

    def to_bertviz(self, kind: str = "forward", layers=None, *, scale: str | None = "head"):
        """Input for bertviz: `head_view(**trace.to_bertviz("reversed"))` (see lensviz.interop.bertviz)."""
        from .interop.bertviz import to_bertviz

        return to_bertviz(self, kind, layers, scale=scale)

    def __repr__(self) -> str:
        extra = f", distractor={self.distractor!r}, metric={self.metric:.4f}" if self.distractor_id is not None else ""
        return (f"Trace({len(self)} tokens, target={self.target!r}, loss={self.loss:.4f}{extra}, "
                f"layers={self.n_layers}, backward={self.has_backward})")
