"""Talking Heads (Merullo, Eickhoff & Pavlick, NeurIPS 2024): head-to-head composition scores (Q-, K-,
V-composition, Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"), SVD channels of
the OV and QK circuits, and edits that remove or scale one channel. Weights only, row convention (a layer
computes y = x W); scores start from per-head factors (QR + d_head x d_head SVDs), and no D x D product
of two heads' matrices is ever formed.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from numbers import Real

import torch

from ..errors import LensvizError
from ..checks import check_index, check_index_list
from .embedding_space import circuit_weights

MODES = ("q", "k", "v")
RECEIVERS = ("full", "read")
NULLS = ("rotation", "population")
METHODS = ("auto", "factored", "gram")
CHUNK_BYTES = 64 * 2**20  # size of one block of pair overlaps held at once
GRAM_BYTES = 512 * 2**20  # largest store of sender Gram rows method="auto" accepts


# --------------------------------------------------------------------------------------------------
# factored SVD
# --------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class HeadSVD:
    """Thin SVD of per-head low-rank matrices W = A B = U diag(S) V^T, batched over leading dims.

    U [..., D_in, r]: left singular vectors as columns; in row convention u_i = U[..., :, i] is the
    direction the head *reads* (OV: through W_V; QK: the query side).
    S [..., r]: singular values, descending.
    V [..., D_out, r]: right singular vectors; v_i = V[..., :, i] is the direction the head *writes*
    (OV) or the key-side read direction (QK).
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    def matrix(self) -> torch.Tensor:
        """The dense product U diag(S) V^T, [..., D_in, D_out] (for checks on small models)."""
        return (self.U * self.S[..., None, :]) @ self.V.mT


def factored_svd(a: torch.Tensor, b: torch.Tensor) -> HeadSVD:
    """SVD of the product a @ b without forming it: a [..., D_in, r], b [..., r, D_out] (r <= D).

    QR of a and of b^T, then the SVD of the r x r core R_a R_b^T (as TransformerLens' FactoredMatrix
    does). Computed in a's dtype (float32 at least). Cost O(D r^2) per matrix."""
    if a.dim() < 2 or b.dim() < 2 or a.shape[-1] != b.shape[-2]:
        raise LensvizError(f"factored_svd needs a [..., D, r] and b [..., r, D'], got {tuple(a.shape)} and "
                           f"{tuple(b.shape)}")
    dtype = a.dtype if a.dtype == torch.float64 else torch.float32
    qa, ra = torch.linalg.qr(a.to(dtype))
    qb, rb = torch.linalg.qr(b.to(dtype).mT)
    uc, s, vch = torch.linalg.svd(ra @ rb.mT)
    return HeadSVD(U=qa @ uc, S=s, V=qb @ vch.mT)


def factored_composition_score(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor,
                               b2: torch.Tensor) -> torch.Tensor:
    """CS(L, R) = |L R|_F / (|L|_F |R|_F) for L = a1 @ b1 and R = a2 @ b2, batched over leading dims.

    a1 [..., D, r1], b1 [..., r1, D], a2 [..., D, r2], b2 [..., r2, D'] -> [...]. Only r x r products:
    |L R|_F^2 = tr(G M K M^T) with G = a1^T a1, M = b1 a2, K = b2 b2^T; |L|_F^2 = tr(a1^T a1 b1 b1^T)."""
    g1, k1 = a1.mT @ a1, b1 @ b1.mT
    g2, k2 = a2.mT @ a2, b2 @ b2.mT
    m = b1 @ a2
    lr = ((g1 @ m) * (m @ k2)).sum((-2, -1))  # tr(G M K M^T) = <G M, M K>
    l2 = (g1 * k1).sum((-2, -1))  # tr(G1 K1), both symmetric
    r2 = (g2 * k2).sum((-2, -1))
    return (lr.clamp_min(0) / (l2 * r2)).sqrt()


# --------------------------------------------------------------------------------------------------
# per-head weights
# --------------------------------------------------------------------------------------------------
def head_weights(lens, layer: int, *, fold_norm: bool = False, center: bool = False) -> dict:
    """Per query head read/write matrices of one layer, [in, out] oriented, GQA expanded:
    q, k, v [H, D, d] (k, v of query head h are those of kv head h // (H / H_kv)), o [H, d, D].

    fold_norm=True folds the layer's first-norm gain gamma into the read matrices (diag(gamma) W), so
    they read the normalised, un-scaled residual. The norm's bias (LayerNorm beta) is a constant
    offset and is dropped, as are the q/k/v/o biases. center=True (LayerNorm models only; RMSNorm does
    not subtract the mean, so it is ignored there) mean-centres the writing matrix o over D, so writes
    along the all-ones direction, which every LayerNorm removes, do not count (TransformerLens'
    fold_ln + center_writing_weights are fold_norm=True, center=True). q/k norms (Qwen 3, OLMo 2, Gemma 3,
    Phi, StableLM, Cohere) and post-attention norms (Gemma 2/3, OLMo 2) sit inside the circuit and are
    always folded, exact up to positive per-vector scales (see `embedding_space.circuit_weights`)."""
    layer = check_index(layer, lens.n_layers, "layer")
    w = circuit_weights(lens, layer)
    rep = lens.n_heads // lens.n_kv_heads
    q, o = w["q"], w["o"]
    k, v = w["k"].repeat_interleave(rep, 0), w["v"].repeat_interleave(rep, 0)
    if fold_norm:
        gamma = lens.norm_gain(layer, "ln1")
        if gamma is not None:
            gamma = gamma.to(q.dtype)[:, None]
            q, k, v = gamma * q, gamma * k, gamma * v
    if center and lens.adapter.norm == "layernorm":
        o = o - o.mean(-1, keepdim=True)
    return {"q": q, "k": k, "v": v, "o": o}


def ov_svd(lens, layer: int, *, fold_norm: bool = False, center: bool = False) -> HeadSVD:
    """SVD of every head's OV circuit W_OV^h = W_V^{g(h)} W_O^h ([D, D], rank <= d) in one layer:
    U [H, D, d] (read directions u_i), S [H, d], V [H, D, d] (write directions v_i).
    Options as in `head_weights`."""
    w = head_weights(lens, layer, fold_norm=fold_norm, center=center)
    return factored_svd(w["v"], w["o"])


def qk_svd(lens, layer: int, *, fold_norm: bool = False) -> HeadSVD:
    """SVD of every head's content score matrix W_QK^h = W_Q^h W_K^{g(h)T} ([D, D], rank <= d), the
    bilinear form at relative distance 0 on RoPE models: U [H, D, d] query-side directions a_j,
    S [H, d] (tau_j), V [H, D, d] key-side directions b_j."""
    w = head_weights(lens, layer, fold_norm=fold_norm)
    return factored_svd(w["q"], w["k"].mT)


# --------------------------------------------------------------------------------------------------
# all pairs
# --------------------------------------------------------------------------------------------------
def _check_options(modes, receiver):
    for m in modes:
        if m not in MODES:
            raise LensvizError(f"mode must be one of {MODES} (Q-, K-, V-composition), got {m!r}")
    if receiver not in RECEIVERS:
        raise LensvizError(f"receiver must be one of {RECEIVERS}, got {receiver!r}")


def _work_dtype(lens) -> torch.dtype:
    return torch.float64 if lens.model_dtype == torch.float64 else torch.float32


def _factors(lens, modes, *, fold_norm, center, receiver):
    """Sender SVD (U, S, V stacked [L, H, ...]) and, per mode, the receiver factor Y [L, H, D, r] with
    |x R|_2 = |x Y|_2 for every row vector x (so |L R|_F = |L Y|_F and |R|_F = |Y|_F). The QRs and SVDs
    run once over all L * H heads (few large batched calls)."""
    dtype = _work_dtype(lens)
    per_layer = [head_weights(lens, layer, fold_norm=fold_norm, center=center) for layer in range(lens.n_layers)]
    w = {n: torch.stack([x[n] for x in per_layer]).to(dtype) for n in "qkvo"}  # [L, H, ...]
    del per_layer
    ov = factored_svd(w["v"], w["o"])
    if receiver == "read":  # R = W_Q, W_K or W_V itself: unchanged by a RoPE rotation R(delta)
        return ov, {m: w[m] for m in modes}
    qk = factored_svd(w["q"], w["k"].mT) if {"q", "k"} & set(modes) else None
    ys = {}
    for m in modes:
        if m == "q":  # R = W_QK = A diag(tau) B^T  ->  |x R| = |x A diag(tau)|
            ys[m] = qk.U * qk.S[..., None, :]
        elif m == "k":  # R = W_QK^T = B diag(tau) A^T
            ys[m] = qk.V * qk.S[..., None, :]
        else:  # R = W_OV of the receiver
            ys[m] = ov.U * ov.S[..., None, :]
    return ov, ys


def _sender_layers(lens, sender_layers):
    return check_index_list(sender_layers, lens.n_layers, "sender_layers", "sender layer")


def _pair_projections(senders: torch.Tensor, receivers: torch.Tensor, layers, per_component: bool):
    """|s^T Y_b|^2 for every sender column s and every receiver head b in a later layer.

    senders [L, H, D, d] (columns = sender directions, possibly sigma-weighted), receivers [L, H, D, r].
    Returns [L, H, d, L, H] (per_component) or [L, H, L, H] (summed over the sender columns), NaN where
    the receiver's layer is not after the sender's. One GEMM per sender layer over the contiguous
    block of later receivers, chunked to CHUNK_BYTES; each pair costs one d x r block (O(D d r))."""
    n_l, n_h, big_d, d = senders.shape
    r = receivers.shape[-1]
    flat = receivers.permute(2, 0, 1, 3).reshape(big_d, n_l * n_h * r)  # columns ordered (layer, head, r)
    shape = (n_l, n_h, d, n_l, n_h) if per_component else (n_l, n_h, n_l, n_h)
    out = torch.full(shape, float("nan"), dtype=senders.dtype)
    per_layer = n_h * r
    step = max(1, CHUNK_BYTES // (senders.element_size() * n_h * d * per_layer))
    for l1 in layers:
        s = senders[l1].mT.reshape(n_h * d, big_d)
        for start in range(l1 + 1, n_l, step):
            stop = min(n_l, start + step)
            m = (s @ flat[:, start * per_layer:stop * per_layer]).view(n_h, d, stop - start, n_h, r)
            p = m.square_().sum(-1)  # [H, d, l', H]
            if per_component:
                out[l1, :, :, start:stop] = p
            else:
                out[l1, :, start:stop] = p.sum(1)
    return out


class _Grams:
    """Upper triangles of per-head Gram matrices x x^T ([D, D] -> D (D + 1) / 2 numbers), written into
    reused buffers (fresh allocations of this size cost more in page faults than the products)."""

    def __init__(self, big_d: int, n_h: int, dtype: torch.dtype):
        iu = torch.triu_indices(big_d, big_d)
        self.flat_idx = iu[0] * big_d + iu[1]
        self.double = torch.where(iu[0] == iu[1], 1.0, 2.0).to(dtype)
        self.gram = torch.empty(n_h, big_d, big_d, dtype=dtype)
        self.size = self.flat_idx.numel()

    def rows(self, x: torch.Tensor, out: torch.Tensor, sender: bool) -> torch.Tensor:
        """x [n, H, D, k] -> out [n, H, D (D + 1) / 2]; off-diagonal entries doubled when `sender`, so a
        dot product of a sender row and a receiver row is <G_a, K_b>_F."""
        n_h, big_d = self.gram.shape[:2]
        for i in range(x.shape[0]):
            torch.matmul(x[i], x[i].mT, out=self.gram)
            torch.index_select(self.gram.view(n_h, big_d * big_d), 1, self.flat_idx, out=out[i])
            if sender:
                out[i].mul_(self.double)
        return out


def _pair_grams(senders: torch.Tensor, receivers: dict) -> dict:
    """|S_a^T Y_b|_F^2 = <S_a S_a^T, Y_b Y_b^T>_F for every sender a and receiver b in a later layer.

    senders [L, H, D, d] (sender factors), receivers {mode: [L, H, D, r]} -> {mode: [L, H, L, H]}, NaN
    where the receiver is not later. Each head's D x D Gram matrix is formed once (O(D^2 d)) and kept as
    its upper triangle, so a pair costs D (D + 1) / 2 multiply-adds instead of d r D (the factored
    form); no product of two heads' matrices is ever formed. Sender Grams are kept for all layers;
    receiver Grams are formed a group of layers at a time (CHUNK_BYTES) and multiplied by all earlier
    senders in one GEMM."""
    n_l, n_h, big_d, _ = senders.shape
    g = _Grams(big_d, n_h, senders.dtype)
    out = {m: torch.full((n_l, n_h, n_l, n_h), float("nan"), dtype=senders.dtype) for m in receivers}
    if n_l < 2:
        return out
    sender_rows = g.rows(senders[:-1], torch.empty(n_l - 1, n_h, g.size, dtype=senders.dtype), sender=True)
    flat_senders = sender_rows.view(-1, g.size)
    group = max(1, min(n_l - 1, CHUNK_BYTES // (n_h * g.size * senders.element_size())))
    buf = torch.empty(group, n_h, g.size, dtype=senders.dtype)
    for m, y in receivers.items():
        for first in range(1, n_l, group):  # receiver layers [first, last)
            last = min(n_l, first + group)
            rec = g.rows(y[first:last], buf[:last - first], sender=False).view(-1, g.size)
            block = (flat_senders[:(last - 1) * n_h] @ rec.mT).view(last - 1, n_h, last - first, n_h)
            for j, l2 in enumerate(range(first, last)):
                out[m][:l2, :, l2] = block[:l2, :, j]
    return out


def all_composition_scores(lens, modes=MODES, *, fold_norm: bool = False, center: bool = False,
                           receiver: str = "full", method: str = "auto") -> dict:
    """Composition scores of every head pair for several modes: {mode: Tensor [L, H, L, H]}.

    scores[mode][l1, h1, l2, h2] = CS(W_OV^{l1,h1}, R^{l2,h2}) = |L R|_F / (|L|_F |R|_F) in [0, 1],
    NaN where l2 <= l1. Receivers R: "q" W_QK (the sender feeds the queries), "k" W_QK^T (the keys),
    "v" W_OV (the values). On RoPE models W_QK is the score form at relative distance 0; receiver="read"
    gives the RoPE-invariant read-side score CS(W_OV, W_Q) / CS(W_OV, W_K) / CS(W_OV, W_V) instead
    (R = the receiver's [D, d] read matrix; |A R(delta)|_F = |A|_F for the orthogonal rotation).
    GQA: the receiver uses its kv head's W_K / W_V. Options fold_norm / center as in `head_weights`
    (they apply to every head, sender and receiver). Returned in float64 for float64 models, else
    float32 (also for half-precision models).

    Everything starts from per-head SVD factors (sender W_OV = U diag(S) V^T; receiver R with
    |x R| = |x Y|, Y [D, r]), so |L R|_F = |diag(S) V^T Y|_F. method="factored" evaluates the d x r block
    V^T Y of every pair (O(d r D) per pair, chunked GEMMs); method="gram" uses
    <V S^2 V^T, Y Y^T>_F over the upper triangle of per-head D x D Gram matrices formed once per head
    (O(D^2 / 2) per pair: d r > D / 2 holds for real models, e.g. 7x fewer operations on SmolLM2),
    but it holds the Gram rows of all sender heads (N D^2 / 2 numbers). "auto" picks "gram" when it needs
    fewer operations (D < 2 d^2) and those rows fit in GRAM_BYTES, else "factored"."""
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    _check_options(modes, receiver)
    if method not in METHODS:
        raise LensvizError(f"method must be one of {METHODS}, got {method!r}")
    sender, ys = _factors(lens, modes, fold_norm=fold_norm, center=center, receiver=receiver)
    weighted = sender.V * sender.S[..., None, :]  # |W_OV Y| = |diag(S) V^T Y|
    l_norm2 = sender.S.square().sum(-1)  # [L, H]
    how = method
    if how == "auto":
        n, big_d = lens.n_layers * lens.n_heads, lens.d_model
        fits = n * big_d * (big_d + 1) // 2 * sender.S.element_size() <= GRAM_BYTES
        how = "gram" if fits and big_d + 1 < 2 * lens.d_head * lens.d_head else "factored"
    if how == "gram":
        nums = _pair_grams(weighted, ys)
    else:
        layers = range(lens.n_layers)
        nums = {m: _pair_projections(weighted, y, layers, per_component=False) for m, y in ys.items()}
    out = {}
    for m in modes:
        r_norm2 = ys[m].square().sum((-2, -1))  # [L, H]
        out[m] = (nums[m] / (l_norm2[:, :, None, None] * r_norm2[None, None])).clamp(0, 1).sqrt()
    return out


def composition_scores(lens, mode: str = "q", *, fold_norm: bool = False, center: bool = False,
                       receiver: str = "full", method: str = "auto") -> torch.Tensor:
    """Composition scores of every head pair for one mode ("q", "k" or "v"): Tensor [L, H, L, H],
    [l1, h1, l2, h2] = CS(W_OV^{l1,h1}, R^{l2,h2}), NaN where l2 <= l1. See `all_composition_scores`."""
    if not isinstance(mode, str):
        raise LensvizError(f"mode must be one of {MODES}, got {mode!r}")
    return all_composition_scores(lens, (mode,), fold_norm=fold_norm, center=center, receiver=receiver,
                                  method=method)[mode]


# --------------------------------------------------------------------------------------------------
# per-component scores and their null
# --------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class ComponentScores:
    """Per-SVD-component composition of sender heads with receiver heads, one mode.

    scores [L, H, d, L, H]: CS_i = CS(sigma_i u_i v_i^T, R) = |v_i^T R|_2 / |R|_F of sender (l1, h1)'s
        component i with receiver (l2, h2); NaN where l2 <= l1 or the sender layer was not computed.
    sigma [L, H, d]: the sender's singular values (CS_full^2 = sum_i sigma_i^2 CS_i^2 / sum_i sigma_i^2).
    null: 1/sqrt(D), the typical CS_i of a random direction (E CS_i^2 = 1/D exactly).
    rotation_std [L, H]: per receiver, the standard deviation of CS_i^2 for a uniformly random unit
        direction v: Var = (1 + 2 tr M^2) / (D (D + 2)) - 1/D^2, M = R R^T / |R|_F^2.
    """

    mode: str
    scores: torch.Tensor
    sigma: torch.Tensor
    null: float
    rotation_std: torch.Tensor
    options: dict = field(default_factory=dict)

    def full(self) -> torch.Tensor:
        """The whole-head scores [L, H, L, H] as the sigma^2-weighted mean of the CS_i^2."""
        w = self.sigma.square()
        return ((w[..., None, None] * self.scores.square()).sum(2) / w.sum(-1)[..., None, None]).sqrt()

    def z(self, null: str = "rotation") -> torch.Tensor:
        """z-scores [L, H, d, L, H] of CS_i^2. null="rotation": against a random rotation of the sender
        direction (analytic mean 1/D and `rotation_std`, independent of the other heads); null=
        "population": against all computed components of all earlier heads with the same receiver."""
        if null not in NULLS:
            raise LensvizError(f"null must be one of {NULLS}, got {null!r}")
        x = self.scores.square()
        if null == "rotation":
            return (x - self.null ** 2) / self.rotation_std
        ok = ~torch.isnan(x)
        n = ok.sum((0, 1, 2)).clamp_min(1)
        filled = torch.where(ok, x, torch.zeros_like(x))
        mean = filled.sum((0, 1, 2)) / n
        var = torch.where(ok, (x - mean).square(), torch.zeros_like(x)).sum((0, 1, 2)) / (n - 1).clamp_min(1)
        return (x - mean) / var.sqrt()

    def flags(self, threshold: float = 3.0, null: str = "rotation") -> torch.Tensor:
        """Bool [L, H, d, L, H]: components whose z-score exceeds `threshold` (False where masked)."""
        z = self.z(null)
        return torch.nan_to_num(z, nan=-math.inf) > threshold

    def top(self, n: int = 20, null: str = "rotation") -> list[dict]:
        """The n strongest channels as JSON-friendly dicts, by score: sender [layer, head], component,
        receiver [layer, head], score, z, sigma, sigma_share (sigma_i^2 / sum sigma^2)."""
        flat = torch.nan_to_num(self.scores, nan=-1.0).reshape(-1)
        n = max(0, min(int(n), int((~torch.isnan(self.scores)).sum())))
        idx = flat.topk(n).indices
        z = self.z(null).reshape(-1)
        shape = self.scores.shape
        share = self.sigma.square() / self.sigma.square().sum(-1, keepdim=True)
        rows = []
        for i in idx.tolist():
            l1, h1, c, l2, h2 = _unravel(i, shape)
            rows.append({"mode": self.mode, "sender": [l1, h1], "component": c, "receiver": [l2, h2],
                         "score": float(flat[i]), "z": float(z[i]), "sigma": float(self.sigma[l1, h1, c]),
                         "sigma_share": float(share[l1, h1, c])})
        return rows


def _unravel(i: int, shape) -> list[int]:
    out = []
    for size in reversed(shape):
        out.append(i % size)
        i //= size
    return out[::-1]


def component_scores(lens, mode: str = "q", *, sender_layers=None, fold_norm: bool = False,
                     center: bool = False, receiver: str = "full") -> ComponentScores:
    """Per-component composition CS_i = |v_i^T R|_2 / |R|_F for the SVD components (sigma_i, u_i, v_i)
    of every sender head's W_OV against every receiver head in a later layer. Independent of sigma_i.

    sender_layers: None (all) or the sender layers to compute (others stay NaN; the cost is one GEMM
    per sender layer). mode, receiver, fold_norm, center as in `all_composition_scores`.
    Returns `ComponentScores` (scores [L, H, d, L, H], sigma [L, H, d], null 1/sqrt(D), z-scores)."""
    if not isinstance(mode, str):
        raise LensvizError(f"mode must be one of {MODES}, got {mode!r}")
    _check_options((mode,), receiver)
    layers = _sender_layers(lens, sender_layers)
    sender, ys = _factors(lens, (mode,), fold_norm=fold_norm, center=center, receiver=receiver)
    y = ys[mode]
    r_norm2 = y.square().sum((-2, -1))  # [L, H]
    proj = _pair_projections(sender.V, y, layers, per_component=True)
    scores = (proj / r_norm2).clamp(0, 1).sqrt()
    big_d = lens.d_model
    gram = y.mT @ y  # [L, H, r, r]: tr M^2 = |Y^T Y|_F^2 / |Y|_F^4
    tr_m2 = gram.square().sum((-2, -1)) / r_norm2.square()
    var = (1 + 2 * tr_m2) / (big_d * (big_d + 2)) - 1 / big_d ** 2
    return ComponentScores(mode=mode, scores=scores, sigma=sender.S, null=1 / math.sqrt(big_d),
                           rotation_std=var.clamp_min(0).sqrt(),
                           options={"fold_norm": fold_norm, "center": center, "receiver": receiver})


# --------------------------------------------------------------------------------------------------
# interventions on a channel
# --------------------------------------------------------------------------------------------------
def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha):
        raise LensvizError(f"alpha must be a finite real number (0 removes the component, 1 keeps it), "
                           f"got {alpha!r}")
    return float(alpha)


def component_direction(lens, layer: int, head: int, component: int, *, fold_norm: bool = False,
                        center: bool = False) -> torch.Tensor:
    """v_i [D]: the unit write direction of SVD component `component` (0 = largest sigma) of the head's
    W_OV, in the model's weight dtype. Its sign is arbitrary."""
    layer = check_index(layer, lens.n_layers, "layer")
    head = check_index(head, lens.n_heads, "head")
    component = check_index(component, lens.d_head, "component")
    w = head_weights(lens, layer, fold_norm=fold_norm, center=center)
    svd = factored_svd(w["v"][head].double(), w["o"][head].double())
    return svd.V[:, component].to(w["o"].dtype)


def component_weight_edit(lens, layer: int, head: int, component: int, alpha: float = 0.0, *,
                          fold_norm: bool = False, center: bool = False) -> torch.Tensor:
    """The head's new output-projection slice with component i scaled by alpha (0 removes it):
    W_O^h <- W_O^h (I - (1 - alpha) v_i v_i^T), so W_OV_new = W_OV - (1 - alpha) sigma_i u_i v_i^T.

    Returned in the o_proj module's own layout and dtype: the slice weight[:, h*d:(h+1)*d] ([D, d]) for
    nn.Linear, weight[h*d:(h+1)*d, :] ([d, D]) for Conv1D. The o_proj bias is untouched. With
    center=True the component is one of the centred W_OV (and the identity holds for the centred one).
    Post-attention norms (Gemma 2/3, OLMo 2; post-LN OPT's LayerNorm, M = P diag(g)): the component is one
    of the folded circuit W_O M (`head_weights`), so the edit is W_O <- W_O - (1 - alpha) (W_O M v_i)
    (v_i / g)^T, which gives W_O M (I - (1 - alpha) v_i v_i^T)."""
    layer = check_index(layer, lens.n_layers, "layer")
    head = check_index(head, lens.n_heads, "head")
    alpha = _check_alpha(alpha)
    v = component_direction(lens, layer, head, component, fold_norm=fold_norm, center=center).double()
    w_o = lens.attention_weights(layer)["o"][head]  # [d, D]
    w64 = w_o.double()
    gain = lens.adapter.post_norm_gain(lens.model, layer, "attn")
    if gain is not None and bool((gain == 0).any()):
        raise LensvizError(f"layer {layer}'s post-attention norm has zero gains: an edit of its folded W_O cannot "
                           "be mapped back to o_proj")
    g = torch.ones(w64.shape[-1], dtype=torch.float64) if gain is None else gain.double()
    folded = lens.adapter.post_norm_fold(lens.model, layer, "attn", w64)  # W_O M, M = P diag(g) (P = I but LayerNorm)
    # the edit of the folded circuit, mapped back through diag(g)^-1; v lies in the row space of W_O P diag(g),
    # so v / g is centred and the edited W_O times M is the edited folded circuit (post-LN OPT too)
    new = w64 - (1 - alpha) * (folded @ v)[:, None] * (v / g)[None, :]
    return lens.adapter.as_in_out(new.to(w_o.dtype)).contiguous()  # [in, out] -> module layout (an involution)


@contextmanager
def edited_component(lens, layer: int, head: int, component: int, alpha: float = 0.0, *,
                     fold_norm: bool = False, center: bool = False):
    """Inside the block, the model runs with `component_weight_edit` applied to the o_proj weight of
    `layer` (only head `head`'s slice changes). On exit, also by an exception, the weight is restored
    bit for bit. Yields {"layer", "head", "component", "alpha", "direction": v_i [D]}.
    Needs the o_proj weight materialised (not offloaded to disk/meta)."""
    layer = check_index(layer, lens.n_layers, "layer")
    head = check_index(head, lens.n_heads, "head")
    new_slice = component_weight_edit(lens, layer, head, component, alpha, fold_norm=fold_norm, center=center)
    param = lens.adapter.part(lens.model, layer, "o_proj").weight
    if param.device.type == "meta":
        raise LensvizError(f"the o_proj weight of layer {layer} is offloaded (meta): load the model without "
                           "offloading to edit its weights")
    saved = param.detach().clone()
    full = saved.clone()
    d = lens.d_head
    lens.adapter.as_in_out(full)[head * d:(head + 1) * d, :] = lens.adapter.as_in_out(new_slice).to(full)
    info = {"layer": layer, "head": head, "component": check_index(component, lens.d_head, "component"),
            "alpha": float(alpha),
            "direction": component_direction(lens, layer, head, component, fold_norm=fold_norm, center=center)}
    try:
        with torch.no_grad():
            param.copy_(full)
        yield info
    finally:
        with torch.no_grad():
            param.copy_(saved)


def edit_head_write(write: torch.Tensor, directions: torch.Tensor, alpha: float = 0.0, *,
                    target: torch.Tensor | None = None) -> torch.Tensor:
    """The activation edit equivalent to the weight edit: a head's write w [..., D] with its coordinates
    in the channel S scaled by alpha, w + (alpha - 1)(w S^T) S, or set to `target` c* [..., r]
    (broadcastable), w + (c* - w S^T) S. directions: one unit vector [D] or orthonormal rows S [r, D].
    For S = v_i of the head's W_OV this equals running with `component_weight_edit`. Returns [..., D]."""
    if not isinstance(write, torch.Tensor) or not isinstance(directions, torch.Tensor):
        raise LensvizError("write and directions must be torch tensors ([..., D] and [D] or [r, D])")
    s = directions[None] if directions.dim() == 1 else directions
    if s.dim() != 2 or s.shape[-1] != write.shape[-1]:
        raise LensvizError(f"directions must be [D] or [r, D] with D = {write.shape[-1]}, "
                           f"got {tuple(directions.shape)}")
    s = s.to(device=write.device, dtype=write.dtype)
    tol = 1e-4 if s.dtype in (torch.float32, torch.float64) else 1e-2
    if not torch.allclose(s @ s.mT, torch.eye(s.shape[0], dtype=s.dtype, device=s.device), atol=tol):
        raise LensvizError("directions must be orthonormal rows (use channel_basis to orthonormalise them)")
    coords = write @ s.mT  # [..., r]
    if target is None:
        change = (_check_alpha(alpha) - 1) * coords
    else:
        change = torch.as_tensor(target, dtype=write.dtype, device=write.device) - coords
    return write + change @ s


def channel_basis(lens, components, *, fold_norm: bool = False, center: bool = False) -> torch.Tensor:
    """Orthonormal rows S [r, D] spanning the write directions v_i of the given (layer, head, component)
    triples (a channel subspace, Gram-Schmidt in the given order), for `edit_head_write`. A direction
    within 1e-4 of the span of the earlier ones adds no row, so r is their numerical rank."""
    vs = [component_direction(lens, l, h, c, fold_norm=fold_norm, center=center) for l, h, c in components]
    if not vs:
        raise LensvizError("components must list at least one (layer, head, component)")
    q, r = torch.linalg.qr(torch.stack(vs).double().mT)
    keep = r.diagonal().abs() > 1e-4  # unit vectors: the diagonal is the part outside the earlier span
    return q.mT[keep].to(vs[0].dtype)
