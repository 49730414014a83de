"""What a patch set changed: target probability and rank before/after, KL of the next-token
distributions, and the logit-lens cells whose top-1 token changed. Small, for a widget."""
from __future__ import annotations

import torch

from ..errors import LensvizError
from ..trace import Trace


def compare(base: Trace, patched: Trace, site: str = "post", *, grid: bool = True) -> dict:
    """Effect of `patched` relative to `base` (same prompt), explained for base's target.

    Returns {"target", "target_id", "prob_before", "prob_after", "rank_before", "rank_after",
    "nll_before", "nll_after", "kl" (KL(base || patched) at the last position, nats), "top1_before",
    "top1_after", "changed" (bool [layers, T] list: logit-lens top-1 changed), "changes" (list of
    {layer, position, before, after})}. grid=False leaves out "changed" and "changes" (and the two
    full logit-lens grids they need: the Explorer's long prompts mark changed cells per window instead).
    """
    if not isinstance(base, Trace) or not isinstance(patched, Trace):
        raise LensvizError("compare needs two Traces")
    if not torch.equal(base.input_ids, patched.input_ids):
        raise LensvizError("compare needs traces of the same prompt")
    tid = base.target_id
    lp0 = torch.log_softmax(base.logits[-1].double(), -1)
    lp1 = torch.log_softmax(patched.logits[-1].double(), -1)
    strings = base.lens.token_strings
    cells = {}
    if grid:
        ll0, ll1 = base.logit_lens(k=1, site=site), patched.logit_lens(k=1, site=site)
        changed = ll0.ids[..., 0] != ll1.ids[..., 0]
        cells = {"changed": changed.tolist(),
                 "changes": [{"layer": int(layer), "position": int(pos), "before": strings[int(ll0.ids[layer, pos, 0])],
                              "after": strings[int(ll1.ids[layer, pos, 0])]} for layer, pos in changed.nonzero().tolist()]}
    return {
        "target": base.target, "target_id": tid,
        "prob_before": float(lp0[tid].exp()), "prob_after": float(lp1[tid].exp()),
        "rank_before": int((lp0 > lp0[tid]).sum()), "rank_after": int((lp1 > lp1[tid]).sum()),
        "nll_before": float(-lp0[tid]), "nll_after": float(-lp1[tid]),
        "kl": float((lp0.exp() * (lp0 - lp1)).sum()),
        "top1_before": strings[int(lp0.argmax())], "top1_after": strings[int(lp1.argmax())],
        **cells,
    }
