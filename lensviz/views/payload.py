"""Trace -> compact payloads for the browser: small dicts plus binary buffers (little-endian int32,
uint8/int8 quantised maps), never [layers, T, V] or T x T JSON lists. Each function serves one view.
"""
from __future__ import annotations

import weakref

import torch

from ..checks import check_index_list
from ..errors import LensvizError
from ..lenses import reversed as rev
from ..lenses.backward import backward_lens
from ..lenses.neurons import build_value_index, debugger_view, project_values, value_vectors
from ..lenses.visit import visit_graph

_VALUE_INDEX: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # Lens -> its ValueIndex, built once


def _i32(x: torch.Tensor) -> bytes:
    return x.to(torch.int32).contiguous().numpy().tobytes()


def _u8(x01: torch.Tensor) -> bytes:
    """Values in [0, 1] -> uint8 0..255."""
    return (x01.float().clamp(0, 1) * 255).round().to(torch.uint8).contiguous().numpy().tobytes()


def _i8(x: torch.Tensor) -> tuple[bytes, float]:
    """Signed values -> int8 -127..127 and the scale (max |x|) that maps them back."""
    scale = float(x.abs().max()) if x.numel() else 0.0
    q = (x.double() / scale * 127).round() if scale > 0 else torch.zeros_like(x, dtype=torch.float64)
    return q.to(torch.int8).contiguous().numpy().tobytes(), scale


def strings_for(lens, ids: torch.Tensor) -> dict[str, str]:
    """{id: text} for the distinct ids shown (token text is untrusted: the browser escapes it)."""
    table = lens.token_strings
    return {str(i): table[i] for i in sorted(set(ids.reshape(-1).tolist()))}


def summary(lens, trace, elapsed: float | None = None) -> dict:
    """Numbers for the header line: prediction, target probability and rank, loss, sizes."""
    logp = torch.log_softmax(trace.logits[-1].double(), -1)
    top = logp.topk(5)
    tid = trace.target_id
    return {
        "n_tokens": len(trace), "n_layers": lens.n_layers, "n_heads": lens.n_heads, "d_mlp": lens.d_mlp,
        "vocab_size": lens.vocab_size,
        "target": trace.target, "target_id": tid, "target_prob": float(logp[tid].exp()),
        "target_rank": int((logp > logp[tid]).sum()), "loss": trace.loss,
        "top": [{"token": lens.token_strings[int(i)], "prob": float(p.exp())} for p, i in zip(top.values, top.indices)],
        "seconds": elapsed, "backward": trace.has_backward, "gradient": trace.gradient,
    }


def column_runs(positions) -> list[list[int]]:
    """Sorted distinct positions -> their runs of consecutive positions as [start, stop) pairs."""
    runs = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return runs


def logit_lens_grid(trace, site: str = "post", positions=None, base=None) -> tuple[dict, list[bytes]]:
    """Top-1 token per (layer, position) of the logit lens at `site`, for every position (positions None)
    or the given ones (sorted, de-duplicated; one batched projection of only those rows):
    meta + [ids int32 [L, n], probs uint8 [L, n], target rank int32 [L, n]] with n the number of
    positions, columns in position order. meta: site, shape [L, T] (the whole grid's), columns (the runs
    of positions sent, [start, stop) pairs), strings ({id: text} of the ids sent). base: the unpatched
    trace of a patched one: a fourth buffer, uint8 [L, n], is 1 where the top-1 token differs from base's
    (meta "changed": true)."""
    t = len(trace)
    if positions is None:
        ll, cols = trace.logit_lens(k=1, site=site), [[0, t]]
        ref = base.logit_lens(k=1, site=site) if base is not None else None
    else:
        idx = check_index_list(positions, t, "positions", "position")
        ll, cols = trace.logit_lens(k=1, site=site, positions=idx), column_runs(idx)
        ref = base.logit_lens(k=1, site=site, positions=idx) if base is not None else None
    ids = ll.ids[..., 0]
    meta = {"site": site, "shape": [ids.shape[0], t], "columns": cols, "strings": strings_for(trace.lens, ids),
            "changed": ref is not None}
    bufs = [_i32(ids), _u8(ll.probs[..., 0]), _i32(ll.target_rank)]
    if ref is not None:
        bufs.append((ids != ref.ids[..., 0]).to(torch.uint8).contiguous().numpy().tobytes())
    return meta, bufs


def cell_topk(trace, layer: int, position: int, site: str = "post", k: int = 10) -> dict:
    """Top-k tokens of one logit-lens cell with probabilities and the target's rank."""
    return cell_topks(trace, [(layer, position)], site, k)[0]


def cell_topks(trace, cells, site: str = "post", k: int = 10) -> list[dict]:
    """`cell_topk` for many (layer, position) cells at once: one batched projection."""
    cells = [(int(layer), int(position)) for layer, position in cells]
    if not cells:
        return []
    v = torch.stack([trace.resid(layer, site)[position] for layer, position in cells])
    top = trace.lens.project(v, k=k, target=trace.target_id)
    tokens, probs, ranks, norms = top.tokens, top.probs.tolist(), top.target_rank.tolist(), v.norm(dim=-1).tolist()
    return [{"layer": layer, "position": position, "site": site, "target_rank": int(ranks[i]), "norm": float(norms[i]),
             "top": [{"token": t, "prob": float(p)} for t, p in zip(tokens[i], probs[i])]}
            for i, (layer, position) in enumerate(cells)]


def head_norms(trace) -> tuple[dict, list[bytes]]:
    """||A||_F and ||RA||_F per head: meta + [float32 [2, L, H]] (RA rows are 0 without a backward pass)."""
    fwd = rev.head_norms(trace, "forward")
    back = rev.head_norms(trace, "reversed") if trace.has_backward else torch.zeros_like(fwd)
    both = torch.stack([fwd, back]).float()
    return {"shape": list(both.shape), "has_reversed": trace.has_backward}, [both.contiguous().numpy().tobytes()]


MAP_SCALES = ("linear", "symlog", "row")
SYMLOG_DECADES = 3   # symmetric-log maps: linear below max|x| / 10**3, logarithmic above


def signed_scale(m: torch.Tensor, mode: str) -> tuple[torch.Tensor, dict]:
    """A signed [T, T] map -> values in [-1, 1] for display and what they mean: "linear" x / max|x|;
    "symlog" sign(x) log10(1 + |x|/c) / log10(1 + max/c) with c = max|x| / 10**SYMLOG_DECADES; "row" each
    row divided by its own max |x| (rows that are all 0 stay 0)."""
    x = m.double()
    top = float(x.abs().max()) if x.numel() else 0.0
    if top == 0.0:
        return torch.zeros_like(x), {"scale_mode": mode, "scale": 0.0, "c": 0.0}
    if mode == "symlog":
        c = top / 10 ** SYMLOG_DECADES
        return x.sign() * torch.log10(1 + x.abs() / c) / torch.log10(torch.tensor(1 + top / c, dtype=x.dtype)), \
            {"scale_mode": mode, "scale": top, "c": c}
    if mode == "row":
        row = x.abs().amax(dim=-1, keepdim=True)
        return torch.where(row > 0, x / row.clamp_min(1e-300), torch.zeros_like(x)), {"scale_mode": mode, "scale": top, "c": 0.0}
    return x / top, {"scale_mode": "linear", "scale": top, "c": 0.0}


def attention_map(trace, layer: int, head: int, kind: str = "forward", scale: str = "linear") -> tuple[dict, list[bytes]]:
    """One head's T x T map: forward A as uint8 (0..1), reversed RA as int8 of `signed_scale(RA, scale)`
    (meta "scale" = max |RA|; "scale_mode" and "c" say how to read the colours)."""
    if kind == "forward":
        m = trace.attention(layer)[head]
        return {"layer": layer, "head": head, "kind": kind, "n": m.shape[0], "scale": 1.0, "dtype": "u8"}, [_u8(m)]
    shown, info = signed_scale(trace.reversed_attention(layer)[head], scale)
    data = (shown * 127).round().to(torch.int8).contiguous().numpy().tobytes()
    return {"layer": layer, "head": head, "kind": kind, "n": shown.shape[0], "dtype": "i8", **info}, [data]


def attention_sum(trace, layer: int, head: int, kind: str, positions, axis: str = "rows") -> tuple[dict, list[bytes]]:
    """A selection of several positions S: the sum over the query rows i in S of A[i, :] ("rows", [T]: where
    the set looks) or over the key columns j in S of A[:, j] ("cols", [T]: who looks at the set); RA the same.
    Returns meta (positions, axis, max |value|) and float32 [T]."""
    m = trace.attention(layer)[head] if kind == "forward" else trace.reversed_attention(layer)[head]
    idx = torch.tensor(sorted(set(positions)), dtype=torch.long)
    v = m.double()[idx].sum(0) if axis == "rows" else m.double()[:, idx].sum(1)
    return ({"layer": layer, "head": head, "kind": kind, "axis": axis, "positions": idx.tolist(), "n": v.shape[0],
             "max": float(v.abs().max())}, [v.float().contiguous().numpy().tobytes()])


def thumbnails(trace, layer: int, kind: str = "forward", size: int = 32) -> tuple[dict, list[bytes]]:
    """All heads of one layer, average-pooled to at most size x size: uint8 (forward) / int8 (reversed)."""
    maps = trace.attention(layer) if kind == "forward" else trace.reversed_attention(layer)
    t = maps.shape[-1]
    if t > size:
        maps = torch.nn.functional.adaptive_avg_pool2d(maps[None].double(), size)[0]
    n = maps.shape[-1]
    if kind == "forward":
        return {"layer": layer, "kind": kind, "n": n, "heads": maps.shape[0], "dtype": "u8",
                "scale": 1.0}, [_u8(maps / maps.amax(dim=(-1, -2), keepdim=True).clamp_min(1e-12))]
    data, scale = _i8(maps)
    return {"layer": layer, "kind": kind, "n": n, "heads": maps.shape[0], "dtype": "i8", "scale": scale}, [data]


# views built on the lenses ------------------------------------------------------------------------------
def neurons(trace, layer: int, position: int, k: int = 10, include=()) -> dict:
    """LM-Debugger at one layer and position: before/after predictions and the top sub-updates with
    their (sign-corrected) value-vector tokens; neurons in `include` (e.g. patched ones, whose
    coefficient may now be 0) are listed too."""
    view = debugger_view(trace, position=position, k=k, value_k=6, layers=[layer])
    row = view["layers"][0]
    subs = [{"neuron": s["dim"], "coef": s["coeff"], "score": s["score"],
             "tokens": [t["token"] for t in s["tokens"]], **({"expert": s["expert"]} if "expert" in s else {})}
            for s in row["sub_updates"]]
    if trace.lens.adapter.moe:          # MoE: (expert, neuron) pairs; patched ones outside the top stay in the patch list
        include = ()
    extra = [n for n in include if n not in {s["neuron"] for s in subs}]
    if extra:
        a = trace.mlp_activations(layer)[view["position"], extra]
        norms = value_vectors(trace.lens, layer)[extra].norm(dim=-1)
        proj = project_values(trace.lens, layer, extra, 6, signs=a)
        subs += [{"neuron": n, "coef": float(c), "score": float(abs(c) * v), "tokens": toks}
                 for n, c, v, toks in zip(extra, a.tolist(), norms.tolist(), proj.tokens)]
    return {"layer": int(layer), "position": int(view["position"]),
            "before": [{"token": t["token"], "prob": t["prob"]} for t in row["before"]],
            "after": [{"token": t["token"], "prob": t["prob"]} for t in row["after"]],
            "subupdates": subs}


def backward_table(trace) -> tuple[dict, list[bytes]]:
    """Backward Lens top-1 / bottom-1 per (layer, position) for FF1 inputs and FF2 gradients:
    [ff1 top, ff1 bottom, ff2 top, ff2 bottom] int32 [L, T], ||delta|| float32, ff2 and ff1 target ranks int32."""
    bl = backward_lens(trace, k=1)
    parts = [bl.ff1.top.ids[..., 0], bl.ff1.bottom.ids[..., 0], bl.ff2.top.ids[..., 0], bl.ff2.bottom.ids[..., 0]]
    strings = strings_for(trace.lens, torch.stack(parts))
    meta = {"shape": list(parts[0].shape), "strings": strings, "normalize": bl.normalize}
    bufs = [_i32(p) for p in parts] + [bl.ff2.norm.float().contiguous().numpy().tobytes(),
                                       _i32(bl.ff2.target_rank), _i32(bl.ff1.target_rank)]
    return meta, bufs


def backward_cell(trace, layer: int, position: int, part: str = "ff2", k: int = 10) -> dict:
    """One Backward Lens cell in full: the top-k and bottom-k tokens of the FF2 gradient delta ("ff2") or the
    FF1 input x ("ff1") at (layer, position), the target's rank (0 = top) and the vector's norm."""
    bl = backward_lens(trace, k=k, layers=[layer])
    grid = bl.ff2 if part == "ff2" else bl.ff1
    row = lambda t: [{"token": tok, "prob": float(p)} for tok, p in zip(t.tokens[0][position], t.probs[0, position].tolist())]  # noqa: E731
    return {"layer": layer, "position": position, "part": part, "normalize": bl.normalize,
            "target_rank": int(grid.target_rank[0, position]), "norm": float(grid.norm[0, position]),
            "top": row(grid.top), "bottom": row(grid.bottom)}


FLOW_ROWS = {"block_input": 0, "attn_input": 1, "qkv": 2, "head_query": 3, "memory_key": 4, "memory_value": 5,
             "head_output": 6, "concat": 7, "wo_neuron": 8, "attn_output": 9, "residual_after_attn": 10,
             "mlp_input": 11, "mlp_key": 12, "mlp_value": 13, "mlp_output": 14, "block_output": 15}


def flow_graph(trace, position: int, layers=None) -> dict:
    """The VISIT graph (plain data) with a drawing row per node (layer-major, stage-minor)."""
    g = visit_graph(trace, position=position, layers=layers, n_heads=4, n_wo_top=4, n_wo_bottom=2,
                    n_mlp_top=6, n_mlp_bottom=3)
    n_stages = max(FLOW_ROWS.values()) + 1
    for node in g["nodes"]:
        node["row"] = (node.get("layer") or 0) * n_stages + FLOW_ROWS.get(node["kind"], 7)
    return g


def value_search(lens, token) -> dict:
    """Value vectors whose projection has `token` in its top tokens (index built once per model, cached)."""
    if not isinstance(token, str) or not token:
        raise LensvizError("search needs a token (text)")
    index = _VALUE_INDEX.get(lens)
    if index is None:
        index = _VALUE_INDEX[lens] = build_value_index(lens)
    hits = index.query(token, limit=20)
    return {"hits": [{"layer": h["layer"], "dim": h["dim"], "rank": h["rank"], "logit": h["logit"],
                      **({"expert": h["expert"]} if "expert" in h else {}),
                      "tokens": [t["token"] if isinstance(t, dict) else str(t)
                                 for t in index.value_tokens(h["layer"], h["dim"], expert=h.get("expert"))[:6]]}
                     for h in hits]}


def masks(trace) -> dict:
    """The attention mask each query used (segment masks included) as 0/1 rows, with the tokens."""
    allowed = trace.attention_mask(0)
    return {"tokens": list(trace.tokens), "mask": allowed.int().tolist(), "segments": [list(s) for s in trace.segments]}


# prompt pairs (views/pairs.py) ----------------------------------------------------------------------------
def sweep_effect(sweep) -> tuple[dict, list[bytes]]:
    """A patching sweep's heatmap: meta (site, method, shape, the two runs' metrics, max |effect|) and
    float32 effect [n_layers, T] (residual sites) or [n_layers, n_heads] (site "head")."""
    e = sweep.effect.double()
    finite = e[torch.isfinite(e)]
    return ({"site": sweep.site, "method": sweep.method, "shape": list(e.shape), "metric_clean": sweep.metric_clean,
             "metric_corrupt": sweep.metric_corrupt, "denom": sweep.metric_clean - sweep.metric_corrupt,
             "max": float(finite.abs().max()) if finite.numel() else 0.0},
            [e.float().contiguous().numpy().tobytes()])


def head_importance(trace, measure: str, progress=None) -> tuple[dict, list[bytes]]:
    """One value per head for the head grid: lv.head_importance(trace, measure) ("dla", "ablation", "ra")
    or "norm" (||A||_F); meta (measure, shape, max |value|, signed) and float32 [n_layers, n_heads]."""
    from ..lenses.importance import head_importance as importance

    if measure == "norm":
        v = rev.head_norms(trace, "forward").double()
    else:
        v = importance(trace, measure, **({"progress": progress} if measure == "ablation" else {}))
    return ({"measure": measure, "shape": list(v.shape), "max": float(v.abs().max()) if v.numel() else 0.0,
             "signed": measure in ("dla", "ablation"), "metric": float(trace.metric)},
            [v.float().contiguous().numpy().tobytes()])
