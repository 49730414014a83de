"""Segment masking (MAS, methods-2 §4): tokens attend to every token of their own segment and of all
earlier segments; tokens outside every segment stay causal. Segments come from the prompt's parts or
from chat-template markers (ChatML as in SmolLM2/Qwen, Llama-3 headers)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import causal_allowed
from ..errors import LensvizError
from .base import Patch

CHAT_MARKERS = (  # (segment opener, segment closer): a segment spans opener..closer inclusive
    ("<|im_start|>", "<|im_end|>"),
    ("<|start_header_id|>", "<|eot_id|>"),
)
SEGMENT_ROLES = ("system", "user")


def chat_segments(tokens: list[str]) -> list[tuple[int, int]]:
    """[start, end) spans of system and user turns in a chat-formatted token list (ChatML or Llama-3);
    each span runs from the turn's opening marker to its closing marker inclusive."""
    spans = []
    for opener, closer in CHAT_MARKERS:
        i = 0
        while i < len(tokens):
            if tokens[i] == opener:
                role = "".join(tokens[i + 1:i + 3]).strip().lower()
                end = next((j for j in range(i + 1, len(tokens)) if tokens[j] == closer), None)
                if end is None:
                    break
                if any(role.startswith(r) for r in SEGMENT_ROLES):
                    spans.append((i, end + 1))
                i = end + 1
            else:
                i += 1
    return sorted(spans)


def segment_mask(segments: list[tuple[int, int]], n_tokens: int) -> torch.Tensor:
    """Bool [T, T], True where query i may attend key j: causal, plus full attention inside each segment."""
    allowed = torch.ones(n_tokens, n_tokens, dtype=torch.bool).tril()
    for start, end in segments:
        allowed[start:end, start:end] = True
    return allowed


def _check_spans(spans, n_tokens) -> list[tuple[int, int]]:
    out = []
    try:
        for start, end in spans:
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= n_tokens):
                raise LensvizError(f"segment ({start}, {end}) is not a [start, end) span inside 0..{n_tokens}")
            out.append((start, end))
    except LensvizError:  # a ValueError too: keep the specific message
        raise
    except (TypeError, ValueError):
        raise LensvizError(f"segments must be a list of (start, end) token spans, got {spans!r}") from None
    out.sort()
    for (_, e1), (s2, _) in zip(out, out[1:]):
        if s2 < e1:
            raise LensvizError("segments overlap")
    return out


@dataclass(frozen=True)
class SegmentMask(Patch):
    """Block-plus-causal prefill mask. segments=None: the prompt's parts when it was given as a list of
    segments, else the system/user turns of a chat-formatted prompt ("auto"); or explicit [start, end) spans.

    In `lens.trace(prompt, patches=...)` it masks the run's forward pass. In
    `with lens.patched(SegmentMask(...), base=trace): lens.model.generate(...)` (or `lens.generate`) it
    masks the prefill forward over `trace`'s prompt (the spans are resolved against `trace`'s tokens and
    segments); the cached one-token decoding steps keep the causal mask, so generated tokens see the
    whole MAS-encoded prompt (methods-2 §4.4). The ids given to generate must start with the trace's
    ids (more tokens after them are causal), else LensvizError."""

    segments: object = None
    #: lens.patched needs base=<a trace of the prompt> to know which tokens to mask (Lens.generate makes one)
    needs_prompt = True

    def resolve(self, tokens: list[str], parts: list | None) -> list[tuple[int, int]]:
        if self.segments == "auto" or (self.segments is None and parts is None):
            spans = chat_segments(tokens)
            if not spans:
                raise LensvizError("SegmentMask found no segments: give the prompt as a list of segments, a chat-"
                                   "formatted prompt (ChatML / Llama-3 headers), or explicit (start, end) spans")
            return spans
        if self.segments is None:
            return list(parts)
        return _check_spans(self.segments, len(tokens))

    def validate(self, lens, n_tokens):
        if n_tokens is None:
            raise LensvizError("SegmentMask in lens.patched needs base=<a trace of the prompt it masks>, e.g. "
                               "lens.trace(prompt, backward=False); without one it works only inside "
                               "lens.trace(..., patches=...)")
        if self.segments is not None and self.segments != "auto":
            _check_spans(self.segments, n_tokens)

    def install(self, ctx):
        tokens = [ctx.lens.decode(i) for i in ctx.input_ids.tolist()]
        spans = self.resolve(tokens, ctx.segments)
        ctx.mask_prompt(segment_mask(spans, len(tokens)))

    def to_data(self, trace) -> dict:
        """The mask and its segments as plain data for a widget: {"segments": [[s, e], ...], "mask": T x T 0/1}."""
        spans = self.resolve(trace.tokens, trace.segments if not isinstance(trace.prompt, str) else None)
        return {"segments": [list(s) for s in spans], "mask": segment_mask(spans, len(trace)).int().tolist(),
                "tokens": list(trace.tokens)}


def _cache_length(kwargs) -> int:
    """Tokens already in the KV cache passed to a backbone call (0 without a cache)."""
    for name in ("cache", "past_key_values"):  # transformers renamed past_key_values -> cache in 5.x
        cache = kwargs.get(name)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


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
        p, past = len(self.prompt_ids), _cache_length(kwargs)
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
