"""Attention maths shared by capture and traces: grouped-query repeat, the allowed-keys matrix of a mask,
softmax probabilities (with Gemma 2's logit soft-capping and gpt-oss's sinks), the per-layer edits patches ask for (score / probability edits, top-k key keeping,
added maps) on the explicit path, and the prefill `PromptMask` for calls made inside `lens.patched`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import LensvizError
from .hf import cache_length

QUERY_CHUNK_BYTES = 256 * 2**20  # explicit path: largest score block held at once


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[..., H_kv, T, d] -> [..., H_kv * n_rep, T, d]; query head h reads kv head h // n_rep."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=-3)


def causal_allowed(mask: torch.Tensor | None, t_q: int, t_k: int, device=None) -> torch.Tensor:
    """The [T_q, T_k] boolean 'may attend' matrix for a mask as passed to the attention function
    (None = plain causal; bool = True where allowed; float = 0 where allowed)."""
    if mask is None:
        return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(t_k - t_q)
    m = mask[0, 0] if mask.dim() == 4 else mask
    return m if m.dtype == torch.bool else m == 0


def softcapped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Attention-logit soft-capping (Gemma 2): c * tanh(scores / c); scores unchanged for c = None."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def softmax_rows(scores: torch.Tensor, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """softmax over the last dim of scores [..., H, q, T]; with learned sinks [H] (gpt-oss) each row gets
    one more logit, the head's sink, which is dropped after the softmax (rows then sum to < 1)."""
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    sink = sinks.to(device=scores.device, dtype=scores.dtype).reshape(-1, 1, 1).expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]


def masked_scores(query: torch.Tensor, key: torch.Tensor, scaling: float, allowed: torch.Tensor,
                  softcap: float | None = None) -> torch.Tensor:
    """softcap(scaling * q k^T) with disallowed keys at -inf. query [..., H, q, d], key [..., H, T, d]
    (already repeated to H heads), allowed [q, T] -> [..., H, q, T]."""
    scores = softcapped(torch.matmul(query, key.transpose(-1, -2)) * scaling, softcap)
    return scores.masked_fill(~allowed, float("-inf"))


def attention_probs(q: torch.Tensor, k: torch.Tensor, scaling: float, allowed: torch.Tensor,
                    softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """A = softmax(softcap(scaling * q k^T)) over allowed keys (with sinks: one sink logit per head in
    every row). q [H, T, d], k [H_kv, T, d] -> [H, T, T]."""
    k = repeat_kv(k, q.shape[-3] // k.shape[-3])
    return softmax_rows(masked_scores(q, k, scaling, allowed, softcap), sinks)


def softcap_slope(q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float) -> torch.Tensor:
    """d softcap(z) / dz at z = scaling * q k^T: 1 - tanh^2(z / c). q [H, T, d], k [H_kv, T, d] -> [H, T, T]."""
    k = repeat_kv(k, q.shape[-3] // k.shape[-3])
    t = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * scaling / softcap)
    return 1 - t * t


@dataclass
class AttentionEdit:
    """Edits of one layer's attention, applied on the explicit (eager) path.

    scores: fns (scores [B, H, q, T], rows: slice) -> scores, on scaled, masked scores before the softmax.
    probs:  fns (probs [B, H, q, T], rows: slice) -> probs, after the softmax.
    `rows` says which query positions the chunk holds.
    """

    scores: list = field(default_factory=list)
    probs: list = field(default_factory=list)
    keep: list = field(default_factory=list)  # fns (scores [B, H, q, T]) -> bool [B, H, q, T], True = key kept:
    # a key selection computed without grad from the scaled, masked scores; alone it runs as a boolean
    # mask of the fused attention kernel (top-k attention), else before the score edits
    outputs: list = field(default_factory=list)  # fns (out [B, H, T, d]) -> out, on every path
    added: list = field(default_factory=list)  # maps P [H, T, T] added to the probabilities (A + P):
    # applied as out += P @ V, so the fused attention kernel still computes A @ V

    @property
    def explicit(self) -> bool:
        return bool(self.scores or self.probs)

    def edits_scores(self) -> bool:
        """True when the softmax differs from softmax(masked scores): kept keys or score edits."""
        return bool(self.scores or self.keep)


def kept_keys(scores: torch.Tensor, fns) -> torch.Tensor:
    """The keys every selection in `fns` keeps: bool like `scores` [B, H, q, T] (scaled and masked)."""
    with torch.no_grad():
        keep = fns[0](scores)
        for fn in fns[1:]:
            keep = keep & fn(scores)
    return keep


def edited_scores(query, key, scaling, allowed, edit: AttentionEdit | None, rows: slice,
                  softcap: float | None = None) -> torch.Tensor:
    """Scaled (soft-capped), masked scores of the query rows `rows` with the edit's key selections and
    score edits applied: query [B, H, q, d], key [B, H, T, d] (repeated), allowed [q, T] -> [B, H, q, T]."""
    scores = masked_scores(query, key, scaling, allowed, softcap)
    if edit is not None and edit.keep:
        scores = scores.masked_fill(~kept_keys(scores.detach(), edit.keep), float("-inf"))
    for fn in (edit.scores if edit else ()):
        scores = fn(scores, rows)
    return scores


def edited_probs(probs: torch.Tensor, edit: AttentionEdit | None, rows: slice) -> torch.Tensor:
    """Probabilities [B, H, q, T] with the edit's probability edits and added maps (rows of P) applied."""
    for fn in (edit.probs if edit else ()):
        probs = fn(probs, rows)
    for p in (edit.added if edit else ()):
        probs = probs + p[:, rows].to(device=probs.device, dtype=probs.dtype)
    return probs


def _row_chunk(query, t_k: int, chunk: int | None) -> int:
    if chunk is not None:
        return chunk
    return max(1, QUERY_CHUNK_BYTES // (query.shape[0] * query.shape[1] * t_k * query.element_size()))


def explicit_attention(query, key, value, mask, scaling, edit: AttentionEdit | None = None,
                       chunk: int | None = None, softcap: float | None = None,
                       sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Eager attention over query chunks with optional score / probability edits, attention-logit
    soft-capping and sinks. query [B, H, T, d], key/value [B, H_kv, S, d] -> [B, H, T, d]."""
    n_rep = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    t_q, t_k = query.shape[2], key.shape[2]
    allowed = causal_allowed(mask, t_q, t_k, query.device)
    chunk = _row_chunk(query, t_k, chunk)
    outs = []
    for start in range(0, t_q, chunk):
        rows = slice(start, min(t_q, start + chunk))
        scores = edited_scores(query[:, :, rows], k, scaling, allowed[rows], edit, rows, softcap)
        probs = edited_probs(softmax_rows(scores, sinks).to(value.dtype), edit, rows)
        outs.append(torch.matmul(probs, v))
    return torch.cat(outs, dim=2)


def keep_mask(query, key, mask, scaling, fns, chunk: int | None = None) -> torch.Tensor:
    """Boolean attention mask [B, H, T_q, T_k] (True = attend) of the keys that are allowed by `mask`
    and kept by the selections `fns`, computed without grad over query chunks."""
    k = repeat_kv(key, query.shape[1] // key.shape[1])
    t_q, t_k = query.shape[2], key.shape[2]
    allowed = causal_allowed(mask, t_q, t_k, query.device)
    chunk = _row_chunk(query, t_k, chunk)
    parts = []
    with torch.no_grad():
        for start in range(0, t_q, chunk):
            rows = slice(start, min(t_q, start + chunk))
            scores = masked_scores(query[:, :, rows], k, scaling, allowed[rows])
            parts.append(kept_keys(scores, fns) & allowed[rows])
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


class PromptMask:
    """A prompt mask (SegmentMask) for the calls a caller makes inside lens.patched, e.g. model.generate.

    A forward pre-hook on the backbone looks at each call. A call starting at position 0 (empty or no
    cache) must be given input_ids that start with the prompt's P ids (every batch row, no padding in
    the first P positions): in its attention calls the keys the prompt mask adds beyond causal, `extra`
    [P, P], are allowed in the top-left P x P block; rows after P stay causal (a longer input = the
    extended mask). Calls that start at or after P (cached decoding) are left alone: causal over the
    whole, MAS-encoded cache. A call starting inside the prompt (chunked prefill, a cache that holds
    part of it) raises LensvizError, since its cache could not have been encoded with the mask.
    A cache the caller built outside the block is not checked."""

    def __init__(self, prompt_ids: torch.Tensor, extra: torch.Tensor):
        self.prompt_ids = prompt_ids
        self.extra = extra
        self.changes = bool(extra.any())
        self.n_queries = None  # the query length of the prefill call in progress, else None
        self._full = {}

    def before_call(self, module, args, kwargs):
        self.n_queries, self._full = None, {}
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            ids = args[0]
        x = ids if ids is not None else kwargs.get("inputs_embeds")
        if x is None:
            return None
        p, past = len(self.prompt_ids), cache_length(kwargs)
        if past >= p:
            return None
        if past > 0:
            raise LensvizError(
                f"SegmentMask needs the whole prompt ({p} tokens) encoded in one forward pass, but this call "
                f"starts at position {past}, inside the prompt (chunked prefill such as prefill_chunk_size, or "
                "a cache holding part of the prompt, is not supported)")
        if ids is None:
            raise LensvizError("SegmentMask in lens.patched needs input_ids (not inputs_embeds), so it can check "
                               "that they start with the base trace's prompt")
        want = self.prompt_ids.to(ids.device)
        if ids.dim() == 2 and 0 < ids.shape[1] < p and bool((ids == want[:ids.shape[1]]).all()):
            raise LensvizError(
                f"SegmentMask needs the whole prompt ({p} tokens) encoded in one forward pass, but this call encodes "
                f"only its first {ids.shape[1]} (chunked prefill such as prefill_chunk_size is not supported)")
        if ids.dim() != 2 or ids.shape[1] < p or not bool((ids[:, :p] == want).all()):
            got = f"{ids.shape[-1]} input ids" if ids.shape[-1] < p else "input ids that do not start with them"
            raise LensvizError(
                f"SegmentMask masks the base trace's prompt ({p} tokens), but the model was called with {got}: "
                "generate from the traced prompt's ids (extra tokens after them are fine), e.g. "
                "lens.model.generate(base.input_ids[None], ...)")
        pad = kwargs.get("attention_mask")
        if isinstance(pad, torch.Tensor) and pad.dim() == 2 and not bool(pad[:, :p].bool().all()):
            raise LensvizError("SegmentMask: the attention_mask marks padding inside the prompt; give the prompt "
                               "unpadded (padding, if any, after it)")
        self.n_queries = ids.shape[1]
        return None

    def after_call(self, module, args, output):
        self.n_queries, self._full = None, {}

    def apply(self, mask, query, key):
        """The attention mask of one attention call with the prompt mask added (prefill calls only)."""
        if self.n_queries is None or not self.changes:
            return mask
        t, s, p = query.shape[-2], key.shape[-2], len(self.prompt_ids)
        if t != self.n_queries or s < p:
            raise LensvizError(f"SegmentMask cannot place its {p} x {p} mask in an attention call with {t} queries "
                               f"and {s} keys (expected {self.n_queries} queries over at least {p} keys)")
        extra = self._full.get((t, s, query.device))
        if extra is None:
            extra = torch.zeros(t, s, dtype=torch.bool, device=query.device)
            extra[:p, :p] = self.extra.to(query.device)
            self._full[(t, s, query.device)] = extra
        if mask is None:  # plain causal (sdpa's is_causal): build it, as a boolean mask sdpa takes as well
            return (causal_allowed(None, t, s, query.device) | extra)[None, None]
        if mask.dtype == torch.bool:
            return mask | extra
        return mask.masked_fill(extra, 0.0)
