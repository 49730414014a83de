"""Vocabulary projection ("logit lens"): proj(v) = softmax(W_U . N_f(v)) for any residual-space vectors.

N_f is the model's final norm with its affine parameters, W_U the unembedding. Projections run in
row chunks of batched matmuls, so the full [rows, V] tensor is never held for more than one chunk.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import LensvizError

CHUNK_BYTES = 64 * 2**20  # logits held at once per chunk


@dataclass(eq=False)
class TopK:
    """Top (or bottom) k tokens of projected vectors. Leading dims are those of the vectors.

    ids [..., k], probs [..., k] (probabilities under the full softmax), target_rank [...] or None
    (0 = most probable), tokens: nested lists of str shaped like ids.
    """

    ids: torch.Tensor
    probs: torch.Tensor
    target_rank: torch.Tensor | None
    _strings: list = field(repr=False, default=None)

    @property
    def tokens(self) -> list:
        table = self._strings
        flat = [table[i] for i in self.ids.reshape(-1).tolist()]
        shape = list(self.ids.shape)
        for size in reversed(shape[1:]):
            flat = [flat[i:i + size] for i in range(0, len(flat), size)]
        return flat

    def __repr__(self) -> str:
        return f"TopK(shape={tuple(self.ids.shape)}, target_rank={'yes' if self.target_rank is not None else 'no'})"


def project(lens, vectors: torch.Tensor, k: int = 10, *, target=None, normalize: bool = False,
            bottom: bool = False) -> TopK:
    """proj(v) for vectors [..., D] -> TopK with leading dims [...]. See `Lens.project`."""
    if not isinstance(vectors, torch.Tensor):
        raise LensvizError(f"vectors must be a torch.Tensor [..., {lens.d_model}], got {type(vectors).__name__}")
    if vectors.dim() == 0 or vectors.shape[-1] != lens.d_model:
        raise LensvizError(f"vectors must have last dimension d_model={lens.d_model}, got shape {tuple(vectors.shape)}")
    if not vectors.is_floating_point():
        raise LensvizError(f"vectors must be floating point, got {vectors.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= lens.vocab_size:
        raise LensvizError(f"k must be an int in [1, {lens.vocab_size}], got {k!r}")
    tid = None if target is None else lens.token_id(target)
    lead = vectors.shape[:-1]
    rows = vectors.reshape(-1, lens.d_model)
    norm, unembed = lens.final_norm_module, lens.unembed_module
    device, dtype = lens.unembed_device, lens.model_dtype
    chunk = max(1, CHUNK_BYTES // (4 * lens.vocab_size))
    ids, probs, ranks = [], [], []
    with torch.no_grad():
        for start in range(0, rows.shape[0], chunk):
            v = rows[start:start + chunk].to(device=device, dtype=dtype)
            if normalize:
                v = v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
            logits = unembed(norm(v)).float()
            top = logits.topk(k, dim=-1, largest=not bottom)
            lse = logits.logsumexp(-1, keepdim=True)
            ids.append(top.indices.cpu())
            probs.append((top.values - lse).exp().cpu())
            if tid is not None:
                ranks.append((logits > logits[:, tid:tid + 1]).sum(-1).cpu())
    ids = torch.cat(ids).reshape(*lead, k)
    probs = torch.cat(probs).reshape(*lead, k)
    rank = torch.cat(ranks).reshape(lead) if tid is not None else None
    return TopK(ids=ids, probs=probs, target_rank=rank, _strings=lens.token_strings)


def logit_lens(trace, k: int = 10, site: str = "post") -> TopK:
    """Project resid(l, site) for every layer l and position: TopK with leading dims [n_layers, T],
    ranked for the trace's target."""
    from ..trace import check_site

    site = check_site(site)
    stacked = torch.stack([trace.resid(layer, site) for layer in range(trace.n_layers)])
    return project(trace._lens, stacked, k, target=trace.target_id)
