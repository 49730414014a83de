"""The Adapter: per-architecture knowledge as data.

An adapter maps lensviz's canonical parts (embedding, blocks, attention projections, MLP matrices,
norms, unembedding) to dotted paths in a Hugging Face module tree, plus a few layout flags.
Capture and lenses read only this description; nothing else in lensviz branches on `model_type`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

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
    final_norm: str
    unembed: str
    # block level
    ln1: str
    attn: str
    ln2: str
    mlp: str
    o_proj: str
    mlp_in: str
    mlp_out: str
    mlp_gate: str | None = None
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    qkv: str | None = None
    qkv_split: str | None = None  # "concat" (GPT-2: [q | k | v]) or "per_head" (NeoX: per head [q k v])
    # layout flags
    weight_layout: Layout = "linear"
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    rotary: bool = True
    parallel_residual: bool | str = False  # bool, or the name of a boolean config attribute
    d_mlp: Callable = _default_d_mlp
    notes: str = ""

    # ----------------------------------------------------------------------------------------------
    def dims(self, config) -> Dims:
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

    def is_parallel(self, config) -> bool:
        if isinstance(self.parallel_residual, str):
            return bool(getattr(config, self.parallel_residual, False))
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
    def as_in_out(self, weight: torch.Tensor) -> torch.Tensor:
        """A projection weight as [in, out] whatever the module layout (a view, no copy)."""
        return weight if self.weight_layout == "conv1d" else weight.T

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
        w = self.as_in_out(param("qkv", "weight"))  # [D, 3 * H * d]
        b = param("qkv", "bias")
        if self.qkv_split == "concat":  # [q | k | v], head h at h*d inside each third
            ws = w.reshape(big_d, 3, dims.n_heads, d).permute(1, 2, 0, 3)
            bs = None if b is None else b.reshape(3, dims.n_heads, d)
        else:  # "per_head": for each head [q k v]
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
            if self.qkv_split == "concat":  # feature i*H*d + h*d + j
                index = torch.arange(i * n_heads * d, (i + 1) * n_heads * d)
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
