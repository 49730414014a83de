"""The one vocabulary projection: logits W v (+ b) of residual-space rows, produced in chunks, and the
reducers every lens reads them through (top-k / bottom-k, target rank, target probability, entropy, KL,
NLL). Chunks are written into one reused [rows, V] buffer, so the full [n, V] tensor never exists.

The logit lens reads a vector v as proj(v) = softmax(W_U N_f(v)) (N_f = the final norm with its affine
parameters, W_U the unembedding; nostalgebraist 2020, "interpreting GPT: the logit lens"), followed by
the family's logit transform (Gemma 2's soft-capping, Cohere's and Granite's scaling), so that the last
layer's projection is the model's own output distribution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .checks import check_int
from .errors import LensvizError
from .hf import plain_linear

CHUNK_BYTES = 128 * 2**20  # logits held at once: one reused buffer of [rows, V]
BLOCK_BYTES = 3 * 2**20  # CPU: top-k, softmax and rank run on row blocks of ~3 MB (cache-sized)
TOPK_GROUP = 64  # columns per group of the two-stage top-k (see top_indices)


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
        return nested_tokens(self.ids, self._strings)

    def __repr__(self) -> str:
        return f"TopK(shape={tuple(self.ids.shape)}, target_rank={'yes' if self.target_rank is not None else 'no'})"


def nested_tokens(ids: torch.Tensor, strings: list) -> list:
    """Nested lists of token text shaped like `ids` (decoded through the table `strings`)."""
    flat = [strings[i] for i in ids.reshape(-1).tolist()]
    for size in reversed(list(ids.shape)[1:]):
        flat = [flat[i:i + size] for i in range(0, len(flat), size)]
    return flat


def working(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits upcast to float32 for softmax-type reductions; other dtypes as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def nll(logits: torch.Tensor, targets) -> torch.Tensor:
    """-log softmax(logits)[target], differentiable: logits [..., V] with targets an int (-> [...]) or a
    LongTensor [...] (one target per row -> [...]). Half precision is upcast first."""
    logp = torch.log_softmax(working(logits), dim=-1)
    if isinstance(targets, int):
        return -logp[..., targets]
    return -logp.gather(-1, targets.to(logp.device)[..., None])[..., 0]


# --------------------------------------------------------------------------------------------------
# logits in chunks
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Readout:
    """How rows v [n, D] become logits [n, V]: h = pre(v), then h W^T + b into a reused buffer when
    `weight` [V, D] is a plain tensor, else module(h); then post(logits) where given (the family's logit
    transform). Rows are moved to `device` / `dtype` first."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    module: Callable | None
    pre: Callable | None
    device: torch.device
    dtype: torch.dtype
    n_vocab: int
    post: Callable | None = None


def unembedding(lens, *, norm: bool = True, bias: bool = True, normalize: bool = False,
                gain: torch.Tensor | None = None) -> Readout:
    """The model's readout. norm=True: the final norm first (the logit lens, softmax(W_U N_f(v)));
    norm=False: raw W_U v, with `gain` [D] multiplied in (e.g. the final norm's gamma) and, with
    bias=False, no unembedding bias. normalize=True projects v / |v|. With the final norm the family's
    logit transform (soft-capping, logit scaling) follows, as in the model; raw readouts have none. A
    projection out of the residual (OPT-350m's project_out) always comes just before W_U: E = W_U W_out."""
    final, unembed = lens.final_norm_module, lens.unembed_module
    weight, b = plain_linear(unembed)
    module = None
    if weight is None:
        module = unembed
        raw_bias = getattr(unembed, "bias", None)
        if not bias and raw_bias is not None:  # offloaded or custom head: call it, then drop its bias
            module = lambda h: unembed(h) - raw_bias  # noqa: E731
    steps = []
    if normalize:
        steps.append(lambda v: v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny))
    if norm and final is not None:  # (post-LN OPT has no final norm)
        steps.append(final)
    if gain is not None:
        steps.append(lambda v: v * gain.detach().to(v))
    if lens.adapter.unembed_proj is not None:  # OPT-350m: W_U reads project_out(h) (raw readouts too)
        steps.append(lens.model.get_submodule(lens.adapter.unembed_proj))
    pre = None if not steps else (steps[0] if len(steps) == 1 else _chain(steps))
    adapter, config = lens.adapter, lens.model.config
    post = None
    if norm and adapter.has_logit_transform(config):
        post = lambda logits: adapter.finish_logits(config, logits)  # noqa: E731
    return Readout(weight=weight, bias=b if bias else None, module=module, pre=pre, device=lens.unembed_device,
                   dtype=lens.model_dtype, n_vocab=lens.vocab_size if weight is None else weight.shape[0], post=post)


def matrix_readout(matrix: torch.Tensor) -> Readout:
    """Logits v M^T for a plain matrix M [V, D] (e.g. an embedding-space read or write matrix)."""
    return Readout(weight=matrix, bias=None, module=None, pre=None, device=matrix.device, dtype=matrix.dtype,
                   n_vocab=matrix.shape[0])


def _chain(steps):
    def run(v):
        for step in steps:
            v = step(v)
        return v

    return run


def logit_chunks(readout: Readout, rows: torch.Tensor, chunk_bytes: int = CHUNK_BYTES):
    """Yield (start, logits [c, V]) for consecutive row chunks of `rows` [n, D].

    Where the readout has a plain weight every chunk is written into one reused buffer (no fresh [c, V]
    allocation per chunk, whose page faults cost about as much as a tenth of the matmul); a yielded
    chunk is overwritten by the next one. Otherwise the module itself is called."""
    weight, bias = readout.weight, readout.bias
    chunk = max(1, chunk_bytes // (torch.finfo(readout.dtype).bits // 8 * readout.n_vocab))
    chunk = min(chunk, max(1, rows.shape[0]))
    buffer = None
    for start in range(0, rows.shape[0], chunk):
        h = rows[start:start + chunk].to(device=readout.device, dtype=readout.dtype)
        if readout.pre is not None:
            h = readout.pre(h)
        if weight is None or h.dtype != weight.dtype:
            logits = readout.module(h) if weight is None else torch.nn.functional.linear(h, weight, bias)
        else:
            if buffer is None:
                buffer = torch.empty(chunk, readout.n_vocab, dtype=weight.dtype, device=weight.device)
            logits = buffer[:h.shape[0]]
            if bias is None:
                torch.mm(h, weight.T, out=logits)
            else:
                torch.addmm(bias, h, weight.T, out=logits)
        yield start, logits if readout.post is None else readout.post(logits)


def row_blocks(logits: torch.Tensor):
    """Split [n, V] logits into float32 (or wider) row blocks for the per-row passes: on the CPU blocks
    of ~BLOCK_BYTES, so that top-k, the softmax normaliser and the rank count read cached memory."""
    if logits.device.type != "cpu":
        yield working(logits)
        return
    rows = max(1, BLOCK_BYTES // (4 * logits.shape[-1]))
    for start in range(0, logits.shape[0], rows):
        yield working(logits[start:start + rows])


def blocks(readout: Readout, rows: torch.Tensor, chunk_bytes: int = CHUNK_BYTES):
    """Every row block of the logits of `rows`, in order: yields [b, V] float blocks (views of the reused
    buffer: read each before asking for the next). Callers run it under torch.no_grad()."""
    for _, logits in logit_chunks(readout, rows, chunk_bytes):
        yield from row_blocks(logits)


# --------------------------------------------------------------------------------------------------
# reducers
# --------------------------------------------------------------------------------------------------
class Scratch:
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

    def rank(self, block: torch.Tensor, target: int) -> torch.Tensor:
        """[b] int32: how many entries of each row exceed the row's entry at `target` (0 = top)."""
        above = torch.gt(block, block[:, target:target + 1], out=self.like(block, "above", torch.bool))
        return above.sum(-1, dtype=torch.int32)


def top_indices(block: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
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


def check_rows(vectors, d_model: int) -> torch.Tensor:
    """vectors [..., D] floating point, else a LensvizError."""
    if not isinstance(vectors, torch.Tensor):
        raise LensvizError(f"vectors must be a torch.Tensor [..., {d_model}], got {type(vectors).__name__}")
    if vectors.dim() == 0 or vectors.shape[-1] != d_model:
        raise LensvizError(f"vectors must have last dimension d_model={d_model}, got shape {tuple(vectors.shape)}")
    if not vectors.is_floating_point():
        raise LensvizError(f"vectors must be floating point, got {vectors.dtype}")
    return vectors


def project(lens, vectors: torch.Tensor, k: int = 10, *, target=None, normalize: bool = False,
            bottom: bool = False) -> TopK:
    """proj(v) = softmax(W_U N_f(v)) for vectors [..., D] -> TopK with leading dims [...] (ids and
    probabilities of the k most (bottom: least) probable tokens, the target's rank). See `Lens.project`."""
    check_rows(vectors, lens.d_model)
    k = check_int(k, "k", 1, lens.vocab_size)
    tid = None if target is None else lens.token_id(target)
    lead = vectors.shape[:-1]
    ids, probs, ranks = [], [], []
    scratch = Scratch()  # block-sized temporaries, reused: no allocator churn, nothing held afterwards
    with torch.no_grad():
        for block in blocks(unembedding(lens, normalize=normalize), vectors.reshape(-1, lens.d_model)):
            top = top_indices(block, k, largest=not bottom)
            ids.append(top.cpu())
            probs.append(scratch.softmax(block).gather(1, top).float().cpu())
            if tid is not None:
                ranks.append(scratch.rank(block, tid).cpu())
    ids = torch.cat(ids).reshape(*lead, k)
    probs = torch.cat(probs).reshape(*lead, k)
    rank = torch.cat(ranks).to(torch.long).reshape(lead) if tid is not None else None
    return TopK(ids=ids, probs=probs, target_rank=rank, _strings=lens.token_strings)


def top_logits(readout: Readout, rows: torch.Tensor, k: int, *, bottom: bool = False,
               dtype: torch.dtype | None = torch.float32):
    """The k largest (bottom: smallest) logits of each row of rows [N, D]: (ids [N, k] long, logits
    [N, k] in `dtype`, None = the float dtype they were ranked in), best first."""
    ids, vals = [], []
    with torch.no_grad():
        for block in blocks(readout, rows):
            top = top_indices(block, k, largest=not bottom)
            ids.append(top.cpu())
            vals.append(block.gather(1, top).to("cpu", dtype or block.dtype))
    if not ids:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k, dtype=dtype or readout.dtype)
    return torch.cat(ids), torch.cat(vals)


def entropy_and_target_prob(readout: Readout, rows: torch.Tensor, target_id: int):
    """Entropy in bits [N] and p(target) [N] of softmax(logits) for rows [N, D] (float64 on CPU; computed
    in float32, or float64 for float64 models)."""
    ent, p_t = [], []
    with torch.no_grad():
        for block in blocks(readout, rows):
            logp = torch.log_softmax(block, dim=-1)  # finite: no 0 * log 0 terms
            ent.append((-(logp.exp() * logp).sum(-1) / math.log(2)).double().cpu())
            p_t.append(logp[:, target_id].exp().double().cpu())
    if not ent:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    return torch.cat(ent), torch.cat(p_t)


def kl_rows(readout: Readout, p_rows: torch.Tensor, q_rows: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits(p)) || softmax(logits(q))) in nats, row by row: [N] (float64 on CPU). Matching
    p and q rows are projected in one chunk (so a row's numbers do not depend on how many rows come)."""
    out = []
    step = max(1, CHUNK_BYTES // (2 * (torch.finfo(readout.dtype).bits // 8) * readout.n_vocab))
    with torch.no_grad():
        for start in range(0, p_rows.shape[0], step):
            pair = torch.cat([p_rows[start:start + step], q_rows[start:start + step]])
            logs = torch.cat([torch.log_softmax(b, dim=-1) for b in blocks(readout, pair, 2 * CHUNK_BYTES)])
            lp, lq = logs.chunk(2)
            out.append((lp.exp() * (lp - lq)).sum(-1).double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
