"""The Adapter: per-architecture knowledge as data.

An adapter maps lensviz's canonical parts (embedding, blocks, attention projections, MLP matrices,
norms, unembedding) to dotted paths in a Hugging Face module tree, plus a few layout flags.
Capture and lenses read only this description; nothing else in lensviz branches on `model_type`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import LensvizError

QK_NORM_NAMES = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")  # attention children that normalise q / k
Layout = str  # "linear": y = x W^T + b, W [out, in];  "conv1d": y = x W + b, W [in, out]


@dataclass(frozen=True)
class Dims:
    """Sizes read off a model config."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    vocab_size: int


@dataclass(frozen=True, eq=False)
class ProjSlice:
    """Where the q, k or v projection of one block lives among its parameters.

    `path` is block-level (e.g. "self_attn.k_proj", GPT-2 "attn.c_attn"), `name` the parameter
    ("weight" or "bias"; the bias entry is listed even where the family has none: check it exists),
    `dim` the axis of that parameter holding the projection's output features, and `index` the output
    features [n] (LongTensor) that belong to `role`, or None when the whole parameter is that role's."""

    role: str  # "q" | "k" | "v"
    path: str
    name: str
    dim: int
    index: torch.Tensor | None = None


def text_config(config):
    """The language model's config: the text sub-config of a multimodal checkpoint (Gemma 3), else itself."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _default_d_mlp(config) -> int:
    return int(config.intermediate_size)


@dataclass(frozen=True)
class Adapter:
    """How one architecture family is laid out in its HF module tree.

    Model-level paths are relative to the `...ForCausalLM` module; block-level paths are relative to
    one decoder block. Fused q/k/v projections name `qkv` and a `qkv_split` rule instead of q/k/v.
    """

    family: str
    model_types: tuple[str, ...]
    # model level
    embed: str
    blocks: str
    final_norm: str | None  # None: no final norm (post-LayerNorm OPT): the last block output is read as it is
    unembed: str
    # block level
    ln1: str | None  # None: the sublayer reads the residual itself (OLMo 2)
    attn: str
    ln2: str | None
    mlp: str | None  # None: no MLP module, see mlp_seq (OPT)
    o_proj: str
    mlp_in: str | None  # None on MoE families (per-expert matrices)
    mlp_out: str | None
    mlp_gate: str | None = None
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    qkv: str | None = None
    qkv_split: str | None = None  # "concat" (GPT-2, Phi-3: [q | k | v]) or "per_head" (NeoX: per head [q k v])
    # maths of the block (each one declared here is checked by tests/test_conformance.py)
    query_scale: Callable | None = None  # config -> c: the attention sees q = c * q_proj(x), scaling 1 (OPT)
    mlp_seq: tuple[str, ...] | None = None  # no MLP module (OPT): block-level modules applied in order
    gate_up: bool = False  # mlp_in is one fused [gate | up] matrix (Phi-3 gate_up_proj): gate rows first
    post_attn_norm: str | None = None  # a norm applied to the attention output before the residual add
    post_mlp_norm: str | None = None  # a norm applied to the MLP output before the residual add
    residual_multiplier: str | None = None  # config attribute m: residual += m * sublayer output (Granite)
    # post-LayerNorm blocks (OPT-350m): the post norms read residual + sublayer output and their output *is*
    # the residual (r' = N(r + y)), so the residual itself is renormalised; see `frozen_norm_gain`
    post_ln: bool = False
    # projected embeddings (OPT-350m): bias-free linear maps between the residual stream (D) and the
    # (un)embedding (D_e): input embeddings are embed_proj(W_E[t]), logits W_U unembed_proj(N_f(h))
    embed_proj: str | None = None
    unembed_proj: str | None = None
    moe: bool = False  # mixture-of-experts MLP: `mlp` holds a router and experts (no single mlp_out matrix)
    router: str | None = None  # block-level router module (MoE): returns (logits, top-k weights, top-k experts)
    experts: str | None = None  # block-level experts module (MoE), called as experts(x [n, D], experts, weights)
    # expert e's matrices: parameters [E, ...] of the experts module named (FF1 weight, FF1 bias or None,
    # FF2 weight, FF2 bias or None); expert_layout is the layout of one slice param[e] ("linear" [out, in])
    expert_params: tuple | None = None
    expert_layout: Layout = "linear"
    expert_act: Callable | None = None  # (experts module, h [n, F1]) -> a [n, F]: FF1 outputs -> activations
    expert_gate_up: str = "chunk"  # where an expert's FF1 outputs keep gate and up: "chunk" [gate | up], "interleave"
    # vocabulary head: logits = transform(unembed(final_norm(h)))
    logit_softcap: str | None = None  # config attribute c: logits = c * tanh(logits / c) (Gemma 2/3)
    logit_scale: str | None = None  # config attribute: logits *= it (Cohere)
    logit_divisor: str | None = None  # config attribute: logits /= it (Granite)
    # layout flags
    weight_layout: Layout = "linear"
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_gain_offset: float = 0.0  # RMSNorm gain is (offset + weight): Gemma's (1 + w)
    rotary: bool = True
    parallel_residual: bool | str = False  # bool, or the name of a boolean config attribute
    d_mlp: Callable = _default_d_mlp
    check: Callable | None = None  # check(config) raises UnsupportedModelError for unsupported variants
    variant: Callable | None = None  # variant(config) -> the Adapter for this config (e.g. post-LN OPT), or None
    notes: str = ""

    # ----------------------------------------------------------------------------------------------
    def dims(self, config) -> Dims:
        config = text_config(config)
        n_heads = int(config.num_attention_heads)
        d_model = int(config.hidden_size)
        head_dim = getattr(config, "head_dim", None) or d_model // n_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        return Dims(
            n_layers=int(config.num_hidden_layers),
            n_heads=n_heads,
            n_kv_heads=int(n_kv),
            d_model=d_model,
            d_head=int(head_dim),
            d_mlp=int(self.d_mlp(config)),
            vocab_size=int(config.vocab_size),
        )

    def multiplier(self, config) -> float:
        """The factor m of `residual += m * sublayer(x)` (1 unless the family declares one)."""
        return 1.0 if self.residual_multiplier is None else float(getattr(text_config(config), self.residual_multiplier))

    def has_plain_writes(self, config) -> bool:
        """True when each sublayer's output is added to the residual as it is (no post-norm, no multiplier)."""
        return self.post_attn_norm is None and self.post_mlp_norm is None and self.multiplier(config) == 1.0

    def finish_logits(self, config, logits: torch.Tensor) -> torch.Tensor:
        """Apply the family's logit transform (scaling, soft-capping) to unembedding outputs."""
        config = text_config(config)
        if self.logit_scale is not None:
            logits = logits * float(getattr(config, self.logit_scale))
        if self.logit_divisor is not None:
            logits = logits / float(getattr(config, self.logit_divisor))
        cap = None if self.logit_softcap is None else getattr(config, self.logit_softcap, None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def has_logit_transform(self, config) -> bool:
        config = text_config(config)
        return (self.logit_scale is not None or self.logit_divisor is not None
                or (self.logit_softcap is not None and getattr(config, self.logit_softcap, None) is not None))

    def vocab_logits(self, model, h: torch.Tensor, *, normed: bool = False) -> torch.Tensor:
        """logits of residual vectors h [..., D]: final norm (unless `normed`; none in post-LN OPT), the
        projection out of the residual (OPT-350m's project_out), unembedding and the logit transform,
        exactly as the model computes its output."""
        if not normed and self.final_norm is not None:
            h = model.get_submodule(self.final_norm)(h)
        if self.unembed_proj is not None:
            h = model.get_submodule(self.unembed_proj)(h)
        return self.finish_logits(model.config, model.get_submodule(self.unembed)(h))

    @property
    def final_input(self) -> str:
        """The model-level module whose hidden-states input is the last block's output: the final norm, or
        (without one) the projection out of the residual, or the unembedding."""
        return self.final_norm or self.unembed_proj or self.unembed

    @property
    def mlp_reader(self) -> str:
        """The block-level module whose input is resid "mid" in a sequential block: the second norm, or
        (without one) the MLP itself, or the first module of a module-less MLP (post-LN OPT's fc1)."""
        return self.ln2 or self.mlp or self.mlp_seq[0]

    def unembedding_matrix(self, model) -> torch.Tensor:
        """W_U in residual space, [V, D] detached: the unembedding weight composed with the projection out
        of the residual where the family has one (W_U W_out, OPT-350m), so logits = h @ it.T (+ bias)."""
        w = model.get_submodule(self.unembed).weight.detach()
        if self.unembed_proj is not None:
            proj = model.get_submodule(self.unembed_proj)
            if getattr(proj, "bias", None) is not None:
                raise LensvizError(f"{self.family}: the projection {self.unembed_proj} has a bias; "
                                   "an embedding-space matrix needs a linear map")
            w = w @ proj.weight.detach().to(w.dtype)
        return w

    def embedding_matrix(self, model) -> torch.Tensor:
        """The input embedding in residual space, [V, D] detached: W_E, or W_E W_in^T through the projection
        into the residual (OPT-350m's project_in), so token t enters the residual as row t (plus positions)."""
        w = model.get_submodule(self.embed).weight.detach()
        if self.embed_proj is not None:
            proj = model.get_submodule(self.embed_proj)
            if getattr(proj, "bias", None) is not None:
                raise LensvizError(f"{self.family}: the projection {self.embed_proj} has a bias; "
                                   "an embedding-space matrix needs a linear map")
            w = w @ proj.weight.detach().to(w.dtype).T
        return w

    def mlp_module(self, block) -> Callable:
        """The callable MLP of one block: x [.., D] -> MLP output [.., D] (before any post-norm)."""
        if self.mlp_seq is None:
            return block.get_submodule(self.mlp)
        mods = [block.get_submodule(p) for p in self.mlp_seq]

        def mlp(x):
            for m in mods:
                x = m(x)
            return x

        return mlp

    def frozen_norm_gain(self, norm_module, x: torch.Tensor) -> torch.Tensor:
        """A post-norm as a per-position linear map with its scale frozen at this run, given its input x
        [T, D] (the sublayer output y; in post-LN blocks the residual plus it, x = r + y). Returns the
        factor f = g * c(x) [T, D] of the map u -> f * P u (see `frozen_norm_write`):

        - RMSNorm: N(x) = g * x * c(x), c(x) = 1 / sqrt(mean(x^2) + eps), P = I;
        - LayerNorm: N(x) = g * P x * c(x) + b, c(x) = 1 / sqrt(var(x) + eps) (biased variance), P the
          centring u -> u - mean(u); the bias b is a constant of the position (`post_norm_bias`).

        So for x = sum_i u_i every part writes f * P u_i and the parts plus b sum to N(x) exactly (to the
        norm's own precision); in post-LN blocks the residual r is one of the parts (the carried term)."""
        eps = getattr(norm_module, "eps", None)
        eps = getattr(norm_module, "variance_epsilon", 1e-6) if eps is None else eps
        weight = getattr(norm_module, "weight", None)
        gain = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device) if weight is None else \
            weight.detach().to(device=x.device, dtype=x.dtype)
        if self.norm == "layernorm":
            scale = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
        else:
            scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            gain = self.norm_gain_offset + gain
        return gain * scale

    def frozen_norm_write(self, factor: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Apply a frozen post-norm map to parts u [..., D]: factor * P u with P the centring for LayerNorm
        (u - mean(u) over the last axis), the identity for RMSNorm; factor broadcasts against u."""
        if self.norm == "layernorm":
            u = u - u.mean(-1, keepdim=True)
        return factor * u

    def post_norm_bias(self, model, layer: int, sublayer: str) -> torch.Tensor | None:
        """The additive bias b [D] of block `layer`'s post-attention ("attn") or post-MLP ("mlp") norm
        (LayerNorm), detached on CPU; None where there is none."""
        path = self.post_attn_norm if sublayer == "attn" else self.post_mlp_norm
        if path is None:
            return None
        b = getattr(self.blocks_of(model)[layer].get_submodule(path), "bias", None)
        return None if b is None else b.detach().to("cpu")

    def qk_normed(self, model) -> bool:
        """Whether the attention normalises q and k after projecting them (Qwen 3, OLMo 2, Gemma 3, Phi /
        StableLM `qk_layernorm`, Cohere `use_qk_norm`): read off the module tree."""
        attn = self.blocks_of(model)[0].get_submodule(self.attn)
        return any(getattr(attn, name, None) is not None for name in QK_NORM_NAMES)

    def post_norm_gain(self, model, layer: int, sublayer: str) -> torch.Tensor | None:
        """The gain g [D] (Gemma: 1 + w) of block `layer`'s post-attention (sublayer "attn") or post-MLP
        ("mlp") norm, detached on CPU; None where the family has none."""
        path = self.post_attn_norm if sublayer == "attn" else self.post_mlp_norm
        if path is None:
            return None
        w = getattr(self.blocks_of(model)[layer].get_submodule(path), "weight", None)
        return None if w is None else w.detach().to("cpu") + self.norm_gain_offset

    def post_norm_fold(self, model, layer: int, sublayer: str, w: torch.Tensor) -> torch.Tensor:
        """Written rows w [..., D] through block `layer`'s post-attention ("attn") or post-MLP ("mlp")
        norm as the weight-only lenses read it: w @ M with M = P diag(g), P = I - 11^T / D the centring of
        a LayerNorm (the identity for RMSNorm), i.e. (w - mean(w)) * g; w unchanged where the family has
        no such norm. Each row then is its write up to the positive per-position factor c(x) of
        `frozen_norm_gain` (and the norm's bias, dropped like every bias in those lenses)."""
        g = self.post_norm_gain(model, layer, sublayer)
        if g is None:
            return w
        return self.frozen_norm_write(g.to(w.dtype), w)

    def qk_norm_maps(self, model, layer: int, dims: Dims) -> dict:
        """The q/k norms of block `layer` as linear maps, for weight-only lenses: {"q": M [H, d, d] or None,
        "k": M [H_kv, d, d] or None} (None: no norm on that side). A q/k norm turns head h's projection
        q into g_h * P q / s(q) + b_h, with P = I - 11^T / d the centring of LayerNorm-type norms (Phi,
        StableLM, Cohere; P = I for RMSNorm: Qwen 3, OLMo 2, Gemma 3), g_h its gain (Gemma's 1 + w; per
        head in StableLM / Cohere, per channel over all heads in OLMo 2) and s(q) > 0 its scale. So
        W_Q @ M_h with M_h = P diag(g_h) is the normed query map up to the positive factor 1 / s(q) and the
        norm's bias (dropped, like every bias in the weight-only lenses); q/k norms come before RoPE."""
        attn = self.blocks_of(model)[layer].get_submodule(self.attn)
        out = {}
        for side, n in (("q", dims.n_heads), ("k", dims.n_kv_heads)):
            norm = next((getattr(attn, name) for name in (f"{side}_norm", f"{side}_layernorm")
                         if getattr(attn, name, None) is not None), None)
            if norm is None:
                out[side] = None
                continue
            d = dims.d_head
            per_head = getattr(norm, "norms", None)  # StableLM: one LayerNorm per head
            if per_head is not None:
                gains = torch.stack([m.weight.detach() for m in per_head]).to("cpu")
            else:
                w = getattr(norm, "weight", None)
                w = torch.ones(d, dtype=torch.float64) if w is None else w.detach().to("cpu")
                gains = w.reshape(-1, d).expand(n, d) if w.numel() in (d, n * d) else None
                if gains is None:
                    raise LensvizError(f"{self.family}: a {side} norm weight of shape {tuple(w.shape)} does not fit "
                                       f"{n} heads of {d}")
                gains = gains + (self.norm_gain_offset if "rms" in type(norm).__name__.lower() else 0.0)
            m = torch.diag_embed(gains)
            if "rms" not in type(norm).__name__.lower():  # LayerNorm-type: centre over the head's d entries
                centre = torch.eye(d, dtype=m.dtype) - 1.0 / d
                m = centre @ m
            out[side] = m
        return out

    def n_experts(self, config) -> int:
        """The number of experts of a MoE family (0 for dense MLPs)."""
        config = text_config(config)
        return int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", 0) or 0) if self.moe else 0

    # mixture-of-experts maths (expert e of a block's experts module) -----------------------------------
    def expert_matrix(self, experts, e: int, part: str):
        """(weight, bias or None) of expert e's FF1 ("mlp_in", its fused [gate | up] matrix) or FF2
        ("mlp_out") in the `expert_layout` of one slice, as views of the experts module's parameters (these
        may sit on the meta device when offloaded: read them through `Lens.expert_weight`, which loads them)."""
        if part not in ("mlp_in", "mlp_out"):
            raise LensvizError(f"an expert's matrices are 'mlp_in' (its fused gate/up) and 'mlp_out', got {part!r}")
        w_name, b_name = self.expert_params[:2] if part == "mlp_in" else self.expert_params[2:]
        bias = None if b_name is None else getattr(experts, b_name)[e]
        return getattr(experts, w_name)[e], bias

    def expert_ff1(self, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """h = FF1_e(x): an expert's fused gate/up outputs [n, F1] of inputs x [n, D], from its FF1 slice
        `weight` (in `expert_layout`) and bias [F1] or None (`Lens.expert_weight(layer, e, "mlp_in")`)."""
        h = x @ self.as_in_out(weight, self.expert_layout).to(x.dtype)
        return h if bias is None else h + bias.to(x.dtype)

    def split_gate_up(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, up) parts [..., F] of an expert's fused FF1 features h [..., 2F] (last axis)."""
        if self.expert_gate_up == "interleave":
            return h[..., ::2], h[..., 1::2]
        return h.chunk(2, dim=-1)

    def expert_values(self, weight: torch.Tensor) -> torch.Tensor:
        """values [F, D]: an expert's value vectors (FF2 in [in, out] orientation) from its FF2 slice `weight`
        (in `expert_layout`), so that the expert's output is a_e @ values + bias."""
        return self.as_in_out(weight, self.expert_layout)

    def require_dense_mlp(self, what: str) -> None:
        """LensvizError for `what` (a lens or patch needing single MLP matrices) on MoE families."""
        if self.moe:
            raise LensvizError(f"{what} is not available on {self.family}: it has a mixture-of-experts MLP, whose "
                               "neurons live in per-expert matrices (the lenses taking expert=e address them; see Trace.router)")

    def is_parallel(self, config) -> bool:
        if isinstance(self.parallel_residual, str):
            return bool(getattr(text_config(config), self.parallel_residual, False))
        return bool(self.parallel_residual)

    # module access --------------------------------------------------------------------------------
    def blocks_of(self, model) -> list:
        return list(model.get_submodule(self.blocks))

    def part(self, model, layer: int, name: str):
        """The block-level module `name` (an Adapter field, e.g. "o_proj") of block `layer`."""
        path = getattr(self, name)
        if path is None:
            raise AttributeError(f"{self.family} has no {name}")
        return self.blocks_of(model)[layer].get_submodule(path)

    # weight layouts -------------------------------------------------------------------------------
    def as_in_out(self, weight: torch.Tensor, layout: Layout | None = None) -> torch.Tensor:
        """A projection weight as [in, out] whatever the module layout (a view, no copy); `layout`
        defaults to the family's weight_layout (experts: pass expert_layout)."""
        return weight if (layout or self.weight_layout) == "conv1d" else weight.T

    def qkv_by_head(self, param, dims: Dims) -> dict:
        """Per-head q/k/v projections in [in, out] orientation: W_q [H, D, d], W_k and W_v [H_kv, D, d],
        and biases b_q [H, d], b_k/b_v [H_kv, d] (None where the family has none), so that head h's
        (pre-RoPE) query is x @ W_q[h] + b_q[h]. `param(part, name)` fetches a block parameter or None."""
        d, big_d = dims.d_head, dims.d_model
        heads = {"q": dims.n_heads, "k": dims.n_kv_heads, "v": dims.n_kv_heads}
        out = {}
        if self.qkv is None:
            for key in "qkv":
                w = self.as_in_out(param(f"{key}_proj", "weight"))  # [D, heads*d]
                b = param(f"{key}_proj", "bias")
                out[key] = w.reshape(big_d, heads[key], d).permute(1, 0, 2)
                out["b" + key] = None if b is None else b.reshape(heads[key], d)
            return out
        w = self.as_in_out(param("qkv", "weight"))  # [D, (H + 2 H_kv) * d]
        b = param("qkv", "bias")
        if self.qkv_split == "concat":  # [q | k | v], head h at h*d inside each part
            sizes = [heads[key] * d for key in "qkv"]
            for key, wpart, bpart in zip("qkv", w.split(sizes, dim=1),
                                         (None,) * 3 if b is None else b.split(sizes)):
                out[key] = wpart.reshape(big_d, heads[key], d).permute(1, 0, 2)
                out["b" + key] = None if bpart is None else bpart.reshape(heads[key], d)
            return out
        # "per_head": for each head [q k v]
        ws = w.reshape(big_d, dims.n_heads, 3, d).permute(2, 1, 0, 3)
        bs = None if b is None else b.reshape(dims.n_heads, 3, d).transpose(0, 1)
        for i, key in enumerate("qkv"):
            out[key] = ws[i]
            out["b" + key] = None if bs is None else bs[i]
        return out

    def proj_slices(self, dims: Dims, roles: str = "kv") -> list[ProjSlice]:
        """The parameter slices of one block that are its `roles` projections (any of "q", "k", "v"),
        e.g. the attention keys and values for roles="kv". Separate projections give whole tensors
        (index None); a fused qkv gives the output features of each role: GPT-2's "concat" [q | k | v]
        (columns of the Conv1D weight), GPT-NeoX's "per_head" [q k v] for every head (rows of the
        Linear weight). The same layout `qkv_by_head` reads."""
        out_dim = 1 if self.weight_layout == "conv1d" else 0
        out = []
        for role in roles:
            if role not in "qkv":
                raise ValueError(f"roles must be letters of 'qkv', got {roles!r}")
            if self.qkv is None:
                path = getattr(self, f"{role}_proj")
                out += [ProjSlice(role, path, "weight", out_dim), ProjSlice(role, path, "bias", 0)]
                continue
            i, d, n_heads = "qkv".index(role), dims.d_head, dims.n_heads
            if self.qkv_split == "concat":  # [q (H*d) | k (H_kv*d) | v (H_kv*d)]
                sizes = [n_heads * d, dims.n_kv_heads * d, dims.n_kv_heads * d]
                start = sum(sizes[:i])
                index = torch.arange(start, start + sizes[i])
            elif self.qkv_split == "per_head":  # feature h*3d + i*d + j
                index = (torch.arange(n_heads)[:, None] * 3 * d + i * d + torch.arange(d)[None]).reshape(-1)
            else:
                raise ValueError(f"{self.family}: unknown qkv_split {self.qkv_split!r}")
            out += [ProjSlice(role, self.qkv, "weight", out_dim, index), ProjSlice(role, self.qkv, "bias", 0, index)]
        return out

    def o_by_head(self, weight: torch.Tensor, n_heads: int, d_head: int) -> torch.Tensor:
        """The output projection W_O as [H, d_head, D]: head h writes O_h @ result[h]."""
        w = self.as_in_out(weight)  # [H*d, D]
        return w.reshape(n_heads, d_head, w.shape[-1])
