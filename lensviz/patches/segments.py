"""Segment masking (MAS: Katz, Ringel, Romano & Wolf, ACL 2025, "Segment-Based Attention Masking for
GPTs"): tokens attend to every token of their own segment and of all
earlier segments; tokens outside every segment stay causal. Segments come from the prompt's parts or
from chat-template markers (ChatML as in SmolLM2/Qwen, Llama-3 headers)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

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
    whole MAS-encoded prompt. The ids given to generate must start with the trace's
    ids (more tokens after them are causal), else LensvizError."""

    segments: object = None
    needs_prompt = True  # lens.patched needs base=<a trace of the prompt> (Lens.generate makes one)

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
