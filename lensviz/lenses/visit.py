"""VISIT (Katz & Belinkov 2023, "VISIT: Visualizing and Interpreting the Semantic Information Flow of
Transformers"): one forward pass at one position as a flow graph of residual
vectors read through the vocabulary projection. Block/head decompositions, exact QK bilinear forms, W_O and
MLP neurons, the LN "semantic filter", and `visit_graph`, JSON-ready nodes and edges for widget and matplotlib.
On mixture-of-experts families the MLP neurons are the (expert, neuron) pairs of the experts routed at the
position, each writing its sub-update w_e a_{e,n} value_{e,n} (`MLPParts`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import vocab
from ..checks import check_index, check_index_list, check_int, check_layer_list
from ..errors import LensvizError
from . import experts

ROPE_NOTE = "approx (RoPE ignored)"
QK_NORM_NOTE = "approx (q/k norms ignored)"

# Link widths of the VISIT graph (the defaults of VISIT's graph configuration). Override per call with
# visit_graph(..., scales={...}).
DEFAULT_SCALES = {
    "head_query": 0.2,     # qkv -> q_h: 0.2 * |W_K q_h|
    "attention": 10.0,     # q_h -> key_j and key_j -> value_j: max(10 * A_h[t, j], min_link)
    "memory": 1.3,         # value_j -> head output: max(1.3 * A_h[t, j] * |v_j W_O,h|, min_link)
    "head_output": 1.8,    # head output -> concat: 1.8 * |O_h W_O,h|
    "fixed": 7.0,          # concat -> W_O neuron, mlp_input -> key, bias links
    "mlp_activation": 1.5,  # key_n -> value_n: 1.5 * |a_n|
    "min_link": 0.51,
    "invisible": 0.05,     # FF1-bias -> FF2-bias layout link (no data flows along it)
}


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def _layer(trace, layer) -> int:
    return check_index(layer, trace.n_layers, "layer")


def _position(trace, position) -> int:
    return check_index(position, len(trace), "position")


def _target_id(trace, target) -> int:
    return trace.target_id if target is None else trace.lens.token_id(target)


def _kv_head(lens) -> torch.Tensor:
    """g(h) for every query head h: the kv head it reads (GQA: h // n_rep). LongTensor [H]."""
    return torch.arange(lens.n_heads) // (lens.n_heads // lens.n_kv_heads)


def _recorded_o(trace, layer: int) -> torch.Tensor:
    """O [T, H, d]: the head outputs the run fed W_O (after any patch's output edits)."""
    return trace.head_values(layer).transpose(0, 1)


def _is_parallel(trace) -> bool:
    return trace.adapter.is_parallel(trace.lens.model.config)


# ------------------------------------------------------------------------------------------------
# decompositions
# ------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class AttentionParts:
    """The attention sublayer of one layer at one position t, as VISIT decomposes it.

    attention [H, T]: A_h[t, :] (zero for j > t). o [H, d]: O_h,t, the head outputs the run fed W_O
    (= sum_j A_h[t, j] v_{g(h), j}, GQA kv head g(h) = h // n_rep, unless a patch edited the outputs,
    e.g. HeadAblation zeroes them). head_out [H, D]: O_h,t W_O,h. memory_values [H, T, D]:
    v_{g(h), j} W_O,h, the memory entry j as head h writes it. bias [D] or None: b_O.
    output [D]: sum_h head_out + b_O, the attention sublayer's write to the residual (head_out,
    memory_values and bias carry the family's write scale at t: a frozen post-norm or a residual
    multiplier or a post-LN LayerNorm's frozen linear part, see `Trace.write`).
    """

    layer: int
    position: int
    attention: torch.Tensor
    o: torch.Tensor
    head_out: torch.Tensor
    memory_values: torch.Tensor
    bias: torch.Tensor | None
    output: torch.Tensor


def attention_parts(trace, layer: int, position: int = -1) -> AttentionParts:
    """Decompose the attention output of `layer` at `position` into heads and memory entries (see
    `AttentionParts`). Uses the attention the run applied (patched A' under an AttentionPatch)."""
    lens = trace.lens
    layer, t = _layer(trace, layer), _position(trace, position)
    a = trace.attention(layer)[:, t, :]  # [H, T]
    _, _, v = trace.qkv(layer)  # [H_kv, T, d]
    v = v[_kv_head(lens)]  # [H, T, d]
    w = lens.attention_weights(layer)
    w_o = w["o"].to(v.dtype)  # [H, d, D]
    o = _recorded_o(trace, layer)[t]  # [H, d]
    # post-norm (frozen) / residual multiplier / post-LN LayerNorm, else the identity: `Trace.write`
    head_out = trace.write(layer, "attn", torch.einsum("hd,hdD->hD", o, w_o), position=t)
    memory = trace.write(layer, "attn", torch.matmul(v, w_o), position=t)  # [H, T, D]
    bias = None if w["bo"] is None else trace.write(layer, "attn", w["bo"].to(v.dtype), position=t)
    out = head_out.sum(0) if bias is None else head_out.sum(0) + bias
    return AttentionParts(layer, t, a, o, head_out, memory, bias, out)


@dataclass(eq=False)
class MLPParts:
    """The MLP of one layer at one position, as key-value memories (Geva et al. 2021, "Transformer
    Feed-Forward Layers Are Key-Value Memories").

    activation [F]: a, the FF2 input. keys [F, D]: FF1 columns (GPT-2 `c_fc.weight[:, n]`, Llama
    `up_proj.weight[n]`); gate_keys [F, D] or None (SwiGLU `gate_proj.weight[n]`). values [F, D]: FF2 rows
    (GPT-2 `c_proj.weight[n]`, Llama `down_proj.weight[:, n]`). bias_in [F] / bias_out [D] or None.
    output [D]: sum_n a_n values[n] + bias_out, the MLP's write to the residual. In families whose MLP
    output passes a post-norm (frozen at this run's scale) or a residual multiplier before the add,
    values and bias_out already carry that map at this position (`Trace.write`).

    Mixture-of-experts families: the neurons are the (expert, neuron) pairs of the k experts routed at this
    position, F = k * F_e rows in the router's order (expert experts[i], neuron neurons[i]). activation:
    a_{e,n}; keys / gate_keys: the up / gate rows of the expert's fused FF1 (bias_in: its up bias or None);
    values: w_e value_{e,n}, the router weight w_e folded in (like the write scale), so a_n values[n] is
    the neuron's sub-update w_e a_{e,n} value_{e,n} (`experts.expert_parts`); bias_out: sum_e w_e b_e or
    None. experts, neurons [F] (long) and weights [F] (w_e of each row): None on dense MLPs.
    """

    layer: int
    position: int
    activation: torch.Tensor
    keys: torch.Tensor
    gate_keys: torch.Tensor | None
    values: torch.Tensor
    bias_in: torch.Tensor | None
    bias_out: torch.Tensor | None
    output: torch.Tensor
    experts: torch.Tensor | None = None
    neurons: torch.Tensor | None = None
    weights: torch.Tensor | None = None


def mlp_parts(trace, layer: int, position: int = -1) -> MLPParts:
    """Decompose the MLP output of `layer` at `position` into neurons (see `MLPParts`; on mixture-of-experts
    families the neurons of the experts routed there)."""
    lens = trace.lens
    layer, t = _layer(trace, layer), _position(trace, position)
    if lens.adapter.moe:
        return _expert_mlp_parts(trace, layer, t)
    a = trace.mlp_activations(layer)[t]
    as_in_out = lens.adapter.as_in_out
    keys = as_in_out(lens.weight(layer, "mlp_in")).T.to(a.dtype)  # [F, D] ([2F, D] fused gate | up)
    gate = lens.param(layer, "mlp_gate")
    gate = None if gate is None else as_in_out(gate).T.to(a.dtype)
    b_in = lens.param(layer, "mlp_in", "bias")
    if lens.adapter.gate_up:  # Phi-3 gate_up_proj: gate rows first, then up
        gate, keys = keys.chunk(2, dim=0)
        b_in = None if b_in is None else b_in.chunk(2)[1]
    # each value writes a_n * write(value_n) (`Trace.write`: linear in the value)
    values = trace.write(layer, "mlp", as_in_out(lens.weight(layer, "mlp_out")).to(a.dtype), position=t)  # [F, D]
    b_out = lens.param(layer, "mlp_out", "bias")
    b_in = None if b_in is None else b_in.to(a.dtype)
    b_out = None if b_out is None else trace.write(layer, "mlp", b_out.to(a.dtype), position=t)
    out = a @ values
    return MLPParts(layer, t, a, keys, gate, values, b_in, b_out, out if b_out is None else out + b_out)


def _expert_mlp_parts(trace, layer: int, t: int) -> MLPParts:
    """`mlp_parts` of a mixture-of-experts MLP: the routed experts' neurons, router weights folded into values."""
    lens = trace.lens
    ad = lens.adapter
    p = experts.expert_parts(trace, layer, t)
    k, f = p.activations.shape
    dtype = p.activations.dtype
    ups, gates, b_ins = [], [], []
    for e in p.experts.tolist():
        gate, up = ad.split_gate_up(experts.expert_keys(lens, layer, e).T)  # [D, F] each
        gates.append(gate.T.to(dtype))
        ups.append(up.T.to(dtype))
        b = lens.expert_weight(layer, e, "mlp_in", "bias")
        b_ins.append(None if b is None else ad.split_gate_up(b)[1].to(dtype))
    values = trace.write(layer, "mlp", (p.weights[:, None, None] * p.values).reshape(k * f, -1), position=t)  # [k F, D]
    a = p.activations.reshape(-1)
    b_out = None if p.bias is None else trace.write(layer, "mlp", (p.weights[:, None] * p.bias).sum(0), position=t)
    out = a @ values
    return MLPParts(layer, t, a, torch.cat(ups), torch.cat(gates), values,
                    None if b_ins[0] is None else torch.cat(b_ins), b_out, out if b_out is None else out + b_out,
                    experts=p.experts.repeat_interleave(f), neurons=torch.arange(f).repeat(k),
                    weights=p.weights.repeat_interleave(f))


def block_vectors(trace, layer: int, position: int = -1, *, attn: AttentionParts | None = None,
                  mlp: MLPParts | None = None) -> dict:
    """The residual-space vectors of one block at one position (each [D]): block_input, attn_input (first
    norm's output), attn_output, residual_after_attn (None in a parallel block), mlp_input (second norm's
    output), mlp_output, block_output, and attn_carried / mlp_carried (`Trace.carried`: the residual before
    each sublayer as it reaches the residual after it). attn_output / mlp_output are the decompositions'
    sums, so block_output == mlp_carried + mlp_output (and residual_after_attn == attn_carried +
    attn_output) always hold; in additive blocks the carried vectors are the residual itself, so
    block_output == block_input + attn_output + mlp_output too (both block kinds). Post-LN blocks
    (OPT-350m) renormalise the residual: there the carried vectors differ from it."""
    layer, t = _layer(trace, layer), _position(trace, position)
    attn = attn if attn is not None else attention_parts(trace, layer, t)
    mlp = mlp if mlp is not None else mlp_parts(trace, layer, t)
    return {
        "block_input": trace.resid(layer, "pre")[t],
        "attn_input": trace.attn_input(layer)[t],
        "attn_output": attn.output,
        "residual_after_attn": None if _is_parallel(trace) else trace.resid(layer, "mid")[t],
        "mlp_input": trace.mlp_input(layer)[t],
        "mlp_output": mlp.output,
        "block_output": trace.resid(layer, "post")[t],
        "attn_carried": trace.carried(layer, "attn")[t],
        "mlp_carried": trace.carried(layer, "mlp")[t],
    }


# ------------------------------------------------------------------------------------------------
# the QK circuit in residual space (exact bilinear forms; RoPE makes them approximate)
# ------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class QKForms:
    """Exact bilinear forms of the attention scores, read in residual space, at query position t.

    q [H, d]: pre-RoPE queries at t, x_t W_Q,h + b_Q,h. k [H_kv, T, d]: pre-RoPE keys x_j W_K,g + b_K,g.
    q_dir [H, D] = W_K,g(h) q_h: the residual direction head h's query looks for, with
    x_j . q_dir[h] + q_bias[h] == q_h . k_{g(h), j}  (q_bias [H] = b_K,g(h) . q_h).
    k_dir [H, T, D] = W_Q,h k_{g(h), j}: the query-side direction key j answers, with
    x_t . k_dir[h, j] + k_bias[h, j] == q_h . k_{g(h), j}  (k_bias [H, T] = b_Q,h . k_{g(h), j}).
    With RoPE the model scores the rotated q, k, so these forms ignore the position-dependent rotation:
    `approx` is True and `note` says "approx (RoPE ignored)" (exact for j == t, where the rotations cancel).
    """

    layer: int
    position: int
    q: torch.Tensor
    k: torch.Tensor
    q_dir: torch.Tensor
    q_bias: torch.Tensor
    k_dir: torch.Tensor
    k_bias: torch.Tensor
    approx: bool
    note: str

    @property
    def scores(self) -> torch.Tensor:
        """q_h . k_{g(h), j} of the pre-RoPE vectors, unscaled: [H, T] (the model's scores when not approx)."""
        g = torch.arange(self.q.shape[0]) // (self.q.shape[0] // self.k.shape[0])
        return torch.einsum("hd,hjd->hj", self.q, self.k[g])


def qk_forms(trace, layer: int, position: int = -1) -> QKForms:
    """The residual-space query and key directions of every head of `layer` at query `position` (see
    `QKForms`). Built from the attention input and the adapter's per-head weights, so Conv1D vs Linear,
    fused q/k/v layouts and GQA all come from the adapter."""
    layer, t = _layer(trace, layer), _position(trace, position)
    return _qk_forms(trace, layer, t, trace.attn_input(layer))


def _qk_forms(trace, layer: int, t: int, x: torch.Tensor) -> QKForms:
    """`qk_forms` with the attention input x [T, D] already computed."""
    lens = trace.lens
    w = {name: (None if val is None else val.to(x.dtype)) for name, val in lens.attention_weights(layer).items()}
    g = _kv_head(lens)
    q = torch.einsum("D,hDd->hd", x[t], w["q"])
    if w["bq"] is not None:
        q = q + w["bq"]
    k = torch.einsum("jD,gDd->gjd", x, w["k"])
    if w["bk"] is not None:
        k = k + w["bk"][:, None, :]
    q_dir = torch.einsum("hDd,hd->hD", w["k"][g], q)
    q_bias = torch.zeros(q.shape[0], dtype=q.dtype) if w["bk"] is None else (w["bk"][g] * q).sum(-1)
    k_h = k[g]  # [H, T, d]
    k_dir = torch.einsum("hDd,hjd->hjD", w["q"], k_h)
    k_bias = (torch.zeros(k_h.shape[:2], dtype=q.dtype) if w["bq"] is None
              else torch.einsum("hd,hjd->hj", w["bq"], k_h))
    qk_norm = trace.adapter.qk_normed(lens.model)  # the model scores normalised q, k: these forms do not
    approx = bool(trace.adapter.rotary) or qk_norm
    note = QK_NORM_NOTE if qk_norm else ROPE_NOTE if approx else "exact"
    return QKForms(layer, t, q, k, q_dir, q_bias, k_dir, k_bias, approx, note)


# ------------------------------------------------------------------------------------------------
# neuron selection (VISIT's top / bottom neurons by signed activation * |row|)
# ------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class NeuronSelection:
    """Neurons picked by signed score = activation * |row|: the n_top largest, then the n_bottom smallest
    of the rest. indices, activation, norm, score: [n] (top ones first, each group in score order);
    rows [n, D]: the residual-space vectors the neurons write (W_O rows or FF2 values). MLP neurons of a
    mixture-of-experts layer: indices are rows of `MLPParts`, experts / neurons [n] (long) the (expert,
    neuron) pair of each (None otherwise); their score is the signed norm of the sub-update w_e a_{e,n} value_{e,n}."""

    indices: torch.Tensor
    activation: torch.Tensor
    norm: torch.Tensor
    score: torch.Tensor
    rows: torch.Tensor
    experts: torch.Tensor | None = None
    neurons: torch.Tensor | None = None


def _select(activation: torch.Tensor, rows: torch.Tensor, n_top: int, n_bottom: int) -> NeuronSelection:
    norm = rows.norm(dim=-1)
    score = activation * norm
    n_top = min(n_top, score.numel())
    top = score.topk(n_top).indices if n_top else torch.empty(0, dtype=torch.long)
    rest = torch.ones_like(score, dtype=torch.bool)
    rest[top] = False
    n_bottom = min(n_bottom, int(rest.sum()))
    left = torch.nonzero(rest).flatten()
    bottom = left[score[left].topk(n_bottom, largest=False).indices] if n_bottom else left[:0]
    idx = torch.cat([top, bottom])
    return NeuronSelection(idx, activation[idx], norm[idx], score[idx], rows[idx])


def wo_neurons(trace, layer: int, position: int = -1, n_top: int = 18, n_bottom: int = 7, *,
               attn: AttentionParts | None = None) -> NeuronSelection:
    """W_O "neurons": entries n of the concatenated head output O [H*d] (head n // d) scored by
    O[n] * |W_O[n, :]|; rows are the W_O rows [n, D] (in [in, out] orientation)."""
    lens = trace.lens
    attn = attn if attn is not None else attention_parts(trace, layer, position)
    rows = lens.attention_weights(attn.layer)["o"].to(attn.o.dtype).reshape(-1, lens.d_model)  # [H*d, D]
    return _select(attn.o.reshape(-1), rows, check_int(n_top, "n_top"), check_int(n_bottom, "n_bottom"))


def mlp_neurons(trace, layer: int, position: int = -1, n_top: int = 18, n_bottom: int = 7, *,
                mlp: MLPParts | None = None) -> NeuronSelection:
    """MLP neurons scored by a_n * |value_n|; rows are the values (FF2 rows) [n, D]. Mixture-of-experts
    layers: the neurons of the experts routed at `position`, scored by a_{e,n} * |w_e value_{e,n}|."""
    mlp = mlp if mlp is not None else mlp_parts(trace, layer, position)
    sel = _select(mlp.activation, mlp.values, check_int(n_top, "n_top"), check_int(n_bottom, "n_bottom"))
    if mlp.experts is not None:
        sel.experts, sel.neurons = mlp.experts[sel.indices], mlp.neurons[sel.indices]
    return sel


# ------------------------------------------------------------------------------------------------
# layer norm as a "semantic filter" (VISIT's observation; the numbers below are our operationalisation)
# ------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class LNFilter:
    """proj(LN input) against proj(LN output) for the two norms of each block ("ln1": resid pre ->
    attn_input; "ln2": resid mid, or pre in a parallel block -> mlp_input).

    layers [n], positions [P]; jaccard [n, 2, P]: |top-k(in) & top-k(out)| / |top-k(in) | top-k(out)|;
    rank_in, rank_out [n, 2, P]: the target's rank (0 = most probable); rank_change = rank_out - rank_in
    (negative: the norm moves the target up); kl [n, 2, P]: KL(proj(in) || proj(out)) in nats.
    """

    layers: list
    positions: list
    k: int
    target_id: int
    jaccard: torch.Tensor
    rank_in: torch.Tensor
    rank_out: torch.Tensor
    rank_change: torch.Tensor
    kl: torch.Tensor
    norms: tuple = ("ln1", "ln2")

    def at(self, layer: int, norm: str, position: int) -> dict:
        """The numbers of one norm at one position as a plain dict (JSON-friendly)."""
        i, n, p = self.layers.index(layer), self.norms.index(norm), self.positions.index(position)
        return {"jaccard": float(self.jaccard[i, n, p]), "rank_in": int(self.rank_in[i, n, p]),
                "rank_out": int(self.rank_out[i, n, p]), "rank_change": int(self.rank_change[i, n, p]),
                "kl": float(self.kl[i, n, p]), "k": self.k}


def ln_filter(trace, layers=None, k: int = 10, positions=None, target=None) -> LNFilter:
    """The LN semantic filter of `layers` (default all) at `positions` (default all; ints, negatives
    allowed), ranked for `target` (default the trace's). See `LNFilter`."""
    lens = trace.lens
    layers = check_layer_list(layers, trace.n_layers)
    positions = check_index_list(positions, len(trace), "positions", "position", sort=False)
    k = check_int(k, "k", 1, lens.vocab_size)
    tid = _target_id(trace, target)
    second_in = "pre" if _is_parallel(trace) else "mid"
    ins, outs = [], []
    for layer in layers:
        ins.append(torch.stack([trace.resid(layer, "pre"), trace.resid(layer, second_in)])[:, positions])
        outs.append(torch.stack([trace.attn_input(layer), trace.mlp_input(layer)])[:, positions])
    ins, outs = torch.stack(ins), torch.stack(outs)  # [n, 2, P, D]
    proj = lens.project(torch.stack([ins, outs]), k, target=tid)  # [2, n, 2, P]
    ids_in, ids_out = proj.ids[0], proj.ids[1]
    inter = (ids_in[..., :, None] == ids_out[..., None, :]).any(-1).sum(-1)  # top-k ids are distinct
    jaccard = inter.double() / (2 * k - inter).double()
    d = ins.shape[-1]
    kl = vocab.kl_rows(vocab.unembedding(lens), ins.reshape(-1, d), outs.reshape(-1, d)).reshape(ins.shape[:-1])
    rank_in, rank_out = proj.target_rank[0], proj.target_rank[1]
    return LNFilter(layers, positions, k, tid, jaccard, rank_in, rank_out, rank_out - rank_in, kl)


# ------------------------------------------------------------------------------------------------
# "regularization neurons" (VISIT's observation; a heuristic, labelled as such)
# ------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class NeuronActivity:
    """Per-MLP-neuron activity of one layer over a corpus of traces (a heuristic for VISIT's
    "regularization neurons": active almost always, with a consistent sign).

    frequency [F]: fraction of tokens with |a_n| > tau. mean_contribution [F]: mean over tokens of
    a_n * |value_n|. sign_consistency [F]: |mean sign(a_n)| over the tokens where the neuron is active
    (0 where never active). candidates [m]: "regularization neuron" candidates, neurons with
    frequency > min_freq and sign_consistency >= min_sign, by |mean_contribution| descending.
    """

    layer: int
    tau: float
    n_tokens: int
    frequency: torch.Tensor
    mean_contribution: torch.Tensor
    sign_consistency: torch.Tensor
    candidates: torch.Tensor
    heuristic: bool = True


def neuron_activity(traces, layer: int, tau: float | None = None, min_freq: float = 0.95,
                    min_sign: float = 0.95) -> NeuronActivity:
    """Activity of the MLP neurons of `layer` over `traces` (a Trace or a list of Traces of the same
    model), every token of every trace counted. tau=None: 0.1 * the RMS of all activations seen."""
    traces = [traces] if not isinstance(traces, (list, tuple)) else list(traces)
    if not traces:
        raise LensvizError("traces must be a Trace or a non-empty list of Traces")
    lens = traces[0].lens
    if any(tr.lens is not lens for tr in traces):
        raise LensvizError("all traces must come from the same Lens")
    layer = _layer(traces[0], layer)
    a = torch.cat([tr.mlp_activations(layer) for tr in traces]).double()  # [N, F]
    if tau is None:
        tau = 0.1 * float(a.pow(2).mean().sqrt())
    norms = lens.adapter.as_in_out(lens.weight(layer, "mlp_out")).double().norm(dim=-1)  # [F]
    active = a.abs() > tau
    freq = active.double().mean(0)
    contribution = (a * norms).mean(0)
    n_active = active.sum(0)
    signed = (torch.sign(a) * active).sum(0)
    consistency = torch.where(n_active > 0, signed.abs() / n_active.clamp_min(1), torch.zeros_like(freq))
    keep = torch.nonzero((freq > min_freq) & (consistency >= min_sign)).flatten()
    keep = keep[contribution[keep].abs().argsort(descending=True)]
    return NeuronActivity(layer, float(tau), a.shape[0], freq, contribution, consistency, keep)


# ------------------------------------------------------------------------------------------------
# the graph
# ------------------------------------------------------------------------------------------------
class _GraphBuilder:
    """Collects nodes (with their residual-space vectors) and edges; `finish` projects every vector of
    the graph in one batched `lens.project` call (plus one for bottom tokens, one for entropy/p(target))."""

    def __init__(self, lens, target_id: int, k: int):
        self.lens, self.target_id, self.k = lens, target_id, k
        self.nodes: list[dict] = []
        self.vectors: list[torch.Tensor] = []
        self.negative: list[int] = []  # node rows labelled by their bottom tokens
        self.extras: list[tuple[int, str, torch.Tensor]] = []
        self.edges: list[dict] = []
        self.index: dict[str, int] = {}

    def node(self, node_id: str, kind: str, vector: torch.Tensor, *, layer=None, head=None,
             negative: bool = False, **fields) -> str:
        if node_id in self.index:
            raise AssertionError(f"duplicate node {node_id}")  # a bug in the builder, not user input
        self.index[node_id] = len(self.nodes)
        if negative:
            self.negative.append(len(self.nodes))
        self.nodes.append({"id": node_id, "kind": kind, "layer": layer, "head": head,
                           "norm": float(vector.norm()), **fields})
        self.vectors.append(vector)
        return node_id

    def extra(self, node_id: str, field: str, vector: torch.Tensor) -> None:
        """Attach the projection of another vector to a node (hover data, e.g. the current key)."""
        self.extras.append((self.index[node_id], field, vector))

    def edge(self, source: str, target: str, weight: float, kind: str, meaning: str, **fields) -> None:
        self.edges.append({"source": source, "target": target, "weight": float(weight), "kind": kind,
                           "meaning": meaning, **fields})

    @staticmethod
    def _tops(topk) -> list:
        """Row by row [{"token", "id", "prob"}] * k of a 2-d TopK (tokens decoded once for all rows)."""
        return [[{"token": s, "id": i, "prob": p} for s, i, p in zip(toks, ids, probs)]
                for toks, ids, probs in zip(topk.tokens, topk.ids.tolist(), topk.probs.tolist())]

    def finish(self) -> tuple[list, list]:
        n = len(self.vectors)
        if n == 0:
            return [], []
        dtype = self.lens.model_dtype
        rows = torch.stack(self.vectors + [v for _, _, v in self.extras]).to(dtype)
        top = self.lens.project(rows, self.k, target=self.target_id)
        tops, ranks = self._tops(top), top.target_rank.tolist()
        entropy, p_target = vocab.entropy_and_target_prob(vocab.unembedding(self.lens), rows[:n], self.target_id)
        for i, node in enumerate(self.nodes):
            node["top"] = tops[i]
            node["label"] = node["top"][0]["token"]
            node["target_rank"] = ranks[i]
            node["target_prob"] = float(p_target[i])
            node["entropy"] = float(entropy[i])
        if self.negative:
            bottom = self._tops(self.lens.project(rows[self.negative], self.k, bottom=True))
            for j, i in enumerate(self.negative):
                node = self.nodes[i]
                node["bottom"] = bottom[j]
                node["label"] = node["bottom"][0]["token"]
        for j, (i, field, _) in enumerate(self.extras):
            self.nodes[i][field] = {"top": tops[n + j], "target_rank": ranks[n + j]}
        return self.nodes, self.edges


def _attention_subgraph(g: _GraphBuilder, trace, layer: int, t: int, attn: AttentionParts, qk: QKForms,
                        ids: dict, n_heads: int, n_memory: int, n_wo: tuple, s: dict) -> None:
    """attn_input -> qkv -> q_h -> key_j -> value_j -> head output -> concat -> W_O neurons / bias ->
    attn_output, for the `n_heads` heads with the largest |O_h| (before W_O)."""
    lens = trace.lens
    p = f"L{layer}."
    approx = {"approx": qk.approx, "note": qk.note}
    qkv = g.node(p + "qkv", "qkv", qk.q_dir.sum(0), layer=layer, position=t, **approx)
    g.extra(qkv, "key", qk.k_dir[:, t].sum(0))
    g.extra(qkv, "value", attn.memory_values[:, t].sum(0))
    x_norm = float(g.vectors[g.index[ids["attn_input"]]].norm())
    g.edge(ids["attn_input"], qkv, x_norm, "query", "|attn_input|")
    concat = g.node(p + "concat", "concat", attn.head_out.sum(0), layer=layer,
                    note="sum of all heads' O_h W_O,h (attention output without b_O)")
    o_norm = attn.o.norm(dim=-1)
    heads = o_norm.argsort(descending=True)[:n_heads].tolist()
    for h in heads:
        hp = f"{p}H{h}."
        q_norm = float(qk.q_dir[h].norm())
        qn = g.node(hp + "q", "head_query", qk.q_dir[h], layer=layer, head=h, position=t, **approx)
        g.extra(qn, "key", qk.k_dir[h, t])
        g.extra(qn, "value", attn.memory_values[h, t])
        g.edge(qkv, qn, s["head_query"] * q_norm, "head_query", f"{s['head_query']} * |W_K q_h|")
        out = g.node(hp + "out", "head_output", attn.head_out[h], layer=layer, head=h,
                     o_norm=float(o_norm[h]))
        out_norm = float(attn.head_out[h].norm())
        g.edge(out, concat, s["head_output"] * out_norm, "head_output", f"{s['head_output']} * |O_h W_O,h|")
        row = attn.attention[h, :t + 1]
        m = min(n_memory, t + 1)
        for j in row.topk(m).indices.tolist():
            score = float(row[j])
            where = {"position": j, "token": trace.tokens[j], "attention": score}
            key = g.node(f"{hp}key{j}", "memory_key", qk.k_dir[h, j], layer=layer, head=h, **where, **approx)
            val = g.node(f"{hp}value{j}", "memory_value", attn.memory_values[h, j], layer=layer, head=h, **where)
            w_att = max(s["attention"] * score, s["min_link"])
            g.edge(qn, key, w_att, "attention", f"max({s['attention']} * A, {s['min_link']})", attention=score)
            g.edge(key, val, w_att, "attention", f"max({s['attention']} * A, {s['min_link']})", attention=score)
            v_norm = float(attn.memory_values[h, j].norm())
            g.edge(val, out, max(s["memory"] * score * v_norm, s["min_link"]), "memory_value",
                   f"max({s['memory']} * A * |v_j W_O,h|, {s['min_link']})", attention=score)
    d = lens.d_head
    sel = wo_neurons(trace, layer, t, *n_wo, attn=attn)
    for n, act, score, vec in zip(sel.indices.tolist(), sel.activation.tolist(), sel.score.tolist(), sel.rows):
        neuron = g.node(f"{p}wo{n}", "wo_neuron", vec, layer=layer, head=n // d, neuron=n, activation=act,
                        score=score, negative=act < 0)
        sign = 1 if act >= 0 else -1
        g.edge(concat, neuron, s["fixed"], "neuron_in", "fixed", sign=sign, activation=act)
        g.edge(neuron, ids["attn_output"], abs(score), "neuron_out", "|O[n]| * |W_O[n]|", sign=sign)
    if attn.bias is not None:
        bias = g.node(p + "attn_bias", "bias", attn.bias, layer=layer, part="o_proj")
        g.edge(concat, bias, s["fixed"], "bias", "fixed")
        g.edge(bias, ids["attn_output"], float(attn.bias.norm()), "bias", "|b_O|")


def neuron_name(layer: int, neuron: int, expert: int | None = None) -> str:
    """A neuron's display name: "L{layer} #{neuron}", on mixture-of-experts layers "L{layer}E{expert} #{neuron}"."""
    return f"L{layer} #{neuron}" if expert is None else f"L{layer}E{expert} #{neuron}"


def _mlp_subgraph(g: _GraphBuilder, layer: int, mlp: MLPParts, ids: dict, n_mlp: tuple, s: dict,
                  trace) -> None:
    """mlp_input -> key_n -> value_n -> mlp_output for the selected neurons, plus bias nodes (on
    mixture-of-experts layers the neurons are (expert, neuron) pairs of the routed experts)."""
    p = f"L{layer}."
    sel = mlp_neurons(trace, layer, mlp.position, *n_mlp, mlp=mlp)
    for i, (row, act, score) in enumerate(zip(sel.indices.tolist(), sel.activation.tolist(), sel.score.tolist())):
        if sel.experts is None:
            n, where, q = row, {}, p
        else:
            e, n = int(sel.experts[i]), int(sel.neurons[i])
            where, q = {"expert": e, "router_weight": float(mlp.weights[row])}, f"{p}E{e}."
        name = neuron_name(layer, n, where.get("expert"))
        key = g.node(f"{q}key{n}", "mlp_key", mlp.keys[row], layer=layer, neuron=n, activation=act, name=name,
                     **where)
        if mlp.gate_keys is not None:
            g.extra(key, "gate", mlp.gate_keys[row])
        val = g.node(f"{q}value{n}", "mlp_value", mlp.values[row], layer=layer, neuron=n, activation=act,
                     score=score, negative=act < 0, name=name, **where)
        sign = 1 if act >= 0 else -1
        g.edge(ids["mlp_input"], key, s["fixed"], "mlp_key", "fixed")
        g.edge(key, val, s["mlp_activation"] * abs(act), "activation", f"{s['mlp_activation']} * |a_n|",
               sign=sign, activation=act)
        g.edge(val, ids["mlp_output"], abs(score), "mlp_value",
               "|a_n * |value_n||" if sel.experts is None else "|a_n * |w_e value_n|| (the sub-update's norm)",
               sign=sign)
    b_in = b_out = None
    if mlp.bias_in is not None:
        b_in = g.node(p + "mlp_in_bias", "bias", mlp.bias_in @ mlp.values, layer=layer, part="mlp_in",
                      approx=True, note="FF1 bias mapped through FF2, ignoring the nonlinearity")
        g.edge(ids["mlp_input"], b_in, s["fixed"], "bias", "fixed")
    if mlp.bias_out is not None:
        b_out = g.node(p + "mlp_out_bias", "bias", mlp.bias_out, layer=layer, part="mlp_out")
        g.edge(b_out, ids["mlp_output"], float(mlp.bias_out.norm()), "bias", "|b_FF2|")
    if b_in is not None and b_out is not None:
        g.edge(b_in, b_out, s["invisible"], "layout", "none (layout only)")


def visit_graph(trace, position: int = -1, layers=None, n_heads: int = 10, n_memory: int = 2,
                n_wo_top: int = 18, n_wo_bottom: int = 7, n_mlp_top: int = 18, n_mlp_bottom: int = 7,
                k: int = 5, target=None, scales: dict | None = None) -> dict:
    """The VISIT flow graph of `trace` at `position` (default the last token) for `layers` (None = all;
    an int or a list; shown in increasing order, consecutive blocks chained through their shared
    residual node, gaps bridged by a "skipped_layers" edge). About 140 nodes per layer with the defaults;
    all vectors are projected in one batched pass (SmolLM2: ~1-2 CPU-seconds for 3 layers).

    Every node is a residual-space vector read through proj(v) = softmax(W_U N_f(v)). Per block: the
    residual nodes, attn_input / mlp_input (norm outputs), attn_output / mlp_output; for the `n_heads`
    heads with the largest |O_h| (before W_O): the query direction W_K,g(h) q_h, the top `n_memory`
    memory entries j by A_h[t, j] (key node W_Q,h k_j, value node v_j W_O,h) and the head output
    O_h W_O,h; the W_O neurons and MLP neurons (n_*_top largest, n_*_bottom smallest signed
    activation * |row|); bias nodes where the family has biases. On mixture-of-experts families the MLP
    neurons are chosen among the (expert, neuron) pairs of the experts routed at `position`, scored by
    a_{e,n} * |w_e value_{e,n}| (the signed norm of the sub-update; router weight w_e folded into the value
    node's vector); their nodes are "L{l}.E{e}.key{n}" / "L{l}.E{e}.value{n}" with fields expert,
    router_weight and name "L{l}E{e} #{n}" (dense neurons: name "L{l} #{n}"). Parallel blocks have no
    residual_after_attn node: both norms read block_input (one shared LN node where the adapter names
    a single norm). Query/key directions are labelled approx under RoPE.

    Returns plain data (json.dumps works): {"method", "arch", "position", "token", "tokens", "target",
    "target_id", "layers", "parallel", "approx_qk", "scales", "nodes", "edges"}. A node: {"id", "kind", "layer",
    "head", "label" (top-1 token; the bottom-1 token for neurons with negative activation), "top"
    ([{"token", "id", "prob"}] * k), "target_rank" (0 = most probable), "target_prob", "entropy" (bits),
    "norm", and kind-specific fields (position, token, attention, neuron, expert, router_weight, name,
    activation, score, approx, note, bottom, key / value / gate hover projections)}. An edge: {"source", "target", "weight"
    (VISIT's width rules, `DEFAULT_SCALES`), "kind", "meaning", optional sign / attention / activation
    / filter (the LN semantic filter numbers on "ln" edges)}.
    """
    lens = trace.lens
    t = _position(trace, position)
    layers = check_layer_list(layers, trace.n_layers)
    counts = [check_int(v, name) for v, name in ((n_heads, "n_heads"), (n_memory, "n_memory"),
                                               (n_wo_top, "n_wo_top"), (n_wo_bottom, "n_wo_bottom"),
                                               (n_mlp_top, "n_mlp_top"), (n_mlp_bottom, "n_mlp_bottom"))]
    n_heads, n_memory = min(counts[0], lens.n_heads), counts[1]
    k = check_int(k, "k", 1, lens.vocab_size)
    if scales is not None and (not isinstance(scales, dict) or set(scales) - set(DEFAULT_SCALES)):
        raise LensvizError(f"scales must be a dict with keys from {sorted(DEFAULT_SCALES)}, got {scales!r}")
    s = {**DEFAULT_SCALES, **(scales or {})}
    tid = _target_id(trace, target)
    parallel = _is_parallel(trace)
    shared_ln = trace.adapter.ln1 == trace.adapter.ln2
    filt = ln_filter(trace, layers, k=10, positions=[t], target=tid)
    g = _GraphBuilder(lens, tid, k)
    prev = None  # (layer, block_output node id)
    for layer in layers:
        p = f"L{layer}."
        attn = attention_parts(trace, layer, t)
        mlp = mlp_parts(trace, layer, t)
        vec = block_vectors(trace, layer, t, attn=attn, mlp=mlp)
        x = trace.attn_input(layer)
        qk = _qk_forms(trace, layer, t, x)
        ids = {}
        if prev is not None and prev[0] == layer - 1:
            ids["block_input"] = prev[1]
        else:
            ids["block_input"] = g.node(p + "block_input", "block_input", vec["block_input"], layer=layer)
            if prev is not None:
                g.edge(prev[1], ids["block_input"], float(vec["block_input"].norm()), "skipped_layers",
                       f"layers {prev[0] + 1}..{layer - 1} not shown")
        ids["attn_input"] = g.node(p + "attn_input", "attn_input", vec["attn_input"], layer=layer)
        ids["attn_output"] = g.node(p + "attn_output", "attn_output", vec["attn_output"], layer=layer)
        if parallel and shared_ln:
            ids["mlp_input"] = ids["attn_input"]
        else:
            ids["mlp_input"] = g.node(p + "mlp_input", "mlp_input", vec["mlp_input"], layer=layer)
        ids["mlp_output"] = g.node(p + "mlp_output", "mlp_output", vec["mlp_output"], layer=layer)
        ids["block_output"] = g.node(p + "block_output", "block_output", vec["block_output"], layer=layer)
        n_in = float(vec["block_input"].norm())
        ln1, ln2 = filt.at(layer, "ln1", t), filt.at(layer, "ln2", t)
        g.edge(ids["block_input"], ids["attn_input"], n_in, "ln", "|block_input|", filter=ln1)
        if parallel:
            if not shared_ln:
                g.edge(ids["block_input"], ids["mlp_input"], n_in, "ln", "|block_input|", filter=ln2)
            g.edge(ids["attn_output"], ids["block_output"], float(vec["attn_output"].norm()), "sublayer",
                   "|attn_output|")
            g.edge(ids["block_input"], ids["block_output"], n_in, "residual", "|block_input|")
        else:
            mid = g.node(p + "residual_after_attn", "residual_after_attn", vec["residual_after_attn"],
                         layer=layer)
            n_mid = float(vec["residual_after_attn"].norm())
            g.edge(ids["attn_output"], mid, float(vec["attn_output"].norm()), "sublayer", "|attn_output|")
            g.edge(ids["block_input"], mid, n_in, "residual", "|block_input|")
            g.edge(mid, ids["mlp_input"], n_mid, "ln", "|residual_after_attn|", filter=ln2)
            g.edge(mid, ids["block_output"], n_mid, "residual", "|residual_after_attn|")
        g.edge(ids["mlp_output"], ids["block_output"], float(vec["mlp_output"].norm()), "sublayer", "|mlp_output|")
        _attention_subgraph(g, trace, layer, t, attn, qk, ids, n_heads, n_memory, (counts[2], counts[3]), s)
        _mlp_subgraph(g, layer, mlp, ids, (counts[4], counts[5]), s, trace)
        prev = (layer, ids["block_output"])
    nodes, edges = g.finish()
    return {
        "method": "visit",
        "arch": lens.arch,
        "position": t,
        "token": trace.tokens[t],
        "tokens": list(trace.tokens),
        "target": lens.decode(tid),
        "target_id": tid,
        "layers": layers,
        "parallel": parallel,
        "approx_qk": bool(trace.adapter.rotary) or trace.adapter.qk_normed(trace.lens.model),
        "scales": s,
        "nodes": nodes,
        "edges": edges,
    }


def head_summaries(trace, layer: int, position: int = -1, heads=None, n_memory: int = 2, k: int = 5,
                   target=None) -> list[dict]:
    """Per head of `layer` at `position` (default every head, in head order), plain data: {"layer",
    "head", "o_norm" (|O_h| before W_O), "output" (proj of O_h W_O,h), "query" (proj of W_K,g(h) q_h,
    with "approx"/"note"), "memory": [{"position", "token", "attention", "key" (proj of W_Q,h k_j),
    "value" (proj of v_j W_O,h), "value_norm"}] for the n_memory largest A_h[t, j]}. Each proj is
    {"top": [{"token", "id", "prob"}] * k, "target_rank", "target_prob", "entropy", "norm"}. All heads'
    vectors go through one batched projection."""
    lens = trace.lens
    layer, t = _layer(trace, layer), _position(trace, position)
    heads = check_index_list(heads, lens.n_heads, "heads", "head", sort=False)
    n_memory = check_int(n_memory, "n_memory")
    attn, qk = attention_parts(trace, layer, t), qk_forms(trace, layer, t)
    g = _GraphBuilder(lens, _target_id(trace, target), k)
    for h in heads:
        g.node(f"{h}.out", "head_output", attn.head_out[h])
        g.node(f"{h}.q", "head_query", qk.q_dir[h])
        row = attn.attention[h, :t + 1]
        for j in row.topk(min(n_memory, t + 1)).indices.tolist():
            g.node(f"{h}.key{j}", "memory_key", qk.k_dir[h, j], position=j)
            g.node(f"{h}.value{j}", "memory_value", attn.memory_values[h, j], position=j)
    nodes, _ = g.finish()
    by_id = {n["id"]: n for n in nodes}

    def proj(node_id):
        n = by_id[node_id]
        return {key: n[key] for key in ("top", "target_rank", "target_prob", "entropy", "norm")}

    out = []
    for h in heads:
        row = attn.attention[h, :t + 1]
        memory = []
        for j in row.topk(min(n_memory, t + 1)).indices.tolist():
            value = proj(f"{h}.value{j}")
            memory.append({"position": j, "token": trace.tokens[j], "attention": float(row[j]),
                           "key": proj(f"{h}.key{j}"), "value": value, "value_norm": value["norm"]})
        out.append({"layer": layer, "head": h, "o_norm": float(attn.o[h].norm()), "output": proj(f"{h}.out"),
                    "query": {**proj(f"{h}.q"), "approx": qk.approx, "note": qk.note}, "memory": memory})
    return out
