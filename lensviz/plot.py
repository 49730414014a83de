"""Static matplotlib figures of the lensviz views, returned as `matplotlib.figure.Figure` (object API, no
pyplot state; `fig.savefig("x.png" | "x.svg" | "x.pdf")`). matplotlib is imported on first call.
Token text is literal: mathtext is off on model text (`$` stays `$`), newline -> ↵, tab -> ⇥.
"""
from __future__ import annotations

import math

import torch

from .checks import check_index, check_int, check_layer_list
from .errors import LensvizError

__all__ = ["attention", "reversed_attention", "compare_maps", "head_norms", "logit_lens", "backward_lens",
           "target_rank_by_layer", "flow_graph", "patch_sweep", "composition", "token_label"]

RA_COLOURS = ("red", "white", "white", "blue")  # the paper's diverging map: negative red, positive blue
FF1_COLOURS = ("white", "#1f5fa8")  # Backward Lens FF1 table: white -> blue
FF2_COLOURS = ("white", "#6a2c91")  # Backward Lens FF2 table: white -> purple
RANK_COLOURS = ("#7cfc00", "#ffff66", "#d9d9d9", "#d9d9d9", "#e41a1c")  # VISIT: lime/yellow, grey, red


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _mpl():
    try:
        import matplotlib  # noqa: F401

        from .figure import InlineFigure  # a Figure that displays inline without %matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise LensvizError("lensviz.plot needs matplotlib: pip install 'lensviz[plot]' (or matplotlib>=3.7)") from e
    return InlineFigure


def _named(draw):
    """Put the model's name (Lens.name) small at the bottom right of a figure the function made itself."""
    import functools

    @functools.wraps(draw)
    def wrapper(trace, *args, **kwargs):
        fig = draw(trace, *args, **kwargs)
        name = getattr(getattr(trace, "lens", None), "name", None)
        if kwargs.get("ax") is None and name:
            fig.supxlabel(name, x=0.995, ha="right", fontsize=7, color="0.4", parse_math=False)
        return fig

    return wrapper


def token_label(token: str, width: int | None = None) -> str:
    """Token text as drawn: literal, with newline -> ↵, tab -> ⇥, \\r and other control characters as
    \\r / \\xNN, a token of spaces only as ␣ per space, the empty token as ∅. `width` clips long text
    with an ellipsis."""
    if token == "":
        return "∅"
    if token.strip(" ") == "":
        return "␣" * len(token)
    out = []
    for ch in token:
        if ch == "\n":
            out.append("↵")
        elif ch == "\t":
            out.append("⇥")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    text = "".join(out)
    if width is not None and len(text) > width:
        text = text[:max(1, width - 1)] + "…"
    return text


def _np(x):
    import numpy as np

    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=float)


def _figure(width: float, height: float, **kw):
    Figure = _mpl()
    return Figure(figsize=(max(2.5, width), max(2.0, height)), layout="constrained", **kw)


def _head(trace, layer, head) -> tuple[int, int]:
    return check_index(layer, trace.n_layers, "layer"), check_index(head, trace.dims.n_heads, "head")


def _token_ticks(ax, tokens, axis: str = "both", fontsize: float | None = None) -> None:
    labels = [token_label(t, 14) for t in tokens]
    fs = fontsize or (9 if len(tokens) <= 24 else 7)
    ticks = list(range(len(tokens)))
    if axis in ("x", "both"):
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, rotation=90, fontsize=fs, parse_math=False)
    if axis in ("y", "both"):
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=fs, parse_math=False)


def _text_colour(rgba) -> str:
    r, g, b = rgba[:3]
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"


def _cmap(name_or_colours, name: str = "lensviz"):
    import matplotlib
    from matplotlib.colors import LinearSegmentedColormap

    if isinstance(name_or_colours, str):
        return matplotlib.colormaps[name_or_colours].copy()
    return LinearSegmentedColormap.from_list(name, list(name_or_colours))


def _short(v: float) -> str:
    return "0" if v == 0 else f"{v:.2g}"


def _quoted(token: str) -> str:
    return "'" + token_label(token, 20) + "'"


# --------------------------------------------------------------------------------------------------
# attention maps
# --------------------------------------------------------------------------------------------------
def _draw_map(ax, m: torch.Tensor, tokens, kind: str, title: str):
    """One [T, T] map as in the paper: upper triangle masked, diagonal outlined, tokens on both axes."""
    import numpy as np
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    data = _np(m)
    t = data.shape[0]
    masked = np.ma.masked_array(data, mask=np.triu(np.ones((t, t), dtype=bool), k=1))
    if kind == "forward":
        cmap, norm = _cmap("Greens"), Normalize(0.0, 1.0)
    else:
        lo, hi = float(masked.min()), float(masked.max())
        bound = max(abs(lo), abs(hi)) or 1.0
        cmap, norm = _cmap(RA_COLOURS, "lensviz_ra"), Normalize(-bound, bound)
    cmap = cmap.with_extremes(bad="white")
    im = ax.imshow(masked, cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
    for i in range(t):
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=0.8))
    _token_ticks(ax, tokens)
    ax.set_xlabel("key (attended-to token)")
    ax.set_ylabel("query token")
    ax.set_title(title, fontsize=10)
    cbar = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02, shrink=0.9)
    if kind == "forward":
        cbar.set_label("A")
    else:
        ticks = sorted({0.8 * lo, 0.0, 0.85 * hi})
        cbar.set_ticks(ticks)
        cbar.set_ticklabels([_short(v) for v in ticks])
        cbar.set_label("RA = ∂L/∂(q·k)\nred: raising the score helps the target", fontsize=8)
    return im


def _map_figure(trace, ax, cells: float = 1.0):
    if ax is not None:
        return ax.figure, ax
    side = 1.6 + 0.28 * len(trace)
    fig = _figure(side * cells + 1.2, side)
    return fig, None


@_named
def attention(trace, layer: int, head: int, *, ax=None):
    """Forward attention A [T, T] of one head as a heatmap: 'Greens', vmin 0, vmax 1, upper triangle
    masked, diagonal cells outlined, tokens on both axes (queries down, keys across). Draws into `ax`
    when given. Returns the Figure."""
    layer, head = _head(trace, layer, head)
    fig, ax = _map_figure(trace, ax)
    ax = ax or fig.add_subplot()
    _draw_map(ax, trace.attention(layer)[head], trace.tokens, "forward", f"Attention A — layer {layer}, head {head}")
    return fig


@_named
def reversed_attention(trace, layer: int, head: int, *, ax=None):
    """Reversed Attention RA [T, T] of one head (∂L/∂ of the unscaled scores, L = NLL of the target):
    diverging red-white-blue centred on 0 (colour limits ±max|RA|), colorbar ticks at 0.8·min, 0 and
    0.85·max as in the paper, upper triangle masked, diagonal outlined. Returns the Figure."""
    layer, head = _head(trace, layer, head)
    fig, ax = _map_figure(trace, ax)
    ax = ax or fig.add_subplot()
    _draw_map(ax, trace.reversed_attention(layer)[head], trace.tokens, "reversed",
              f"Reversed attention RA — layer {layer}, head {head}")
    return fig


@_named
def compare_maps(trace, layer: int, head: int):
    """Forward map A (left) and Reversed Attention RA (right) of one head side by side (the paper's
    Fig. 1), with the target in the title. Returns the Figure (two map axes plus their colorbars)."""
    layer, head = _head(trace, layer, head)
    side = 1.6 + 0.28 * len(trace)
    fig = _figure(2 * side + 2.4, side + 0.4)
    left, right = fig.subplots(1, 2)
    attention(trace, layer, head, ax=left)
    reversed_attention(trace, layer, head, ax=right)
    fig.suptitle(f"Layer {layer}, head {head}: forward vs reversed attention (target {_quoted(trace.target)})",
                 fontsize=11, parse_math=False)
    return fig


@_named
def head_norms(trace, kind: str = "reversed", layers=None):
    """Per-head map norms as a [head × layer] grid: ‖RA‖_F with 'Purples' (kind "reversed") or ‖A‖_F with
    'Greens' (kind "forward"); the largest cell is outlined. Returns the Figure."""
    from matplotlib.patches import Rectangle

    from .lenses.reversed import head_norms as norms_of

    rows = check_layer_list(layers, trace.n_layers)
    norms = _np(norms_of(trace, kind, rows)).T  # [H, L]
    n_h, n_l = norms.shape
    fig = _figure(max(4.2, 1.8 + 0.32 * n_l), max(2.8, 1.4 + 0.3 * n_h))
    ax = fig.add_subplot()
    im = ax.imshow(norms, cmap=_cmap("Purples" if kind == "reversed" else "Greens"), vmin=0.0,
                   vmax=float(norms.max()) or 1.0, interpolation="nearest", aspect="auto")
    h, lay = divmod(int(norms.argmax()), n_l)
    ax.add_patch(Rectangle((lay - 0.5, h - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.2))
    step = max(1, math.ceil(n_l / 32))
    ax.set_xticks(range(0, n_l, step))
    ax.set_xticklabels([str(rows[i]) for i in range(0, n_l, step)], fontsize=8)
    hstep = max(1, math.ceil(n_h / 32))
    ax.set_yticks(range(0, n_h, hstep))
    ax.set_yticklabels([str(i) for i in range(0, n_h, hstep)], fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel("head")
    what = "‖RA‖_F" if kind == "reversed" else "‖A‖_F"
    name = "Reversed Attention" if kind == "reversed" else "forward attention"
    ax.set_title(f"{what} per head ({name})\nlargest: layer {rows[lay]}, head {h}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02).set_label(what)
    return fig


# --------------------------------------------------------------------------------------------------
# vocabulary views
# --------------------------------------------------------------------------------------------------
def _cell_table(ax, values, texts, cmap, norm, row_labels, tokens, fontsize: float):
    """A [rows, T] heatmap, row 0 at the bottom (last layer on top), one text per cell."""
    im = ax.imshow(values, cmap=cmap, norm=norm, origin="lower", interpolation="nearest", aspect="auto")
    n_r, n_t = values.shape
    for r in range(n_r):
        for c in range(n_t):
            colour = _text_colour(cmap(norm(values[r, c])))
            ax.text(c, r, texts[r][c], ha="center", va="center", fontsize=fontsize, color=colour, parse_math=False)
    _token_ticks(ax, tokens, "x")
    ax.set_yticks(range(n_r))
    ax.set_yticklabels([str(x) for x in row_labels], fontsize=8)
    ax.set_ylabel("layer")
    return im


@_named
def logit_lens(trace, site: str = "post", k: int = 1, colour: str = "prob", layers=None):
    """Logit lens heatmap: rows = layers (last layer on top), columns = prompt tokens; each cell holds
    the top-k tokens of proj(resid(layer, site)) at that position (one per line). colour="prob": the
    top-1 probability, 'Blues', 0..1; colour="rank": the rank of the trace's target (log scale, 1 = top,
    dark = near the top). Returns the Figure."""
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    if colour not in ("prob", "rank"):
        raise LensvizError(f"colour must be 'prob' or 'rank', got {colour!r}")
    check_int(k, "k (tokens written per cell)", 1, 5)
    rows = check_layer_list(layers, trace.n_layers)
    top = trace.logit_lens(k=k, site=site)
    toks = top.tokens
    texts = [["\n".join(token_label(s, 9) for s in toks[layer][t]) for t in range(len(trace))] for layer in rows]
    if colour == "prob":
        values = _np(top.probs[rows, :, 0])
        cmap, norm, what = _cmap("Blues"), Normalize(0.0, 1.0), "top-1 probability"
    else:
        values = _np(top.target_rank[rows]) + 1.0
        vocab = trace.lens.vocab_size
        cmap, norm, what = _cmap("Purples_r"), LogNorm(1.0, float(vocab)), f"rank of {_quoted(trace.target)} (1 = top)"
    n_t = len(trace)
    fig = _figure(2.0 + 0.85 * n_t, 1.6 + (0.2 + 0.17 * k) * len(rows))
    ax = fig.add_subplot()
    im = _cell_table(ax, np.asarray(values), texts, cmap, norm, rows, trace.tokens, 7 if k == 1 else 6)
    ax.set_title(f"Logit lens (resid {site}): top-{k} token{'s' if k > 1 else ''} per cell, colour = {what}",
                 fontsize=10, parse_math=False)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01).set_label(what, parse_math=False)
    return fig


@_named
def backward_lens(trace, layers=None, *, normalize: bool | None = None, sign: int = 1):
    """The Backward Lens tables (as drawn in the paper): "FF1 hidden states (x_i) projection" (white→blue) above
    "FF2 VJPs (δ_i) projection" (white→purple), each [layer × token] with the last layer on top. Cell
    text is "top-1 \\ bottom-1" token of the projection ("· 0 ·" where the vector is zero: a position
    with no path to the loss, e.g. every position but the last in the last layer); the colour is
    ‖δ_i^FF2‖ in both tables (as in the paper). Computed by
    `lensviz.lenses.backward.backward_lens(trace, k=1, ...)`. Returns the Figure."""
    import numpy as np
    from matplotlib.colors import Normalize

    from .lenses.backward import backward_lens as tables

    bl = tables(trace, k=1, layers=layers, normalize=normalize, sign=sign)
    dn = _np(bl.delta_norm)
    norm = Normalize(0.0, float(dn.max()) or 1.0)
    n_l, n_t = dn.shape
    fig = _figure(2.2 + 1.35 * n_t, 2 * (1.0 + 0.3 * n_l) + 0.6)
    axes = fig.subplots(2, 1)
    delta = "δ_i" if bl.sign == 1 else "−δ_i"
    for ax, grid, colours, title in ((axes[0], bl.ff1, FF1_COLOURS, "FF1 hidden states (x_i) projection"),
                                     (axes[1], bl.ff2, FF2_COLOURS, f"FF2 VJPs ({delta}) projection")):
        tt, bt = grid.top.tokens, grid.bottom.tokens
        gn = _np(grid.norm)
        texts = [[f"{token_label(tt[r][c][0], 10)} \\ {token_label(bt[r][c][0], 10)}" if gn[r, c] > 0 else "· 0 ·"
                  for c in range(n_t)] for r in range(n_l)]
        cmap = _cmap(colours, "lensviz_bl")
        im = _cell_table(ax, np.asarray(dn), texts, cmap, norm, bl.layers, bl.tokens, 6)
        ax.set_title(f"{title}: top-1 \\ bottom-1 token, colour = ‖δ_i‖", fontsize=10, parse_math=False)
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01).set_label("‖δ_i‖")
    fig.suptitle(f"Backward Lens — target {_quoted(bl.target)}" + (" (δ normalised)" if bl.normalize else ""),
                 fontsize=11, parse_math=False)
    return fig


@_named
def target_rank_by_layer(trace, layers=None, *, normalize: bool | None = None, sign: int = 1):
    """Rank of the trace's target in proj(δ_FF2) (sign=-1: in proj(−δ), the tokens a step writes)
    against layer, one line per prompt token (log y axis, rank 1 = most probable; the last token is
    drawn thick). Points where δ = 0 (no path to the loss) are left out. Returns the Figure."""
    from matplotlib.ticker import MaxNLocator

    from .lenses.backward import backward_lens as tables

    bl = tables(trace, k=1, layers=layers, normalize=normalize, sign=sign)
    ranks = _np(bl.ff2.target_rank) + 1.0  # [L, T]
    ranks[_np(bl.delta_norm) == 0] = float("nan")  # delta = 0 (no path to the loss): no ranking, no point
    n_l, n_t = ranks.shape
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    cmap = _cmap("viridis")
    for t in range(n_t):
        last = t == n_t - 1
        ax.plot(bl.layers, ranks[:, t], marker="o", markersize=3 if not last else 5, linewidth=2.6 if last else 1.0,
                color="black" if last else cmap(t / max(1, n_t - 1)), alpha=1.0 if last else 0.75,
                label=f"{t}: {token_label(bl.tokens[t], 12)}")
    ax.set_yscale("log")
    ax.set_ylim(0.8, bl.vocab_size * 1.3)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    delta = "δ_FF2" if bl.sign == 1 else "−δ_FF2"
    ax.set_ylabel(f"rank of target in proj({delta})  (1 = top)")
    ax.set_title(f"Rank of {_quoted(bl.target)} in proj({delta}) by layer, one line per token",
                 fontsize=10, parse_math=False)
    ax.grid(True, which="major", alpha=0.3)
    legend = ax.legend(fontsize=7, ncol=1 if n_t <= 14 else 2, loc="center left", bbox_to_anchor=(1.01, 0.5),
                       frameon=False)
    for text in legend.get_texts():
        text.set_parse_math(False)
    return fig


# --------------------------------------------------------------------------------------------------
# VISIT flow graph
# --------------------------------------------------------------------------------------------------
FLOW_STAGES = {"block_input": 0, "attn_input": 1, "qkv": 2, "head_query": 3, "memory_key": 4, "memory_value": 5,
               "head_output": 6, "concat": 7, "wo_neuron": 8, "attn_output": 9, "residual_after_attn": 10,
               "mlp_input": 11, "mlp_key": 12, "mlp_value": 13, "mlp_output": 14, "block_output": 15}
RESIDUAL_KINDS = ("block_input", "residual_after_attn", "block_output")
EDGE_COLOURS = {"ln": "#8e44ad", "residual": "#5d6d7e", "bias": "#e67e22", "skipped_layers": "#5d6d7e",
                "attention": "#27ae60", "sublayer": "#34495e"}
FLOW_DEFAULTS = {"n_heads": 4, "n_memory": 2, "n_wo_top": 4, "n_wo_bottom": 2, "n_mlp_top": 6, "n_mlp_bottom": 3}


def _flow_layout(nodes) -> dict:
    """Node id -> (x, y): y = layer * stages + stage (bottom to top); the residual stream on the left
    (x = 0), each stage's other nodes spread over x in (0.12, 1] in order of appearance."""
    rows: dict = {}
    pos = {}
    n_stages = max(FLOW_STAGES.values()) + 1
    for node in nodes:
        stage = FLOW_STAGES.get(node["kind"], 7)
        if node["kind"] == "bias":
            stage = {"o_proj": 9, "mlp_in": 12, "mlp_out": 13}.get(node.get("part"), 9)
        y = (node.get("layer") or 0) * n_stages + stage
        if node["kind"] in RESIDUAL_KINDS:
            pos[node["id"]] = (0.0, y)
        else:
            rows.setdefault(y, []).append(node["id"])
    for y, ids in rows.items():
        n = len(ids)
        for j, i in enumerate(ids):
            pos[i] = (0.56 if n == 1 else 0.14 + 0.86 * j / (n - 1), y)
    return pos


@_named
def flow_graph(trace, position: int = -1, layers=None, *, graph: dict | None = None, **visit_kw):
    """The VISIT flow graph (`lensviz.lenses.visit.visit_graph`) of one position drawn with matplotlib:
    one row per stage (residual stream on the left, layers bottom to top), each node labelled with the
    top-1 token of its vocabulary projection and coloured by the target's rank on a log scale
    (lime/yellow = near the top, grey = middle, red = the bottom of the vocabulary). Link widths follow
    the graph's weights; colours: blue/red = positive/negative activation, violet = LN links, green =
    attention. layers: None = the last two layers (all layers are unreadable on real models);
    visit_kw go to visit_graph (defaults FLOW_DEFAULTS: 4 heads, 2 memory entries, 4 + 2 W_O neurons,
    6 + 3 MLP neurons). `graph`: draw an already computed visit_graph result. Returns the Figure."""
    import numpy as np
    from matplotlib.collections import LineCollection
    from matplotlib.colors import LogNorm

    if graph is None:
        from .lenses.visit import visit_graph

        if layers is None:
            layers = list(range(max(0, trace.n_layers - 2), trace.n_layers))
        graph = visit_graph(trace, position=position, layers=layers, **{**FLOW_DEFAULTS, **visit_kw})
    nodes, edges = graph["nodes"], graph["edges"]
    pos = _flow_layout(nodes)
    ys = sorted({p[1] for p in pos.values()})
    fig = _figure(12.0, 1.2 + 0.45 * len(ys))
    ax = fig.add_subplot()
    drawn = [e for e in edges if e["kind"] != "layout" and e["source"] in pos and e["target"] in pos]
    w = np.array([abs(float(e["weight"])) for e in drawn]) if drawn else np.zeros(0)
    wmax = float(w.max()) if len(w) else 1.0
    segs, widths, colours = [], [], []
    for e, wi in zip(drawn, w):
        (x0, y0), (x1, y1) = pos[e["source"]], pos[e["target"]]
        segs.append([(x0, y0), (x1, y1)])
        widths.append(0.3 + 4.0 * math.sqrt(wi / (wmax or 1.0)))
        if e.get("sign") is not None:
            colours.append("#2e86de" if e["sign"] > 0 else "#e74c3c")
        else:
            colours.append(EDGE_COLOURS.get(e["kind"], "#95a5a6"))
    ax.add_collection(LineCollection(segs, linewidths=widths, colors=colours, alpha=0.45, zorder=1))
    vocab = trace.lens.vocab_size
    cmap, norm = _cmap(RANK_COLOURS, "lensviz_rank"), LogNorm(1.0, float(vocab))
    xy = np.array([pos[n["id"]] for n in nodes])
    rank = np.array([n.get("target_rank", vocab // 2) + 1.0 for n in nodes])
    marker_of = {True: "s", False: "o"}
    for is_res in (True, False):
        sel = [i for i, n in enumerate(nodes) if (n["kind"] in RESIDUAL_KINDS) == is_res]
        if sel:
            sc = ax.scatter(xy[sel, 0], xy[sel, 1], c=rank[sel], cmap=cmap, norm=norm, s=70 if is_res else 45,
                            marker=marker_of[is_res], edgecolors="black", linewidths=0.5, zorder=3)
    for n, (x, y) in zip(nodes, xy):
        ax.text(x, y + 0.28, token_label(n.get("label") or "", 10), ha="center", va="bottom", fontsize=6.5,
                zorder=4, parse_math=False)
    n_stages = max(FLOW_STAGES.values()) + 1
    stage_names = {v: k for k, v in FLOW_STAGES.items()}
    ax.set_yticks(ys)
    ax.set_yticklabels([f"L{int(y) // n_stages} {stage_names.get(int(y) % n_stages, '')}" for y in ys], fontsize=7)
    ax.set_xticks([])
    ax.set_xlim(-0.08, 1.06)
    ax.set_ylim(ys[0] - 0.8, ys[-1] + 1.0)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    tok = token_label(graph.get("token", ""), 16)
    ax.set_title(f"VISIT flow graph at position {graph['position']} ('{tok}'), layers "
                 f"{', '.join(str(x) for x in graph['layers'])}: node label = top-1 token, colour = rank of "
                 f"{_quoted(graph.get('target', trace.target))}", fontsize=10, parse_math=False)
    cbar = fig.colorbar(sc, ax=ax, fraction=0.025, pad=0.01)
    cbar.set_label("rank of the target in the node's projection (1 = top)")
    return fig


# --------------------------------------------------------------------------------------------------
# experiments and weights
# --------------------------------------------------------------------------------------------------
def patch_sweep(etas, values, *, ylabel: str = "value", labels=None, xlabel: str = "η", title: str | None = None,
                logy: bool = False, xscale: str = "linear", ax=None):
    """Curves of a quantity against the patch strength η (e.g. target NLL or rank for AttentionPatch
    with RA vs forward-attention maps). etas [N]; values [N] (one curve), [C, N] (C curves), or a dict
    {label: [N]}; labels name the curves. η = 0 is marked by a dotted line. xscale "symlog" spreads a
    sweep over several orders of magnitude (e.g. η from -100 to 3) while keeping 0. Returns the Figure."""
    import numpy as np

    x = _np(etas).reshape(-1)
    if isinstance(values, dict):
        labels = list(values) if labels is None else labels
        values = [values[key] for key in values]
    if isinstance(values, (list, tuple)) and values and not np.isscalar(values[0]) and not (
            isinstance(values[0], torch.Tensor) and values[0].dim() == 0):
        y = np.stack([_np(v).reshape(-1) for v in values])
    else:
        y = _np(values)
    y = y.reshape(1, -1) if y.ndim == 1 else y
    if y.ndim != 2 or y.shape[1] != x.shape[0]:
        raise LensvizError(f"values must have {x.shape[0]} entries per curve (one per eta), got shape {y.shape}")
    if labels is not None and len(labels) != y.shape[0]:
        raise LensvizError(f"got {len(labels)} labels for {y.shape[0]} curves")
    if ax is None:
        fig = _figure(6.0, 4.0)
        ax = fig.add_subplot()
    fig = ax.figure
    for i, row in enumerate(y):
        ax.plot(x, row, marker="o", markersize=3.5, label=None if labels is None else str(labels[i]))
    if x.min() < 0 < x.max():
        ax.axvline(0.0, color="grey", linestyle=":", linewidth=1)
    if logy:
        ax.set_yscale("log")
    if xscale == "symlog":
        ax.set_xscale("symlog", linthresh=1.0)
        ticks = sorted(set(x.tolist()))
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{v:g}" for v in ticks], fontsize=8)
    elif xscale != "linear":
        raise LensvizError(f"xscale must be 'linear' or 'symlog', got {xscale!r}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"{ylabel} against {xlabel}", fontsize=10)
    ax.grid(True, alpha=0.3)
    if labels is not None:
        ax.legend(fontsize=8)
    return fig


def composition(scores, *, mode: str | None = None, title: str | None = None):
    """Head-to-head composition scores [L, H, L, H] (`lensviz.lenses.composition.composition_scores`) as
    an [(L·H) × (L·H)] heatmap: rows = sender head (l1, h1) writing through W_OV, columns = receiver head
    (l2, h2); NaN (l2 <= l1) left blank; colour 0..max score ('Oranges'); thin lines separate layers.
    Returns the Figure."""
    import numpy as np

    s = _np(scores)
    if s.ndim != 4 or s.shape[0] != s.shape[2] or s.shape[1] != s.shape[3]:
        raise LensvizError(f"scores must be [L, H, L, H], got shape {tuple(s.shape)}")
    n_l, n_h = s.shape[:2]
    flat = s.reshape(n_l * n_h, n_l * n_h)
    masked = np.ma.masked_invalid(flat)
    vmax = float(masked.max()) if masked.count() else 1.0
    cmap = _cmap("Oranges").with_extremes(bad="white")
    side = min(10.0, 2.5 + 0.12 * n_l * n_h)
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    im = ax.imshow(masked, cmap=cmap, vmin=0.0, vmax=vmax or 1.0, interpolation="nearest", aspect="equal")
    for b in range(1, n_l):
        ax.axhline(b * n_h - 0.5, color="#bbbbbb", linewidth=0.4)
        ax.axvline(b * n_h - 0.5, color="#bbbbbb", linewidth=0.4)
    step = max(1, math.ceil(n_l / 24))
    centres = [layer * n_h + (n_h - 1) / 2 for layer in range(0, n_l, step)]
    names = [f"L{layer}" for layer in range(0, n_l, step)]
    ax.set_xticks(centres)
    ax.set_xticklabels(names, fontsize=7, rotation=90)
    ax.set_yticks(centres)
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlabel("receiver head (layer, head)")
    ax.set_ylabel("sender head (layer, head)")
    what = f"{mode.upper()}-composition" if mode else "Composition"
    ax.set_title(title or f"{what} scores: sender W_OV → receiver ({n_l} layers × {n_h} heads)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).set_label("composition score")
    return fig
