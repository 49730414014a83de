"""Vocabulary projection ("logit lens"): proj(v) = softmax(W_U . N_f(v)) for any residual-space vectors.

N_f is the model's final norm with its affine parameters, W_U the unembedding. Projections run in
row chunks of batched matmuls, so the full [rows, V] tensor is never held for more than one chunk.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import LensvizError

CHUNK_BYTES = 128 * 2**20  # logits held at once: one reused buffer of [rows, V]
BLOCK_BYTES = 3 * 2**20  # CPU: top-k, softmax and rank run on row blocks of ~3 MB (cache-sized)
TOPK_GROUP = 64  # columns per group of the two-stage top-k (see _topk_indices)


@dataclass(eq=False)
class TopK:
    """Top (or bottom) k tokens of projected vectors. Leading dims are those of the vectors.

    ids [..., k], probs [..., k] float32 (probabilities under the full softmax, computed in the model's
    dtype, float32 for half-precision models), target_rank [...] long or None (0 = most probable),
    tokens: nested lists of str shaped like ids.
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
    ids, probs, ranks = [], [], []
    scratch = _Scratch()  # block-sized temporaries, reused: no allocator churn, nothing held afterwards
    with torch.no_grad():
        for logits in _logit_chunks(lens, rows, normalize):
            for block in _row_blocks(logits):
                top = _topk_indices(block, k, largest=not bottom)
                ids.append(top.cpu())
                soft = scratch.softmax(block)
                probs.append(soft.gather(1, top).float().cpu())
                if tid is not None:
                    above = torch.gt(block, block[:, tid:tid + 1], out=scratch.like(block, "above", torch.bool))
                    ranks.append(above.sum(-1, dtype=torch.int32).cpu())
    ids = torch.cat(ids).reshape(*lead, k)
    probs = torch.cat(probs).reshape(*lead, k)
    rank = torch.cat(ranks).to(torch.long).reshape(lead) if tid is not None else None
    return TopK(ids=ids, probs=probs, target_rank=rank, _strings=lens.token_strings)


def _logit_chunks(lens, rows: torch.Tensor, normalize: bool):
    """Yield W_U . N_f(v) for consecutive row chunks of `rows` [n, D] as [chunk, V] tensors.

    Where the unembedding is a plain in-memory Linear, every chunk is written into one reused buffer
    (no fresh [chunk, V] allocation per chunk, whose page faults cost about as much as a tenth of the
    matmul); a yielded chunk is overwritten by the next one. Otherwise the module itself is called."""
    norm, unembed = lens.final_norm_module, lens.unembed_module
    device, dtype = lens.unembed_device, lens.model_dtype
    weight, bias = _plain_linear(unembed)
    n_vocab = lens.vocab_size if weight is None else weight.shape[0]
    chunk = max(1, CHUNK_BYTES // (torch.finfo(dtype).bits // 8 * n_vocab))
    chunk = min(chunk, max(1, rows.shape[0]))
    buffer = None
    for start in range(0, rows.shape[0], chunk):
        v = rows[start:start + chunk].to(device=device, dtype=dtype)
        if normalize:
            v = v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
        h = norm(v)
        if weight is None or h.dtype != weight.dtype:
            logits = unembed(h)
        else:
            if buffer is None:
                buffer = torch.empty(chunk, n_vocab, dtype=weight.dtype, device=weight.device)
            logits = buffer[:h.shape[0]]
            if bias is None:
                torch.mm(h, weight.T, out=logits)
            else:
                torch.addmm(bias, h, weight.T, out=logits)
        yield logits


def _plain_linear(module):
    """(weight [V, D], bias [V] | None) of an nn.Linear whose weight is a real tensor, else (None, None)
    (accelerate-dispatched or custom heads are called as modules)."""
    weight = getattr(module, "weight", None)
    if (type(module) is not torch.nn.Linear or getattr(module, "_hf_hook", None) is not None
            or not isinstance(weight, torch.Tensor) or weight.device.type == "meta" or weight.dim() != 2):
        return None, None
    return weight, module.bias


class _Scratch:
    """Reused temporaries shaped like a block: `like(block, name, dtype)` -> an uninitialised tensor."""

    def __init__(self):
        self._bufs = {}

    def like(self, block: torch.Tensor, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or block.dtype
        buf = self._bufs.get(name)
        if (buf is None or buf.shape[0] < block.shape[0] or buf.shape[1:] != block.shape[1:] or buf.dtype != dtype
                or buf.device != block.device):
            buf = self._bufs[name] = torch.empty(block.shape, dtype=dtype, device=block.device)
        return buf[:block.shape[0]]

    def softmax(self, block: torch.Tensor) -> torch.Tensor:
        """softmax over the last dim, written into a reused block (a fresh one where torch has no out=)."""
        try:
            return torch.softmax(block, dim=-1, out=self.like(block, "softmax"))
        except (TypeError, RuntimeError):  # pragma: no cover - torch builds without softmax.int_out
            return torch.softmax(block, dim=-1)


def _topk_indices(block: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Indices [n, k] of the k largest (smallest) entries per row of `block` [n, V], best first.

    Exact two-stage selection: the k groups of TOPK_GROUP consecutive columns with the largest maxima
    hold every top-k entry (a group holding one is beaten by at most k - 1 groups, each holding an
    entry larger than it), so a full top-k runs on k * TOPK_GROUP candidates (plus the < TOPK_GROUP
    columns that fill no group) instead of V; the group maxima cost one vectorised pass."""
    n, v = block.shape
    g = TOPK_GROUP
    groups = v // g
    if groups < 2 * k:
        return block.topk(k, dim=-1, largest=largest).indices
    body = block[:, :groups * g].reshape(n, groups, g)
    best = body.amax(-1) if largest else body.amin(-1)
    first = best.topk(k, dim=-1, largest=largest).indices * g  # [n, k] first column of each chosen group
    cand = (first[..., None] + torch.arange(g, device=block.device)).reshape(n, k * g)
    if groups * g < v:
        tail = torch.arange(groups * g, v, device=block.device).expand(n, -1)
        cand = torch.cat([cand, tail], dim=-1)
    pick = block.gather(1, cand).topk(k, dim=-1, largest=largest).indices
    return cand.gather(1, pick)


def _row_blocks(logits: torch.Tensor):
    """Split [n, V] logits into float32 (or wider) row blocks for the per-row passes: on the CPU blocks
    of ~BLOCK_BYTES, so that top-k, the softmax normaliser and the rank count read cached memory."""
    half = logits.dtype in (torch.float16, torch.bfloat16)
    if logits.device.type != "cpu":
        yield logits.float() if half else logits
        return
    rows = max(1, BLOCK_BYTES // (4 * logits.shape[-1]))
    for start in range(0, logits.shape[0], rows):
        block = logits[start:start + rows]
        yield block.float() if half else block


def logit_lens(trace, k: int = 10, site: str = "post") -> TopK:
    """Project resid(l, site) for every layer l and position: TopK with leading dims [n_layers, T],
    ranked for the trace's target."""
    from ..trace import check_site

    site = check_site(site)
    stacked = torch.stack([trace.resid(layer, site) for layer in range(trace.n_layers)])
    return project(trace._lens, stacked, k, target=trace.target_id)
