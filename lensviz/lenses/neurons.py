"""LM-Debugger (Geva et al. 2022, "LM-Debugger: An Interactive Tool for Inspection and Intervention in
Transformer-Based Language Models"): the MLP output as sub-updates m_i v_i, each
value vector's vocabulary projection, per-layer "before"/"after" predictions, and a cached inverted index
answering "which value vectors promote token X" over all layers.

Mixture-of-experts MLPs (Mixtral, Qwen3-MoE, gpt-oss): value vectors, norms and projections take
`expert=e`; a sub-update is w_{t,e} a_{e,n} value_{e,n} (router weight x activation x value vector, 0 at
positions not routed to e); `top_sub_updates` and `debugger_view` rank the (expert, neuron) pairs of the
experts each position was routed to (coefficient w a, label "L{layer}E{expert}D{dim}"), and the value
index covers every expert's values (hits carry "expert").
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import vocab
from ..checks import check_dims, check_index, check_index_list, check_int
from ..errors import LensvizError
from . import experts as ex

INDEX_VERSION = 1


# value vectors -----------------------------------------------------------------------------------------
def _layer(lens, layer) -> int:
    return check_index(layer, lens.n_layers, "layer")


def _need_expert(lens, expert, what: str):
    """None on dense families (which take no expert), else the checked expert index (MoE needs one)."""
    if expert is not None:
        return ex.check_expert(lens, expert)
    lens.adapter.require_dense_mlp(f"{what} without expert=")
    return None


def value_vectors(lens, layer: int, expert: int | None = None) -> torch.Tensor:
    """The value vectors v_i of a layer's MLP: the rows of FF2 in [in, out] orientation, [F, D]
    (GPT-2 `c_proj.weight`; Llama `down_proj.weight.T`). The MLP output is m @ value_vectors + bias.
    expert (MoE): expert e's value vectors (down_proj[e] as [F, D])."""
    layer = _layer(lens, layer)
    if _need_expert(lens, expert, "value_vectors") is not None:
        return ex.value_vectors(lens, layer, expert)[0]
    return lens.adapter.as_in_out(lens.weight(layer, "mlp_out"))


def value_bias(lens, layer: int, expert: int | None = None) -> torch.Tensor | None:
    """b [D], the FF2 bias (None where the family has none). expert (MoE): expert e's FF2 bias."""
    layer = _layer(lens, layer)
    if _need_expert(lens, expert, "value_bias") is not None:
        return ex.value_vectors(lens, layer, expert)[1]
    return lens.param(layer, "mlp_out", "bias")


def value_norms(lens, layers=None, expert: int | None = None) -> torch.Tensor:
    """||v_i||_2 for every value of the given layers (default all): [L', F] (expert e's on MoE)."""
    layers = check_index_list(layers, lens.n_layers, "layers", "layer", sort=False)
    return torch.stack([value_vectors(lens, layer, expert).norm(dim=-1) for layer in layers])


def sub_updates(trace, layer: int, dims, positions=None, expert: int | None = None) -> torch.Tensor:
    """The sub-updates m_i v_i of the given value dims: [P, n, D] for positions [P] (default all) and
    dims [n] (an int gives n = 1). expert (MoE): w_{t,e} a_{e,i} v_{e,i}, 0 at positions not routed to e."""
    lens = trace.lens
    dims = check_dims(dims, lens.d_mlp)
    pos = _positions(positions, len(trace))
    if _need_expert(lens, expert, "sub_updates") is not None:
        f = ex.expert_factors(trace, layer, expert)
        m = torch.zeros(len(trace), lens.d_mlp, dtype=f.a.dtype)
        m.index_copy_(0, f.rows, f.a * f.weight[:, None].to(f.a.dtype))  # w a, 0 where not routed
        m = m[pos][:, dims]
    else:
        m = trace.mlp_activations(layer)[pos][:, dims]  # [P, n]
    v = value_vectors(lens, layer, expert)[dims].to(m.dtype)  # [n, D]
    return m[:, :, None] * v[None]


def mlp_output(trace, layer: int) -> torch.Tensor:
    """The MLP output rebuilt from its sub-updates, sum_i m_i v_i + b: [T, D] (MoE: summed over each
    position's experts, sum_e w_{t,e} (a_e v_e + b_e))."""
    if trace.adapter.moe:
        return ex.mlp_output(trace, _layer(trace.lens, layer))
    m = trace.mlp_activations(layer)
    out = m @ value_vectors(trace.lens, layer).to(m.dtype)
    b = value_bias(trace.lens, layer)
    return out if b is None else out + b.to(m.dtype)


@dataclass(eq=False)
class SubUpdates:
    """The dominant sub-updates of some layers at some positions, ranked by score |m_i| * ||v_i||.

    layers [L'] and positions [P] (lists of ints); dims, coeffs, scores: [L', P, k] (value index i,
    its coefficient m_i with sign, and the score). Labels read "L{layer}D{dim}".
    MoE: experts [L', P, k] (the expert of each value; None on dense MLPs), coeffs are w_e a_{e,i} (router
    weight x activation) and labels read "L{layer}E{expert}D{dim}".
    """

    layers: list
    positions: list
    dims: torch.Tensor
    coeffs: torch.Tensor
    scores: torch.Tensor
    experts: torch.Tensor | None = None

    def labels(self) -> list:
        """Nested lists [L'][P][k] of "L{layer}D{dim}" (MoE "L{layer}E{expert}D{dim}") strings."""
        if self.experts is None:
            return [[[f"L{layer}D{d}" for d in row] for row in per_layer.tolist()]
                    for layer, per_layer in zip(self.layers, self.dims)]
        return [[[f"L{layer}E{e}D{d}" for e, d in zip(erow, drow)] for erow, drow in zip(pe.tolist(), pd.tolist())]
                for layer, pe, pd in zip(self.layers, self.experts, self.dims)]


def _top_expert_sub_updates(trace, k, layers, pos) -> SubUpdates:
    """MoE: rank the (expert, neuron) pairs of each position's routed experts by |w a| ||v||."""
    lens = trace.lens
    dims, coeffs, scores, experts = [], [], [], []
    for layer in layers:
        chosen, weights, acts = ex.expert_activations(trace, layer)  # [T, s], [T, s], [T, s, F]
        norms = ex.value_norms(lens, layer)  # [E, F]
        m = (weights.to(acts.dtype)[..., None] * acts)[pos]  # [P, s, F]
        score = (m.abs() * norms.to(m.dtype)[chosen[pos]]).flatten(1)  # [P, s*F]
        top = score.topk(k, dim=-1)
        dims.append(top.indices % lens.d_mlp)
        experts.append(chosen[pos].gather(-1, top.indices // lens.d_mlp))
        scores.append(top.values)
        coeffs.append(m.flatten(1).gather(-1, top.indices))
    return SubUpdates(layers=layers, positions=pos.tolist(), dims=torch.stack(dims), coeffs=torch.stack(coeffs),
                      scores=torch.stack(scores), experts=torch.stack(experts))


def top_sub_updates(trace, k: int = 10, *, layers=None, positions=None) -> SubUpdates:
    """Top-k sub-updates per layer and position by |m_i| * ||v_i|| (negative m_i included); MoE: over the
    neurons of the experts each position was routed to, by |w_e a_{e,i}| * ||v_{e,i}||."""
    lens = trace.lens
    layers = check_index_list(layers, lens.n_layers, "layers", "layer", sort=False)
    pos = _positions(positions, len(trace))
    if lens.adapter.moe:
        k = check_int(k, "k", 1, lens.d_mlp * trace.router(0)[0].shape[-1])
        return _top_expert_sub_updates(trace, k, layers, pos)
    k = check_int(k, "k", 1, lens.d_mlp)
    dims, coeffs, scores = [], [], []
    for layer in layers:
        m = trace.mlp_activations(layer)[pos]  # [P, F]
        score = m.abs() * value_vectors(lens, layer).norm(dim=-1).to(m.dtype)
        top = score.topk(k, dim=-1)
        dims.append(top.indices)
        scores.append(top.values)
        coeffs.append(m.gather(-1, top.indices))
    return SubUpdates(layers=layers, positions=pos.tolist(), dims=torch.stack(dims),
                      coeffs=torch.stack(coeffs), scores=torch.stack(scores))


# vocabulary projections of value vectors -----------------------------------------------------------
@dataclass(eq=False)
class ValueTokens:
    """Top tokens of raw projections v E (no softmax): ids [..., k], logits [..., k], tokens (nested
    lists of str shaped like ids)."""

    ids: torch.Tensor
    logits: torch.Tensor
    _strings: list = field(repr=False, default=None)

    @property
    def tokens(self) -> list:
        return vocab.nested_tokens(self.ids, self._strings)


def _topk_logits(lens, vectors: torch.Tensor, k: int, *, fold_norm: bool = False, bottom: bool = False):
    """Top (bottom) k raw logits W_U v (fold_norm: W_U (gamma_f * v); no norm, no bias) of rows [N, D]:
    (ids [N, k] long, logits [N, k] float32)."""
    gamma = lens.norm_gain(None) if fold_norm else None
    readout = vocab.unembedding(lens, norm=False, bias=False, gain=gamma)
    return vocab.top_logits(readout, vectors, k, bottom=bottom)


def project_values(lens, layer: int, dims, k: int = 10, *, fold_norm: bool = False, signs=None,
                   bottom: bool = False, expert: int | None = None) -> ValueTokens:
    """Top-k tokens of the value vectors `dims` ([n] or int) of `layer`: logits v_i E = W_U v_i (the
    legacy raw projection, default) or W_U (gamma_f * v_i) with fold_norm=True (gamma_f = final-norm gain).
    signs [n] (e.g. the coefficients m_i; only their sign is used) gives the sign-corrected projection
    sign(m_i) * v_i E. Returns ValueTokens with leading dim [n] (or none for an int dim).
    expert (MoE): the values of expert e."""
    scalar = isinstance(dims, int) and not isinstance(dims, bool)
    dims = check_dims(dims, lens.d_mlp)
    k = check_int(k, "k", 1, lens.vocab_size)
    v = value_vectors(lens, layer, expert)[dims]
    if signs is not None:
        s = torch.as_tensor(signs).reshape(-1)
        if s.numel() != len(dims):
            raise LensvizError(f"signs must have one entry per dim ({len(dims)}), got {s.numel()}")
        v = v * torch.where(s < 0, -1.0, 1.0).to(v.dtype)[:, None]
    ids, logits = _topk_logits(lens, v, k, fold_norm=fold_norm, bottom=bottom)
    if scalar:
        ids, logits = ids[0], logits[0]
    return ValueTokens(ids=ids, logits=logits, _strings=lens.token_strings)


# before / after predictions ------------------------------------------------------------------------
@dataclass(eq=False)
class LayerPredictions:
    """Per-layer vocabulary projections at one position: `before` = resid "mid" (the MLP's residual
    input, after attention) and `after` = resid "post" (the block output); TopK with leading dim
    [n_layers]. after(l) is the input of block l+1; before(l+1) differs from it by layer l+1's
    attention output."""

    position: int
    before: object
    after: object


def layer_predictions(trace, k: int = 10, position: int = -1) -> LayerPredictions:
    """The "before" and "after" views of every layer at `position` (proj = softmax(W_U N_f(h)),
    ranked for the trace's target)."""
    lens = trace.lens
    pos = check_index(position, len(trace), "position")
    before = torch.stack([trace.resid(layer, "mid")[pos] for layer in range(lens.n_layers)])
    after = torch.stack([trace.resid(layer, "post")[pos] for layer in range(lens.n_layers)])
    return LayerPredictions(position=pos, before=lens.project(before, k, target=trace.target_id),
                            after=lens.project(after, k, target=trace.target_id))


def debugger_view(trace, *, position: int = -1, k: int = 10, value_k: int = 10, fold_norm: bool = False,
                  layers=None) -> dict:
    """Plain-data (JSON-friendly) LM-Debugger prediction view at one position:
    {"tokens", "position", "target", "target_id", "projection": "raw"|"folded",
     "layers": [{"layer", "before": [{"token", "id", "prob"}] (k), "after": [...],
                 "sub_updates": [{"label", "layer", "dim", "coeff", "score",
                                  "tokens": [{"token", "id", "logit"}] (value_k, sign-corrected)}] (k)}]}.
    MoE: each sub-update also has "expert" (its coeff is w_e a_{e,i}, its label "L{layer}E{expert}D{dim}")."""
    lens = trace.lens
    preds = layer_predictions(trace, k, position)
    subs = top_sub_updates(trace, k, layers=layers, positions=[preds.position])
    strings = lens.token_strings

    def dist(topk, i):
        return [{"token": strings[t], "id": t, "prob": p}
                for t, p in zip(topk.ids[i].tolist(), topk.probs[i].tolist())]

    out_layers = []
    for j, layer in enumerate(subs.layers):
        dims, coeffs, scores = subs.dims[j, 0], subs.coeffs[j, 0], subs.scores[j, 0]
        labels = subs.labels()[j][0]
        if subs.experts is None:
            projs = [project_values(lens, layer, dims, value_k, fold_norm=fold_norm, signs=coeffs)]
            which = [(0, r) for r in range(len(dims))]
        else:  # one projection per expert among this layer's top sub-updates
            es = subs.experts[j, 0].tolist()
            uniq = sorted(set(es))
            projs = [project_values(lens, layer, dims, value_k, fold_norm=fold_norm, signs=coeffs, expert=e)
                     for e in uniq]
            which = [(uniq.index(e), r) for r, e in enumerate(es)]
        items = []
        for r, (d, c, s) in enumerate(zip(dims.tolist(), coeffs.tolist(), scores.tolist())):
            p, row = which[r]
            toks = [{"token": strings[t], "id": t, "logit": lg}
                    for t, lg in zip(projs[p].ids[row].tolist(), projs[p].logits[row].tolist())]
            item = {"label": labels[r], "layer": layer, "dim": d, "coeff": c, "score": s, "tokens": toks}
            if subs.experts is not None:
                item["expert"] = int(subs.experts[j, 0, r])
            items.append(item)
        out_layers.append({"layer": layer, "before": dist(preds.before, layer), "after": dist(preds.after, layer),
                           "sub_updates": items})
    return {"tokens": list(trace.tokens), "position": preds.position, "target": trace.target,
            "target_id": trace.target_id, "projection": "folded" if fold_norm else "raw", "layers": out_layers}


# search: which value vectors promote token X ---------------------------------------------------------
def default_cache_dir() -> Path:
    """$LENSVIZ_CACHE if set, else ~/.cache/lensviz."""
    env = os.environ.get("LENSVIZ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lensviz"


def _sample(t: torch.Tensor, n: int = 512) -> bytes:
    """A fingerprint of a tensor: a strided sample of n entries plus its float64 sum and norm (so an
    edit of any single entry changes it)."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // n)
    sample = flat[::step][:n].to("cpu", torch.float64)
    total = torch.stack([flat.sum(dtype=torch.float64), torch.linalg.vector_norm(flat, dtype=torch.float64)])
    return sample.numpy().tobytes() + total.cpu().numpy().tobytes()


def _ff2_matrices(lens, layer: int) -> list:
    """The FF2 weights of a layer: its one matrix, or every expert's values (MoE)."""
    if lens.adapter.moe:
        return [value_vectors(lens, layer, e) for e in range(ex.n_experts(lens))]
    return [lens.weight(layer, "mlp_out")]


def _value_groups(lens, layers):
    """A layer's value vectors [F, D] one group at a time (one per expert on MoE, expert-major), layer-major:
    the row order of a ValueIndex, without holding every layer's values at once."""
    for layer in layers:
        if lens.adapter.moe:
            for e in range(ex.n_experts(lens)):
                yield value_vectors(lens, layer, e)
        else:
            yield value_vectors(lens, layer)


def index_key(lens, k: int, *, fold_norm: bool, bottom: bool, layers) -> str:
    """Cache key of a value index: model name, sizes, weight shapes and a fingerprint (strided sample,
    sum and norm) of the unembedding (and of the projection before it, OPT-350m), every indexed FF2 matrix
    (and the final-norm gain when folded),
    plus the options."""
    h = hashlib.sha256()
    name = str(getattr(lens.model.config, "_name_or_path", "") or type(lens.model).__name__)
    h.update(repr((INDEX_VERSION, name, lens.arch, tuple(vars(lens.dims).values()), k, fold_norm, bottom,
                   list(layers))).encode())
    w_u = lens.unembed_module.weight
    h.update(repr((tuple(w_u.shape), str(w_u.dtype))).encode())
    h.update(_sample(w_u, 4096))
    if lens.adapter.unembed_proj is not None:  # the readout is W_U W_out (OPT-350m's project_out)
        w_out = lens.model.get_submodule(lens.adapter.unembed_proj).weight
        h.update(repr(tuple(w_out.shape)).encode())
        h.update(_sample(w_out, 4096))
    for layer in layers:
        for w in _ff2_matrices(lens, layer):
            h.update(repr((layer, tuple(w.shape))).encode())
            h.update(_sample(w))
    gamma = lens.norm_gain(None)
    if fold_norm and gamma is not None:
        h.update(_sample(gamma))
    return h.hexdigest()


class ValueIndex:
    """Inverted index token -> [(layer, dim, rank, logit)] over the top-k tokens of every indexed value
    vector's projection (raw v E, or folded with the final-norm gain). With bottom=True the k most
    negative tokens are indexed too, with sign -1: they are promoted when m_i < 0.

    Arrays: ids, logits [S, N, k] (S = 1 or 2 signs, N = len(layers) * d_mlp values in layer-major order;
    MoE: N = len(layers) * n_experts * d_mlp, layer-major then expert-major),
    order [S*N*k] (flat entry numbers grouped by token, each group sorted by rank then |logit| descending),
    offsets [V+1] (token t's entries are order[offsets[t]:offsets[t+1]]).
    """

    def __init__(self, ids, logits, layers, d_mlp, *, fold_norm, bottom, strings, key="", order=None,
                 offsets=None, n_experts: int = 0):
        self.ids, self.logits = ids, logits
        self.n_experts = int(n_experts)  # 0: dense MLPs
        self.layers, self.d_mlp, self.k = list(layers), int(d_mlp), int(ids.shape[-1])
        self.fold_norm, self.bottom, self.key = bool(fold_norm), bool(bottom), key
        self._strings = strings
        self._variants = None
        if order is None:
            order, offsets = self._invert(ids, logits, len(strings))
        self.order, self.offsets = order, offsets

    @staticmethod
    def _invert(ids, logits, n_vocab):
        flat_ids = ids.reshape(-1).long()
        k = ids.shape[-1]
        rank = torch.arange(flat_ids.numel()) % k
        order = torch.arange(flat_ids.numel())
        for key in (-logits.reshape(-1).abs(), rank, flat_ids):  # last sort is the primary key
            order = order[torch.sort(key[order], stable=True).indices]
        counts = torch.bincount(flat_ids, minlength=n_vocab)
        offsets = torch.zeros(n_vocab + 1, dtype=torch.long)
        offsets[1:] = counts.cumsum(0)
        return order.to(torch.int32 if order.numel() < 2**31 else torch.long), offsets

    def __len__(self) -> int:
        return len(self.layers) * max(1, self.n_experts) * self.d_mlp

    def __repr__(self) -> str:
        return (f"ValueIndex({len(self)} values, layers={len(self.layers)}, k={self.k}, "
                f"{'folded' if self.fold_norm else 'raw'}{', both signs' if self.bottom else ''})")

    # query ---------------------------------------------------------------------------------------------
    def token_ids(self, query) -> list:
        """Token ids a query names: an int id; a str matches every token whose text, stripped of
        surrounding whitespace and lower-cased, equals the query's (so "paris" finds "Paris", " paris",
        "\\nParis", as the legacy search did); a list/tuple is the union of its items."""
        if isinstance(query, (list, tuple)):
            out = []
            for q in query:
                out.extend(t for t in self.token_ids(q) if t not in out)
            return out
        if isinstance(query, str):
            if self._variants is None:
                table = {}
                for i, s in enumerate(self._strings):
                    table.setdefault(s.strip().lower(), []).append(i)
                self._variants = table
            return list(self._variants.get(query.strip().lower(), []))
        if isinstance(query, bool) or not isinstance(query, int):
            if isinstance(query, torch.Tensor) and query.numel() == 1 and not query.is_floating_point():
                query = int(query)
            else:
                raise LensvizError(f"a value-index query is a token str, an int id or a list of them, got {query!r}")
        if not 0 <= query < len(self._strings):
            raise LensvizError(f"token id {query} is outside the vocabulary [0, {len(self._strings) - 1}]")
        return [query]

    def lookup(self, query) -> dict:
        """Tensor form of `query`: {"entry" [n] flat entry numbers, "token_id", "sign", "layer", "dim",
        "rank", "logit"} each [n] (MoE: and "expert"), sorted by rank, then |logit| descending."""
        tids = self.token_ids(query)
        parts = [self.order[self.offsets[t]:self.offsets[t + 1]].long() for t in tids]
        entry = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        k, n = self.k, len(self)
        rank = entry % k
        logit = self.logits.reshape(-1)[entry]
        if len(parts) > 1:
            order = torch.sort(-logit.abs(), stable=True).indices
            order = order[torch.sort(rank[order], stable=True).indices]
            entry, rank, logit = entry[order], rank[order], logit[order]
        value = (entry // k) % n
        sign = 1 - 2 * (entry // (k * n))
        group = value // self.d_mlp  # layer-major, then expert
        g = max(1, self.n_experts)
        out = {"entry": entry, "token_id": self.ids.reshape(-1)[entry].long(), "sign": sign,
               "layer": torch.as_tensor(self.layers, dtype=torch.long)[group // g],
               "dim": value % self.d_mlp, "rank": rank, "logit": logit}
        if self.n_experts:
            out["expert"] = group % g
        return out

    def query(self, query, limit: int | None = 20) -> list:
        """Value vectors promoting the queried token(s), best first (by the token's rank in the value's
        projection, then |logit|): a list of {"layer", "dim", "label", "rank", "logit", "sign",
        "token_id", "token"} (sign -1: a bottom-k hit, promoted when m_i < 0). limit=None returns all.
        MoE: each hit also has "expert", and its label reads "L{layer}E{expert}D{dim}"."""
        if limit is not None:
            limit = check_int(limit, "limit", 0)
        found = self.lookup(query)
        if limit is not None:
            found = {name: t[:limit] for name, t in found.items()}
        cols = [found[n].tolist() for n in ("layer", "dim", "rank", "logit", "sign", "token_id")]
        hits = [{"layer": layer, "dim": d, "label": f"L{layer}D{d}", "rank": r, "logit": lg, "sign": s,
                 "token_id": t, "token": self._strings[t]} for layer, d, r, lg, s, t in zip(*cols)]
        if self.n_experts:
            for hit, e in zip(hits, found["expert"].tolist()):
                hit["expert"], hit["label"] = e, f"L{hit['layer']}E{e}D{hit['dim']}"
        return hits

    def value_tokens(self, layer: int, dim: int, sign: int = 1, expert: int | None = None) -> list:
        """The stored top-k tokens of one value: [{"token", "id", "logit"}] (sign -1: its bottom-k);
        on a MoE index `expert` names the expert whose value it is."""
        if layer not in self.layers:
            raise LensvizError(f"layer {layer} is not in this index (layers {self.layers})")
        if not 0 <= dim < self.d_mlp:
            raise LensvizError(f"dim must be in [0, {self.d_mlp - 1}], got {dim}")
        if sign not in (1, -1) or (sign == -1 and not self.bottom):
            raise LensvizError("sign must be 1, or -1 for an index built with bottom=True")
        if self.n_experts:
            if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < self.n_experts:
                raise LensvizError(f"this value index covers a mixture-of-experts model, whose values are per "
                                   f"expert: value_tokens needs expert= an int in [0, {self.n_experts - 1}] (each "
                                   f"hit of query() names its expert), got {expert!r}")
            group = self.layers.index(layer) * self.n_experts + expert
        elif expert is not None:
            raise LensvizError("this index covers a dense MLP: leave expert=None")
        else:
            group = self.layers.index(layer)
        row = group * self.d_mlp + dim
        s = 0 if sign == 1 else 1
        return [{"token": self._strings[t], "id": t, "logit": lg}
                for t, lg in zip(self.ids[s, row].tolist(), self.logits[s, row].tolist())]

    # persistence ------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"version": INDEX_VERSION, "key": self.key, "ids": self.ids, "logits": self.logits,
                "layers": self.layers, "d_mlp": self.d_mlp, "fold_norm": self.fold_norm, "bottom": self.bottom,
                "order": self.order, "offsets": self.offsets, "n_experts": self.n_experts}


def build_value_index(lens, k: int = 50, *, fold_norm: bool = False, bottom: bool = False, layers=None,
                      cache_dir=None, use_cache: bool = True) -> ValueIndex:
    """The value-vector search index of a model, loaded from the disk cache when present, else
    precomputed (chunked batched matmuls over all values of `layers`, default all; every expert's on
    mixture-of-experts models) and saved.

    k: tokens kept per value (legacy 50). fold_norm: index W_U (gamma_f * v) instead of v E. bottom: also
    index the k most negative tokens (sign -1). cache_dir: default $LENSVIZ_CACHE or ~/.cache/lensviz;
    use_cache=False neither reads nor writes the cache. The file name carries a hash of the model name,
    the weight shapes and a fingerprint of the unembedding and FF2 weights (see `index_key`)."""
    k = check_int(k, "k", 1, lens.vocab_size)
    layers = check_index_list(layers, lens.n_layers, "layers", "layer")
    key = index_key(lens, k, fold_norm=fold_norm, bottom=bottom, layers=layers)
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = path / f"value_index-{key[:24]}.pt"
    strings = lens.token_strings
    if use_cache and path.exists():
        try:
            st = torch.load(path, weights_only=True)
            if st.get("version") == INDEX_VERSION and st.get("key") == key:
                return ValueIndex(st["ids"], st["logits"], st["layers"], st["d_mlp"], fold_norm=st["fold_norm"],
                                  bottom=st["bottom"], strings=strings, key=key, order=st["order"],
                                  offsets=st["offsets"], n_experts=st.get("n_experts", 0))
        except Exception:  # unreadable or stale cache file: rebuild it
            pass
    signs = (False, True) if bottom else (False,)
    parts = {b: ([], []) for b in signs}
    for vectors in _value_groups(lens, layers):  # [F, D] at a time
        for b in signs:
            ids, logits = _topk_logits(lens, vectors, k, fold_norm=fold_norm, bottom=b)
            parts[b][0].append(ids)
            parts[b][1].append(logits)
    all_ids = [torch.cat(parts[b][0]) for b in signs]
    all_logits = [torch.cat(parts[b][1]) for b in signs]
    index = ValueIndex(torch.stack(all_ids).to(torch.int32), torch.stack(all_logits), layers, lens.d_mlp,
                       fold_norm=fold_norm, bottom=bottom, strings=strings, key=key, n_experts=ex.n_experts(lens))
    if use_cache:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(index.state(), tmp)
            os.replace(tmp, path)
        except OSError as err:  # a read-only or full cache dir costs a recompute next time, nothing more
            warnings.warn(f"lensviz: could not write the value-index cache {path}: {err}", stacklevel=2)
    return index


def _positions(positions, t: int) -> torch.Tensor:
    """Positions as LongTensor [P] (None = all; an int gives [1]; negatives count from the end)."""
    return torch.tensor(check_index_list(positions, t, "positions", "position", sort=False), dtype=torch.long)
