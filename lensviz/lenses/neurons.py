"""LM-Debugger (Geva et al. 2022, "LM-Debugger: An Interactive Tool for Inspection and Intervention in
Transformer-Based Language Models"): the MLP output as sub-updates m_i v_i, each
value vector's vocabulary projection, per-layer "before"/"after" predictions, and a cached inverted index
answering "which value vectors promote token X" over all layers.
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

INDEX_VERSION = 1


# value vectors -----------------------------------------------------------------------------------------
def _layer(lens, layer) -> int:
    return check_index(layer, lens.n_layers, "layer")


def value_vectors(lens, layer: int) -> torch.Tensor:
    """The value vectors v_i of a layer's MLP: the rows of FF2 in [in, out] orientation, [F, D]
    (GPT-2 `c_proj.weight`; Llama `down_proj.weight.T`). The MLP output is m @ value_vectors + bias."""
    return lens.adapter.as_in_out(lens.weight(_layer(lens, layer), "mlp_out"))


def value_bias(lens, layer: int) -> torch.Tensor | None:
    """b [D], the FF2 bias (None where the family has none)."""
    return lens.param(_layer(lens, layer), "mlp_out", "bias")


def value_norms(lens, layers=None) -> torch.Tensor:
    """||v_i||_2 for every value of the given layers (default all): [L', F]."""
    layers = check_index_list(layers, lens.n_layers, "layers", "layer", sort=False)
    return torch.stack([value_vectors(lens, layer).norm(dim=-1) for layer in layers])


def sub_updates(trace, layer: int, dims, positions=None) -> torch.Tensor:
    """The sub-updates m_i v_i of the given value dims: [P, n, D] for positions [P] (default all) and
    dims [n] (an int gives n = 1)."""
    lens = trace.lens
    dims = check_dims(dims, lens.d_mlp)
    m = trace.mlp_activations(layer)[_positions(positions, len(trace))][:, dims]  # [P, n]
    v = value_vectors(lens, layer)[dims].to(m.dtype)  # [n, D]
    return m[:, :, None] * v[None]


def mlp_output(trace, layer: int) -> torch.Tensor:
    """The MLP output rebuilt from its sub-updates, sum_i m_i v_i + b: [T, D]."""
    m = trace.mlp_activations(layer)
    out = m @ value_vectors(trace.lens, layer).to(m.dtype)
    b = value_bias(trace.lens, layer)
    return out if b is None else out + b.to(m.dtype)


@dataclass(eq=False)
class SubUpdates:
    """The dominant sub-updates of some layers at some positions, ranked by score |m_i| * ||v_i||.

    layers [L'] and positions [P] (lists of ints); dims, coeffs, scores: [L', P, k] (value index i,
    its coefficient m_i with sign, and the score). Labels read "L{layer}D{dim}".
    """

    layers: list
    positions: list
    dims: torch.Tensor
    coeffs: torch.Tensor
    scores: torch.Tensor

    def labels(self) -> list:
        """Nested lists [L'][P][k] of "L{layer}D{dim}" strings."""
        return [[[f"L{layer}D{d}" for d in row] for row in per_layer.tolist()]
                for layer, per_layer in zip(self.layers, self.dims)]


def top_sub_updates(trace, k: int = 10, *, layers=None, positions=None) -> SubUpdates:
    """Top-k sub-updates per layer and position by |m_i| * ||v_i|| (negative m_i included)."""
    lens = trace.lens
    k = check_int(k, "k", 1, lens.d_mlp)
    layers = check_index_list(layers, lens.n_layers, "layers", "layer", sort=False)
    pos = _positions(positions, len(trace))
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
                   bottom: bool = False) -> ValueTokens:
    """Top-k tokens of the value vectors `dims` ([n] or int) of `layer`: logits v_i E = W_U v_i (the
    legacy raw projection, default) or W_U (gamma_f * v_i) with fold_norm=True (gamma_f = final-norm gain).
    signs [n] (e.g. the coefficients m_i; only their sign is used) gives the sign-corrected projection
    sign(m_i) * v_i E. Returns ValueTokens with leading dim [n] (or none for an int dim)."""
    scalar = isinstance(dims, int) and not isinstance(dims, bool)
    dims = check_dims(dims, lens.d_mlp)
    k = check_int(k, "k", 1, lens.vocab_size)
    v = value_vectors(lens, layer)[dims]
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
                                  "tokens": [{"token", "id", "logit"}] (value_k, sign-corrected)}] (k)}]}."""
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
        proj = project_values(lens, layer, dims, value_k, fold_norm=fold_norm, signs=coeffs)
        items = []
        for r, (d, c, s) in enumerate(zip(dims.tolist(), coeffs.tolist(), scores.tolist())):
            toks = [{"token": strings[t], "id": t, "logit": lg}
                    for t, lg in zip(proj.ids[r].tolist(), proj.logits[r].tolist())]
            items.append({"label": f"L{layer}D{d}", "layer": layer, "dim": d, "coeff": c, "score": s,
                          "tokens": toks})
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


def index_key(lens, k: int, *, fold_norm: bool, bottom: bool, layers) -> str:
    """Cache key of a value index: model name, sizes, weight shapes and a fingerprint (strided sample,
    sum and norm) of the unembedding, every indexed FF2 matrix (and the final-norm gain when folded),
    plus the options."""
    h = hashlib.sha256()
    name = str(getattr(lens.model.config, "_name_or_path", "") or type(lens.model).__name__)
    h.update(repr((INDEX_VERSION, name, lens.arch, tuple(vars(lens.dims).values()), k, fold_norm, bottom,
                   list(layers))).encode())
    w_u = lens.unembed_module.weight
    h.update(repr((tuple(w_u.shape), str(w_u.dtype))).encode())
    h.update(_sample(w_u, 4096))
    for layer in layers:
        w = lens.weight(layer, "mlp_out")
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

    Arrays: ids, logits [S, N, k] (S = 1 or 2 signs, N = len(layers) * d_mlp values in layer-major order),
    order [S*N*k] (flat entry numbers grouped by token, each group sorted by rank then |logit| descending),
    offsets [V+1] (token t's entries are order[offsets[t]:offsets[t+1]]).
    """

    def __init__(self, ids, logits, layers, d_mlp, *, fold_norm, bottom, strings, key="", order=None,
                 offsets=None):
        self.ids, self.logits = ids, logits
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
        return len(self.layers) * self.d_mlp

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
        "rank", "logit"} each [n], sorted by rank, then |logit| descending."""
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
        return {"entry": entry, "token_id": self.ids.reshape(-1)[entry].long(), "sign": sign,
                "layer": torch.as_tensor(self.layers, dtype=torch.long)[value // self.d_mlp],
                "dim": value % self.d_mlp, "rank": rank, "logit": logit}

    def query(self, query, limit: int | None = 20) -> list:
        """Value vectors promoting the queried token(s), best first (by the token's rank in the value's
        projection, then |logit|): a list of {"layer", "dim", "label", "rank", "logit", "sign",
        "token_id", "token"} (sign -1: a bottom-k hit, promoted when m_i < 0). limit=None returns all."""
        if limit is not None:
            limit = check_int(limit, "limit", 0)
        found = self.lookup(query)
        if limit is not None:
            found = {name: t[:limit] for name, t in found.items()}
        cols = [found[n].tolist() for n in ("layer", "dim", "rank", "logit", "sign", "token_id")]
        return [{"layer": layer, "dim": d, "label": f"L{layer}D{d}", "rank": r, "logit": lg, "sign": s,
                 "token_id": t, "token": self._strings[t]} for layer, d, r, lg, s, t in zip(*cols)]

    def value_tokens(self, layer: int, dim: int, sign: int = 1) -> list:
        """The stored top-k tokens of one value: [{"token", "id", "logit"}] (sign -1: its bottom-k)."""
        if layer not in self.layers:
            raise LensvizError(f"layer {layer} is not in this index (layers {self.layers})")
        if not 0 <= dim < self.d_mlp:
            raise LensvizError(f"dim must be in [0, {self.d_mlp - 1}], got {dim}")
        if sign not in (1, -1) or (sign == -1 and not self.bottom):
            raise LensvizError("sign must be 1, or -1 for an index built with bottom=True")
        row = self.layers.index(layer) * self.d_mlp + dim
        s = 0 if sign == 1 else 1
        return [{"token": self._strings[t], "id": t, "logit": lg}
                for t, lg in zip(self.ids[s, row].tolist(), self.logits[s, row].tolist())]

    # persistence ------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"version": INDEX_VERSION, "key": self.key, "ids": self.ids, "logits": self.logits,
                "layers": self.layers, "d_mlp": self.d_mlp, "fold_norm": self.fold_norm, "bottom": self.bottom,
                "order": self.order, "offsets": self.offsets}


def build_value_index(lens, k: int = 50, *, fold_norm: bool = False, bottom: bool = False, layers=None,
                      cache_dir=None, use_cache: bool = True) -> ValueIndex:
    """The value-vector search index of a model, loaded from the disk cache when present, else
    precomputed (chunked batched matmuls over all values of `layers`, default all) and saved.

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
                                  offsets=st["offsets"])
        except Exception:  # unreadable or stale cache file: rebuild it
            pass
    vectors = torch.cat([value_vectors(lens, layer) for layer in layers])  # [N, D]
    ids, logits = _topk_logits(lens, vectors, k, fold_norm=fold_norm)
    all_ids, all_logits = [ids], [logits]
    if bottom:
        ids_b, logits_b = _topk_logits(lens, vectors, k, fold_norm=fold_norm, bottom=True)
        all_ids.append(ids_b)
        all_logits.append(logits_b)
    index = ValueIndex(torch.stack(all_ids).to(torch.int32), torch.stack(all_logits), layers, lens.d_mlp,
                       fold_norm=fold_norm, bottom=bottom, strings=strings, key=key)
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
