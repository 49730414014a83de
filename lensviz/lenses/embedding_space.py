"""Parameters in embedding space (Dar, Geva, Gupta & Berant 2023, "Analyzing Transformers in Embedding
Space"): zero-pass projections of
attention heads (W_OV, W_QK token pairs in factored form, never V x V) and FFN keys/values onto the
vocabulary, plus the kernelized projection correlation and the per-head extraction it rests on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import vocab
from ..checks import check_dims, check_index, check_int
from ..errors import LensvizError
from .experts import expert_keys
from .neurons import ValueTokens, value_vectors

INVERSES = ("transpose", "pinv")
READ_EMBEDDINGS = ("unembed", "input")


# the embedding matrix and its (approximate) right inverse ---------------------------------------------
@dataclass(eq=False)
class Space:
    """The two sides of an embedding-space projection.

    write [D, V]: E = W_U^T (times diag(gamma_f) when fold_final_norm); a written vector w maps to w E.
    read [V, D]: E', a right inverse of the read-side embedding (E_r E' ~ I): E_r^T ("transpose", the
    paper's choice) or the pseudo-inverse E_r^+ ("pinv", exact: E_r E_r^+ = I). A read vector w (a column
    of W_Q/W_K/W_V or an FFN key) maps to w E'^T = E' w. E_r is W_U^T ("unembed") or the input
    embedding transposed ("input", for untied models).
    """

    write: torch.Tensor
    read: torch.Tensor
    inverse: str = "transpose"
    read_embedding: str = "unembed"
    fold_final_norm: bool = False


def unembedding(lens, *, fold_final_norm: bool = False) -> torch.Tensor:
    """E = W_U^T [D, V] (times diag(gamma_f) row-wise when fold_final_norm), detached on CPU. Where a
    projection sits between the residual and the unembedding (OPT-350m's project_out W_out) E = (W_U W_out)^T,
    the unembedding of residual vectors."""
    e = lens.adapter.unembedding_matrix(lens.model).to("cpu").T  # W_U (composed with project_out: OPT-350m)
    gamma = lens.norm_gain(None)
    if fold_final_norm and gamma is not None:
        e = gamma.detach().to("cpu", e.dtype)[:, None] * e
    return e


def input_embedding(lens) -> torch.Tensor:
    """The input embedding transposed, [D, V], in residual space (through project_in: OPT-350m)."""
    return lens.adapter.embedding_matrix(lens.model).to("cpu").T


def right_inverse(e: torch.Tensor) -> torch.Tensor:
    """E^+ [V, D] of E [D, V], the Moore-Penrose inverse computed in float64: E^T (E E^T)^-1 through a
    Cholesky factor of the D x D Gram matrix (an SVD where E is rank-deficient). E @ E^+ = I_D when
    rank(E) = D."""
    e64 = e.detach().double()
    try:
        inv = torch.cholesky_solve(e64, torch.linalg.cholesky(e64 @ e64.T)).T
    except RuntimeError:  # torch.linalg.LinAlgError: E E^T is singular
        inv = torch.linalg.pinv(e64)
    return inv.to(e.dtype)


def embedding_space(lens, *, inverse: str = "transpose", read: str = "unembed",
                    fold_final_norm: bool = False) -> Space:
    """Build the `Space` used by every projection here (compute it once and pass it around: "pinv"
    costs an SVD of the [D, V] matrix)."""
    if inverse not in INVERSES:
        raise LensvizError(f"inverse must be one of {INVERSES}, got {inverse!r}")
    if read not in READ_EMBEDDINGS:
        raise LensvizError(f"read must be one of {READ_EMBEDDINGS}, got {read!r}")
    write = unembedding(lens, fold_final_norm=fold_final_norm)
    e_read = unembedding(lens) if read == "unembed" else input_embedding(lens)
    read_m = e_read.T if inverse == "transpose" else right_inverse(e_read)
    return Space(write=write, read=read_m, inverse=inverse, read_embedding=read, fold_final_norm=fold_final_norm)


def _space(lens, space):
    if space is None:
        return embedding_space(lens)
    if not isinstance(space, Space):
        raise LensvizError(f"space must come from embedding_space(lens, ...), got {type(space).__name__}")
    return space


# per-head weights ---------------------------------------------------------------------------------------
def _layer(lens, layer) -> int:
    return check_index(layer, lens.n_layers, "layer")


def _check_head(lens, head) -> int:
    return check_index(head, lens.n_heads, "head")


def circuit_weights(lens, layer: int) -> dict:
    """`Lens.attention_weights` of a layer with the norms *inside* the head circuit folded in, so that the
    weight-only lenses (here and lensviz.lenses.composition) describe what reaches the scores and the
    residual stream:

    - q/k norms (Qwen 3, OLMo 2, Gemma 3, Phi / StableLM `qk_layernorm`, Cohere `use_qk_norm`): q[h] @ M_h
      and k[g] @ M_g with M = P diag(g) (`Adapter.qk_norm_maps`): the normed query / key up to its
      positive per-vector scale 1 / s(q) and the norm's bias; scores are then exact up to the positive
      factor 1 / (s(q) s(k)) per query-key pair, so signs hold and rankings are approximate;
    - post-attention norms (Gemma 2/3, OLMo 2; post-LN OPT): o[h] @ M with M = diag(g_post), or P diag(g)
      for a LayerNorm (`Adapter.post_norm_fold`), what head h adds to the residual up to the positive
      factor 1 / rms (1 / std) of the norm's input at that position (shared by every head there: the
      frozen-scale decomposition of `Trace.write`).
    Families without these norms get `attention_weights` unchanged."""
    layer = _layer(lens, layer)
    w = dict(lens.attention_weights(layer))
    maps = lens.adapter.qk_norm_maps(lens.model, layer, lens.dims)
    for side in "qk":
        if maps[side] is not None:
            w[side] = w[side] @ maps[side].to(w[side].dtype)
    w["o"] = lens.adapter.post_norm_fold(lens.model, layer, "attn", w["o"])
    return w


def head_weights(lens, layer: int, head: int, *, fold_norm: bool = False) -> dict:
    """One query head's circuit in [in, out] orientation: q, k, v [D, d] (k, v of kv head
    g = head // (H / H_kv), HF repeat_kv semantics), o [d, D], biases bq, bk, bv [d] and bo [D] (or None),
    and "kv_head" g. fold_norm multiplies the read matrices q, k, v by the attention-input norm gain
    row-wise (diag(gamma_in) W); LayerNorm centring and its bias are not folded. q/k norms and the
    post-attention norm are always folded (see `circuit_weights`)."""
    layer, head = _layer(lens, layer), _check_head(lens, head)
    w = circuit_weights(lens, layer)
    g = head // (lens.n_heads // lens.n_kv_heads)
    out = {"q": w["q"][head], "k": w["k"][g], "v": w["v"][g], "o": w["o"][head], "kv_head": g, "bo": w["bo"]}
    for key, idx in (("bq", head), ("bk", g), ("bv", g)):
        out[key] = None if w[key] is None else w[key][idx]
    if fold_norm:
        gamma = lens.norm_gain(layer, "ln1")
        if gamma is not None:
            for key in "qkv":
                out[key] = gamma.to(out[key].dtype)[:, None] * out[key]
    return out


def _rotary_module(lens):
    for module in lens.model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor) and callable(module):
            return module
    raise LensvizError(f"{lens.arch} is marked rotary but its model has no rotary-embedding module")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_matrices(lens, positions) -> torch.Tensor:
    """R(p) [P, d, d] with rope(x, p) = x @ R(p) for a head vector x [d] at position p (HF rotate_half
    pairing; with partial rotary only the first rotary dims turn). Identity when the family has no RoPE."""
    pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
    d = lens.d_head
    eye = torch.eye(d, dtype=lens.model_dtype)
    if not lens.adapter.rotary:
        return eye.expand(len(pos), d, d).clone()
    rot = _rotary_module(lens)
    with torch.no_grad():
        cos, sin = rot(eye[None].to(rot.inv_freq.device), pos[None].to(rot.inv_freq.device))
    cos, sin = cos[0].to("cpu", eye.dtype)[:, None], sin[0].to("cpu", eye.dtype)[:, None]  # [P, 1, r]
    r = cos.shape[-1]
    turned = eye[:, :r] * cos + _rotate_half(eye[:, :r]) * sin  # [P, d, r]: row i is rope(e_i)
    return torch.cat((turned, eye[:, r:].expand(len(pos), d, d - r)), dim=-1)


def rope_relative(lens, delta: int) -> torch.Tensor:
    """R_rel(delta) [d, d]: the score of a query at position i on a key at j = i - delta is
    q R_rel(delta) k^T for the pre-RoPE q, k (R(i) R(j)^T; includes the rotary attention scaling).
    Identity without RoPE."""
    if isinstance(delta, bool) or not isinstance(delta, int):
        raise LensvizError(f"delta must be an int (query position minus key position), got {delta!r}")
    r = rope_matrices(lens, [delta, 0])
    return r[0] @ r[1].T


def head_attention(trace, layer: int) -> torch.Tensor:
    """Attention probabilities [H, T, T] rebuilt from the extracted per-head weights alone: for query i
    and key j, s_ij = (x_i W_Q^h + b_Q) R_rel(i - j) (x_j W_K^g(h) + b_K)^T * scaling, x = attn_input,
    softmax over j <= i (plain causal mask).
    Families with q/k norms are refused (LensvizError): their scores divide by each query's and key's
    own norm scale, which the weights alone do not give (`circuit_weights` folds only the linear part)."""
    lens = trace.lens
    layer = _layer(lens, layer)
    if lens.adapter.qk_normed(lens.model):
        raise LensvizError(f"head_attention cannot rebuild {lens.arch}'s attention from weights alone: it has q/k "
                           "norms, which rescale every query and key by its own norm (use trace.attention)")
    x = trace.attn_input(layer)
    t = len(trace)
    rel = torch.stack([rope_relative(lens, delta) for delta in range(t)]).to(x.dtype)  # [T, d, d]
    scaling = trace.attention_scaling(layer)
    i, j = torch.meshgrid(torch.arange(t), torch.arange(t), indexing="ij")
    causal = j <= i
    out = []
    for head in range(lens.n_heads):
        w = head_weights(lens, layer, head)
        q = x @ w["q"].to(x.dtype) + (0 if w["bq"] is None else w["bq"].to(x.dtype))
        k = x @ w["k"].to(x.dtype) + (0 if w["bk"] is None else w["bk"].to(x.dtype))
        qr = torch.einsum("id,Dde->Die", q, rel)  # [Delta, T, d]: q_i R_rel(Delta)
        per_delta = qr @ k.T  # [Delta, T, T]
        scores = per_delta[(i - j).clamp_min(0), i, j] * scaling
        out.append(torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1))
    return torch.stack(out)


def head_writes(lens, layer: int, z: torch.Tensor) -> torch.Tensor:
    """Each head's write z_h W_O^h [H, T, D] from the o_proj input z [T, H*d]. Their sum plus b_O is
    the attention output."""
    layer = _layer(lens, layer)
    if z.dim() != 2 or z.shape[-1] != lens.n_heads * lens.d_head:
        raise LensvizError(f"z must be [T, {lens.n_heads * lens.d_head}], got {tuple(z.shape)}")
    w_o = lens.attention_weights(layer)["o"].to(z.dtype)  # [H, d, D]
    zh = z.reshape(z.shape[0], lens.n_heads, lens.d_head).transpose(0, 1)  # [H, T, d]
    return zh @ w_o


# factored top pairs ------------------------------------------------------------------------------------
def factored_top_pairs(a: torch.Tensor, b: torch.Tensor, k: int, *, row_ids=None, col_ids=None,
                       exclude_same: bool = False, bottom: bool = False, block: int = 1024):
    """The k largest (bottom: smallest) entries of M = a @ b without forming M: a [R, r], b [r, C].

    Rows of a and columns of b are visited in order of decreasing norm, in row blocks of at most `block`
    rows (and at most 2^24 entries). With the running k-th best value t, a row block whose largest norm
    is |a_i| only multiplies the columns with |b_j| > t / |a_i| (Cauchy-Schwarz: no other entry can
    enter the top k); once no column qualifies, no later row can either. Memory O(block * C).
    row_ids [R] / col_ids [C] label rows/columns (token ids) for exclude_same (drop M[i, j] where the
    labels agree). Returns values [n], rows [n], cols [n] (positions in a / b), n = min(k, entries
    left), best first."""
    check_int(block, "block", 1)
    sign = -1.0 if bottom else 1.0
    if exclude_same:
        row_ids = torch.arange(a.shape[0]) if row_ids is None else torch.as_tensor(row_ids)
        col_ids = torch.arange(b.shape[1]) if col_ids is None else torch.as_tensor(col_ids)
    if a.shape[0] == 0 or b.shape[1] == 0:
        return torch.empty(0, dtype=a.dtype), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    row_norm, row_perm = a.norm(dim=1).sort(descending=True)
    col_norm, col_perm = b.norm(dim=0).sort(descending=True)
    a_s, b_s = a[row_perm] * sign, b[:, col_perm].contiguous()
    slack = 1.0 - 4 * (a.shape[1] + 1) * torch.finfo(a.dtype).eps  # rounding margin on the bound
    budget = 2**24  # entries of M held at once
    buf = torch.empty(min(budget, max(block * b.shape[1], b.shape[1])), dtype=a.dtype)
    best_v = torch.empty(0, dtype=a.dtype)
    best_r = torch.empty(0, dtype=torch.long)
    best_c = torch.empty(0, dtype=torch.long)
    start = 0
    with torch.no_grad():
        while start < a_s.shape[0]:
            full = best_v.numel() == k
            if full:
                bound = float(best_v[-1]) * slack / max(float(row_norm[start]), torch.finfo(a.dtype).tiny)
                n_cols = int((col_norm > bound).sum())  # a prefix: columns are sorted by norm
                if n_cols == 0:
                    break
            else:
                n_cols = b_s.shape[1]
            x = a_s[start:start + max(1, min(block, buf.numel() // n_cols))]
            m = buf[:x.shape[0] * n_cols].view(x.shape[0], n_cols)
            torch.mm(x, b_s[:, :n_cols], out=m)
            rows = row_perm[start:start + x.shape[0]]
            cols = col_perm[:n_cols]
            start += x.shape[0]
            if exclude_same:
                m.masked_fill_(row_ids[rows][:, None] == col_ids[cols][None, :], float("-inf"))
            if full:
                live = (m.amax(dim=1) > best_v[-1]).nonzero()[:, 0]
                if live.numel() == 0:
                    continue
                sub = m[live]
                hit = (sub > best_v[-1]).nonzero()
                vals = sub[hit[:, 0], hit[:, 1]]
                rr, cc = rows[live[hit[:, 0]]], cols[hit[:, 1]]
            else:
                flat = m.reshape(-1).topk(min(k, m.numel()))
                vals = flat.values
                rr, cc = rows[flat.indices // n_cols], cols[flat.indices % n_cols]
            vals = torch.cat((best_v, vals))
            top = vals.topk(min(k, vals.numel()))
            best_v = top.values
            best_r = torch.cat((best_r, rr))[top.indices]
            best_c = torch.cat((best_c, cc))[top.indices]
    finite = torch.isfinite(best_v)
    return best_v[finite] * sign, best_r[finite], best_c[finite]


@dataclass(eq=False)
class TokenPairs:
    """Top token pairs of one head's embedding-space matrix, best first.

    kind "ov" (src = input token read through W_V, dst = token written through W_O) or "qk" (src =
    query token, dst = key token); values [n], src_ids [n], dst_ids [n]; `label` says what the matrix is
    (for RoPE models the QK matrix is the content term at relative distance `delta`, not the attention
    pattern)."""

    kind: str
    layer: int
    head: int
    kv_head: int
    delta: int | None
    label: str
    values: torch.Tensor
    src_ids: torch.Tensor
    dst_ids: torch.Tensor
    _strings: list = field(repr=False, default=None)

    @property
    def src_tokens(self) -> list:
        return [self._strings[i] for i in self.src_ids.tolist()]

    @property
    def dst_tokens(self) -> list:
        return [self._strings[i] for i in self.dst_ids.tolist()]

    def to_dict(self) -> dict:
        """Plain data: {"kind", "layer", "head", "kv_head", "delta", "label",
        "pairs": [{"src", "src_id", "dst", "dst_id", "value"}]}."""
        pairs = [{"src": self._strings[s], "src_id": s, "dst": self._strings[d], "dst_id": d, "value": v}
                 for s, d, v in zip(self.src_ids.tolist(), self.dst_ids.tolist(), self.values.tolist())]
        return {"kind": self.kind, "layer": self.layer, "head": self.head, "kv_head": self.kv_head,
                "delta": self.delta, "label": self.label, "pairs": pairs}


def _token_list(lens, tokens) -> torch.Tensor | None:
    """An allow-list (ints or str; a str names its first token) as LongTensor [n] of unique ids."""
    if tokens is None:
        return None
    if isinstance(tokens, (str, int)) or not hasattr(tokens, "__iter__"):
        tokens = [tokens]
    ids = []
    for t in (tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens):
        tid = lens.token_id(t)
        if tid not in ids:
            ids.append(tid)
    if not ids:
        raise LensvizError("the token allow-list is empty")
    return torch.tensor(ids, dtype=torch.long)


def head_factors(lens, layer: int, head: int, kind: str = "ov", *, delta: int = 0, fold_norm: bool = False,
                 space=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors (A [V, d], B [d, V]) with A @ B the head's embedding-space matrix:
    "ov": E' W_V^g(h) and W_O^h E (E' W_OV E, rows = source token, cols = written token);
    "qk": E' W_Q^h R_rel(delta) and (E' W_K^g(h))^T (rows = query token, cols = key token).
    Biases are left out, as in the paper."""
    if kind not in ("ov", "qk"):
        raise LensvizError(f"kind must be 'ov' or 'qk', got {kind!r}")
    sp = _space(lens, space)
    w = head_weights(lens, layer, head, fold_norm=fold_norm)
    dt = sp.read.dtype
    if kind == "ov":
        return sp.read @ w["v"].to(dt), w["o"].to(dt) @ sp.write.to(dt)
    q = w["q"].to(dt) @ rope_relative(lens, delta).to(dt)
    return sp.read @ q, (sp.read @ w["k"].to(dt)).T


def head_top_pairs(lens, layer: int, head: int, kind: str = "ov", k: int = 50, *, tokens=None, rows=None,
                   cols=None, exclude_same: bool = False, bottom: bool = False, delta: int = 0,
                   fold_norm: bool = False, space=None, block: int = 1024) -> TokenPairs:
    """Top-k token pairs of E' W_OV^h E ("ov") or E' W_Q^h R(delta) W_K^g(h)^T E'^T ("qk") in factored
    form (memory O(block * V); see `factored_top_pairs`). tokens: an allow-list (ids or str) for both
    sides; rows / cols restrict one side. exclude_same drops pairs of a token with itself; bottom gives
    the most negative pairs.
    delta (RoPE models, "qk" only): the query-key distance; 0 = the content term."""
    layer, head = _layer(lens, layer), _check_head(lens, head)
    k = check_int(k, "k", 1, lens.vocab_size ** 2)
    a, b = head_factors(lens, layer, head, kind, delta=delta, fold_norm=fold_norm, space=space)
    allow = _token_list(lens, tokens)
    row_ids = _token_list(lens, rows) if rows is not None else allow
    col_ids = _token_list(lens, cols) if cols is not None else allow
    if row_ids is not None:
        a = a[row_ids]
    if col_ids is not None:
        b = b[:, col_ids]
    all_rows = torch.arange(lens.vocab_size) if row_ids is None else row_ids
    all_cols = torch.arange(lens.vocab_size) if col_ids is None else col_ids
    vals, r, c = factored_top_pairs(a, b, k, row_ids=all_rows, col_ids=all_cols, exclude_same=exclude_same,
                                    bottom=bottom, block=block)
    g = head // (lens.n_heads // lens.n_kv_heads)
    if kind == "ov":
        label, dl = f"W_OV of L{layer}H{head} (kv head {g}): source token -> written token", None
    elif lens.adapter.rotary:
        label, dl = (f"W_QK of L{layer}H{head} (kv head {g}) at RoPE distance {delta}"
                     + (" (the content term; other distances rotate it)" if delta == 0 else "")), delta
    else:
        label, dl = f"W_QK of L{layer}H{head}: query token -> key token (positions enter via embeddings)", None
    return TokenPairs(kind=kind, layer=layer, head=head, kv_head=g, delta=dl, label=label, values=vals,
                      src_ids=all_rows[r], dst_ids=all_cols[c], _strings=lens.token_strings)


# single vectors: FFN keys / values, head columns / rows --------------------------------------------------
def ffn_keys(lens, layer: int, part: str = "mlp_in", *, fold_norm: bool = False,
             expert: int | None = None) -> torch.Tensor:
    """FFN keys k_i [F, D]: the columns of FF1 in [in, out] orientation (GPT-2 `c_fc.weight[:, i]`,
    Llama `up_proj.weight[i]`); part="mlp_gate" gives the SwiGLU gate keys. fold_norm multiplies by the
    MLP-input norm gain (diag(gamma) k_i). expert (MoE): expert e's up (gate) keys, from its fused
    gate/up matrix."""
    layer = _layer(lens, layer)
    if part not in ("mlp_in", "mlp_gate"):
        raise LensvizError(f"part must be 'mlp_in' or 'mlp_gate', got {part!r}")
    if expert is not None:
        gate, keys = lens.adapter.split_gate_up(expert_keys(lens, layer, expert).T)  # [D, F] each
        keys = (gate if part == "mlp_gate" else keys).T
    elif lens.adapter.moe:
        lens.adapter.require_dense_mlp("ffn_keys without expert=")
    elif lens.adapter.gate_up:  # one fused [gate | up] matrix (Phi-3): gate rows first
        gate, keys = lens.adapter.as_in_out(lens.weight(layer, "mlp_in")).T.chunk(2, dim=0)
        keys = gate if part == "mlp_gate" else keys
    elif getattr(lens.adapter, part) is None:
        raise LensvizError(f"{lens.arch} has no gated MLP: part 'mlp_gate' does not exist (use 'mlp_in')")
    else:
        keys = lens.adapter.as_in_out(lens.weight(layer, part)).T
    if fold_norm:
        gamma = lens.norm_gain(layer, "ln2")
        if gamma is not None:
            keys = keys * gamma.to(keys.dtype)[None]
    return keys


def _project(matrix: torch.Tensor, vectors: torch.Tensor, k: int, bottom: bool, strings, left: bool):
    """Top-k of vectors [..., D] mapped by `matrix` (left: matrix [V, D], logits = v matrix^T; else
    matrix [D, V], logits = v matrix), chunked (`vocab.top_logits`). -> ValueTokens [..., k]."""
    lead = vectors.shape[:-1]
    rows = vectors.reshape(-1, vectors.shape[-1])
    ids, vals = vocab.top_logits(vocab.matrix_readout(matrix if left else matrix.T), rows, k, bottom=bottom,
                                 dtype=None)
    return ValueTokens(ids=ids.reshape(*lead, k), logits=vals.reshape(*lead, k), _strings=strings)


def project_read(lens, vectors: torch.Tensor, k: int = 10, *, space=None, bottom: bool = False) -> ValueTokens:
    """Top-k tokens of read-side vectors [..., D] (FFN keys, columns of W_Q/W_K/W_V): w E'^T."""
    k = check_int(k, "k", 1, lens.vocab_size)
    return _project(_space(lens, space).read, vectors, k, bottom, lens.token_strings, left=True)


def project_write(lens, vectors: torch.Tensor, k: int = 10, *, space=None, bottom: bool = False) -> ValueTokens:
    """Top-k tokens of write-side vectors [..., D] (FFN values, rows of W_O): w E."""
    k = check_int(k, "k", 1, lens.vocab_size)
    return _project(_space(lens, space).write, vectors, k, bottom, lens.token_strings, left=False)


def ffn_projections(lens, layer: int, part: str = "key", dims=None, k: int = 30, *, space=None,
                    fold_norm: bool = False, bottom: bool = False, expert: int | None = None) -> ValueTokens:
    """Projected FFN vectors of `layer`: part "key" (FF1, read side), "gate" (SwiGLU gate, read side) or
    "value" (FF2 rows, write side; through the post-MLP norm's map where the family has one,
    `Adapter.post_norm_fold`, so up to the positive factor of its frozen scale it is the neuron's write);
    dims [n] (default all F); expert (MoE): expert e's. -> ValueTokens [n, k]."""
    if part not in ("key", "gate", "value"):
        raise LensvizError(f"part must be 'key', 'gate' or 'value', got {part!r}")
    dims = torch.arange(lens.d_mlp) if dims is None else check_dims(dims, lens.d_mlp)
    if part == "value":  # post-MLP norms (Gemma 2/3, OLMo 2, post-LN OPT): folded as in circuit_weights
        values = value_vectors(lens, layer, expert)[dims]
        values = lens.adapter.post_norm_fold(lens.model, _layer(lens, layer), "mlp", values)
        return project_write(lens, values, k, space=space, bottom=bottom)
    vec = ffn_keys(lens, layer, "mlp_in" if part == "key" else "mlp_gate", fold_norm=fold_norm,
                   expert=expert)[dims]
    return project_read(lens, vec, k, space=space, bottom=bottom)


def head_projections(lens, layer: int, head: int, part: str = "o", k: int = 30, *, space=None,
                     fold_norm: bool = False, bottom: bool = False) -> ValueTokens:
    """Projected head dimensions: part "q", "k", "v" (columns of W_Q^h, W_K^g(h), W_V^g(h), read side) or
    "o" (rows of W_O^h, write side). -> ValueTokens [d_head, k]."""
    if part not in ("q", "k", "v", "o"):
        raise LensvizError(f"part must be one of 'q', 'k', 'v', 'o', got {part!r}")
    w = head_weights(lens, layer, head, fold_norm=fold_norm)
    if part == "o":
        return project_write(lens, w["o"], k, space=space, bottom=bottom)
    return project_read(lens, w[part].T, k, space=space, bottom=bottom)


# comparing projections without forming them --------------------------------------------------------------
def projection_correlation(x: torch.Tensor, y: torch.Tensor, e1: torch.Tensor, e2: torch.Tensor | None = None):
    """Pearson correlation of the vocabulary projections x E1 and y E2 without forming V-vectors:
    corr = (x K12 y^T / V - mu_x mu_y) / sqrt((x K1 x^T / V - mu_x^2)(y K2 y^T / V - mu_y^2)),
    K12 = E1 E2^T, mu_x = x . mean_col(E1). x [n, D1], y [m, D2], E1 [D1, V], E2 [D2, V] (default E1)
    -> [n, m]."""
    e2 = e1 if e2 is None else e2
    if e1.shape[1] != e2.shape[1]:
        raise LensvizError(f"E1 and E2 must share the vocabulary size, got {tuple(e1.shape)} and {tuple(e2.shape)}")
    n = e1.shape[1]
    x, y = x.to(e1.dtype), y.to(e1.dtype)
    e2 = e2.to(e1.dtype)
    mx, my = x @ e1.mean(1), y @ e2.mean(1)  # [n], [m]
    sxx = ((x @ (e1 @ e1.T)) * x).sum(-1) / n - mx ** 2
    syy = ((y @ (e2 @ e2.T)) * y).sum(-1) / n - my ** 2
    sxy = x @ (e1 @ e2.T) @ y.T / n - mx[:, None] * my[None, :]
    return sxy / (sxx[:, None] * syy[None, :]).sqrt()
