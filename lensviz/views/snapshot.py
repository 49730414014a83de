"""A static HTML snapshot of an Explorer for front ends that cannot run widget JavaScript (nbconvert
HTML, GitHub's notebook view, documentation builds, ``text/html``-only renderers). It rides in the
Explorer's display bundle beside the widget view.

What it shows: the header (model, prompt, target probability and rank, the patched diff), the token
strip, the logit-lens grid (top-1 token per layer and position, shaded by probability in 8 steps) and
the selected attention map as an inline PNG. With a prompt pair (``corrupt=``) also both prompts with
the differing tokens outlined, the metric of the clean, corrupt and shown runs with "% of the way", and
the pair's attribution heatmap (residual "post", layers x positions, a diverging PNG with its scale). No script at all; every piece of token text goes
through :func:`html.escape`. Styles are scoped under ``.lv-snapshot`` and follow dark themes
(JupyterLab, VS Code, marimo) through CSS alone. A 64-token prompt on a 30-layer model stays well
under 200 kB.
"""
from __future__ import annotations

import base64
import html
import struct
import zlib

import numpy as np

from . import payload

STEPS = 8          # probability shades in the grid
CLIP = 7           # characters of a token shown in a grid cell
MAP_SIDE = 320     # the attention image: at most this many cells a side (longer prompts: block maxima)


def _shades(low, high):
    return [tuple(round(a + (b - a) * i / (STEPS - 1)) for a, b in zip(low, high)) for i in range(STEPS)]


def _luminance(rgb) -> float:
    c = [v / 255 for v in rgb]
    c = [v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4 for v in c]
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]


def _ink(rgb) -> str:
    """Near-black or white, whichever contrasts more with the cell colour (WCAG)."""
    lum = _luminance(rgb)
    return "#111" if (lum + 0.05) / (0.0056 + 0.05) >= 1.05 / (lum + 0.05) else "#fff"


LIGHT = _shades((247, 252, 245), (0, 90, 50))     # the widget's greens (util.js), light form
DARK = _shades((28, 38, 32), (161, 217, 155))     # and dark form
DARK_SELECTORS = ('body[data-jp-theme-light="false"] .lv-snapshot', "body.vscode-dark .lv-snapshot",
                  "body.vscode-high-contrast .lv-snapshot", ".dark .lv-snapshot", "[data-theme='dark'] .lv-snapshot")


def _css() -> str:
    s = ".lv-snapshot"
    rules = [
        f"{s}{{--s-fg:#1a1a1a;--s-bg:#fff;--s-muted:#5c5c5c;--s-line:#d0d0d0;--s-accent:#c2007f;--s-accent-ink:#fff;"
        "--s-good:#1a7f37;--s-bad:#b00020;"
        "all:initial;display:block;box-sizing:border-box;font:12px/1.4 system-ui,-apple-system,'Segoe UI',Roboto,"
        "'DejaVu Sans',sans-serif;color:var(--s-fg);background:var(--s-bg);border:1px solid var(--s-line);"
        "border-radius:6px;padding:8px;max-width:100%;overflow:auto}",
        f"{s} *{{box-sizing:border-box}}",
        f"{s} .s-head{{margin:0 0 4px}} {s} .s-muted{{color:var(--s-muted)}}",
        f"{s} .s-prompt{{font-family:ui-monospace,Menlo,Consolas,'DejaVu Sans Mono',monospace;white-space:pre-wrap;margin:2px 0}}",
        f"{s} .s-up{{color:var(--s-good)}} {s} .s-down{{color:var(--s-bad)}}",
        f"{s} .s-strip{{display:flex;flex-wrap:wrap;gap:2px;margin:6px 0}}",
        f"{s} .s-tok{{font:12px ui-monospace,Menlo,Consolas,'DejaVu Sans Mono',monospace;white-space:pre;"
        "border:1px solid var(--s-line);border-radius:3px;padding:0 4px}",
        f"{s} .s-tok.s-sel{{background:var(--s-accent);color:var(--s-accent-ink);border-color:var(--s-accent)}}",
        f"{s} .s-row{{display:flex;gap:12px;flex-wrap:wrap;align-items:flex-start}}",
        f"{s} table.s-grid{{margin:0;table-layout:auto;border:none;border-collapse:collapse;font:11px/1.4 ui-monospace,Menlo,Consolas,'DejaVu Sans Mono',monospace}}",
        f"{s} table.s-grid th{{background:var(--s-bg);font-weight:normal;color:var(--s-muted);padding:0 2px;white-space:pre;text-align:left}}",
        f"{s} table.s-grid td{{text-align:left;border:1px solid var(--s-bg);padding:0 3px;white-space:pre}}",
        f"{s} table.s-grid .s-gap{{color:var(--s-muted);text-align:center}}",
        f"{s} .s-map{{image-rendering:pixelated;border:1px solid var(--s-line)}}",
        f"{s} figure{{margin:0;min-width:0}} {s} figcaption{{color:var(--s-muted)}}",
        f"{s} .s-gridfig{{flex:1 1 420px}} {s} .s-gridwrap{{overflow:auto;max-width:100%;max-height:480px}}",
        f"{s} .s-pair{{margin:6px 0;display:grid;grid-template-columns:auto 1fr;gap:2px 8px;align-items:baseline}}",
        f"{s} .s-tok.s-diff{{outline:2px solid var(--s-accent);outline-offset:-1px}}",
        f"{s} .s-tok.s-app{{border-style:dashed}}",
    ]
    rules += [f"{s} .p{i}{{background:rgb{c};color:{_ink(c)}}}" for i, c in enumerate(LIGHT)]
    dark_vars = ("--s-fg:#e8e8e8;--s-bg:#1e1e1e;--s-muted:#a8a8a8;--s-line:#4a4a4a;--s-accent:#ff7ac6;"
                 "--s-accent-ink:#1a1a1a;--s-good:#56d364;--s-bad:#ff8a80")
    rules.append(",".join(DARK_SELECTORS) + "{" + dark_vars + "}")
    for i, c in enumerate(DARK):
        rules.append(",".join(f"{d} .p{i}" for d in DARK_SELECTORS) + f"{{background:rgb{c};color:{_ink(c)}}}")
    return "\n".join(rules)


def _show(tok: str) -> str:
    """The visible form of a token, as in util.js: spaces, newlines and control characters shown."""
    out = tok.replace("\n", "↵").replace("\t", "⇥").replace(" ", "·")
    return "".join(f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c for c in out)


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def percent(p: float) -> str:
    return (f"{100 * p:.1f}" if p >= 0.1 else f"{100 * p:.2g}") + " %"


def png_rgb(pixels: np.ndarray) -> bytes:
    """A PNG file of an [H, W, 3] uint8 image (filter 0 on each row, zlib level 9)."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[i].astype(np.uint8).tobytes() for i in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def pooled_map(values: np.ndarray, side: int = None) -> tuple[np.ndarray, int]:
    """An [n, n] map as at most `side` (default MAP_SIDE) cells a side: (block maxima [m, m], block size b),
    blocks of b x b entries, b = ceil(n / side); b = 1 leaves the map as it is. Maxima keep a sharp peak
    visible in a long prompt's map."""
    side = MAP_SIDE if side is None else side
    n = values.shape[0]
    b = max(1, -(-n // side))
    if b == 1:
        return values, 1
    m = -(-n // b)
    pad = np.zeros((m * b, m * b), dtype=values.dtype)
    pad[:n, :n] = values
    return pad.reshape(m, b, m, b).max(axis=(1, 3)), b


def _map_png(values01: np.ndarray) -> bytes:
    """A causal map (0..1, [m, m] cells, possibly pooled) in the widget's greens; cells wholly above the
    diagonal (j > i, or blocks J > I) grey."""
    lo, hi = np.array(LIGHT[0], float), np.array(LIGHT[-1], float)
    t = np.clip(values01, 0, 1)[..., None]
    img = np.rint(lo + (hi - lo) * t).astype(np.uint8)
    n = values01.shape[0]
    img[np.triu(np.ones((n, n), bool), 1)] = (217, 217, 217)
    return png_rgb(img)


NEG, POS, MID = (202, 0, 32), (5, 48, 97), (255, 255, 255)   # util.js's diverging scale (light form)


def diverging_png(values: np.ndarray) -> bytes:
    """An [H, W] map of values in [-1, 1] as a PNG: red below 0, white at 0, blue above (util.js
    `diverging`); NaN grey."""
    v = np.nan_to_num(np.clip(values, -1, 1), nan=0.0)[..., None]
    mid, neg, pos = (np.array(c, float) for c in (MID, NEG, POS))
    img = np.where(v < 0, mid + (neg - mid) * -v, mid + (pos - mid) * v)
    img = np.rint(img).astype(np.uint8)
    img[np.isnan(values)] = (217, 217, 217)
    return png_rgb(img)


def _strip(tokens, marks) -> str:
    return '<span class="s-strip">' + "".join(
        f'<span class="s-tok{marks.get(i, "")}">{_e(_show(t))}</span>' for i, t in enumerate(tokens)) + "</span>"


def _pair_html(ex, selected: int) -> str:
    """Both prompts of a pair (differing tokens outlined, appended target positions dashed, the selected
    position of the corrupt run, the one shown, filled), the metrics
    and the pair's attribution heatmap at the residual "post" site (already computed with the pair)."""
    st = ex.pair
    if "clean_prompt" not in st:
        return ""
    diff, appended = set(st["differ"]), set(st.get("appended") or ())
    marks = {i: " s-diff" if i in diff else " s-app" if i in appended else "" for i in range(len(st["clean_tokens"]))}
    kind = "logit difference" if st["kind"] == "logit_diff" else "log p(target)"
    clean, corrupt, shown = st["metric_clean"], st["metric_corrupt"], st["metric"]
    way = "" if abs(clean - corrupt) < 1e-12 else f" ({int(round(100 * (shown - corrupt) / (clean - corrupt)))} % of the way)"
    out = [f'<div class="s-pair"><span class="s-muted">clean</span>{_strip(st["clean_tokens"], marks)}'
           f'<span class="s-muted">corrupt</span>{_strip(ex.tokens, {**marks, selected: marks[selected] + " s-sel"})}</div>',
           f'<div class="s-line">{kind}: clean {clean:.3f} · corrupt {corrupt:.3f} · shown {shown:.3f}{_e(way)}</div>']
    meta, (buf,) = payload.sweep_effect(ex.sweep("post", "attribution"))
    n_layers, t = meta["shape"]
    effect = np.frombuffer(buf, dtype="<f4").reshape(n_layers, t)[::-1].astype(float)   # last layer on top
    top = meta["max"] or 1.0
    png = base64.b64encode(diverging_png(effect / top)).decode()
    px, py = max(3, min(32, 480 // max(t, 1))), max(3, min(8, 240 // max(n_layers, 1)))
    out.append(f'<figure><img class="s-map" alt="patching attribution, {n_layers} layers by {t} positions" '
               f'width="{t * px}" height="{n_layers * py}" src="data:image/png;base64,{png}">'
               f"<figcaption>Patching (attribution, residual post): layers L{n_layers - 1} (top) to L0 by position; "
               f"blue: patching the cell raises the metric, red: lowers it; max |effect| {top:.3g}</figcaption></figure>")
    return "".join(out)


def snapshot_html(ex) -> str:
    """The static snapshot of Explorer ``ex`` as one HTML fragment (no script; text escaped)."""
    tr, lens = ex.trace, ex.lens
    toks = list(tr.tokens)
    sel = ex.selection or {}
    pos = sel.get("position", len(toks) - 1)
    layer, head = sel.get("layer", lens.n_layers - 1), sel.get("head", 0)
    s, b, d = ex.summary, ex.base_summary, ex.diff or {}
    parts = [f'<div class="lv-snapshot" data-lv-snapshot="1" role="figure" aria-label="lensviz Explorer (static snapshot)">'
             f"<style>{_css()}</style>"]
    parts.append(f'<div class="s-head"><b>lensviz Explorer</b> <span class="s-muted">· {_e(ex.model_name)} · '
                 f"{len(toks)} tokens · static snapshot: run the notebook for the interactive view</span></div>")
    parts.append(f'<div class="s-prompt">{_e(ex.prompt)}</div>')
    line = (f'p(<b>{_e(_show(s["target"]))}</b>) = <span class="s-prob">{percent(b["target_prob"])}</span> '
            f'rank {b["target_rank"] + 1}')
    if d.get("prob_after") is not None:
        up = d["prob_after"] >= d["prob_before"]
        line += (f' <span class="{"s-up" if up else "s-down"}">{"▲" if up else "▼"} patched: '
                 f'{percent(d["prob_after"])} rank {d["rank_after"] + 1} · KL {d["kl"]:.3f}</span>'
                 f' <code>{_e(ex.code)}</code>')
    line += " · next: " + ", ".join(f"{_e(_show(t['token']))} {percent(t['prob'])}" for t in s["top"][:3])
    parts.append(f'<div class="s-line">{line}</div>')
    pair = _pair_html(ex, pos)
    parts.append(pair or _strip(toks, {pos: " s-sel"}))     # a pair's corrupt row is the token strip

    # logit-lens grid: rows from the last layer down, 8 probability shades; the columns the Explorer's
    # state holds (a long prompt's: its first windows, with a gap cell between runs; see explorer.py)
    meta = ex.grid_meta
    n_layers, t = meta["shape"]
    runs = meta["columns"]
    cols = [j for a, b in runs for j in range(a, b)]
    ids = np.frombuffer(ex.grid_ids, dtype="<i4").reshape(n_layers, len(cols))
    shade = np.minimum(np.frombuffer(ex.grid_probs, dtype=np.uint8).reshape(n_layers, len(cols)).astype(int)
                       * STEPS // 256, STEPS - 1)
    cells = {k: _e(_clip(_show(v), CLIP)) for k, v in meta["strings"].items()}
    starts = {sum(b - a for a, b in runs[:i]) for i in range(1, len(runs))}    # a gap before these columns

    def row(head, cell, tag="td"):
        gap = f'<{tag} class="s-gap">…</{tag}>'
        return head + "".join((gap if i in starts else "") + cell(i, j) for i, j in enumerate(cols)) + "</tr>"

    rows = [row("<tr><th></th>", lambda i, j: f"<th>{_e(_clip(_show(toks[j]), 6))}</th>", "th")]
    for li in range(n_layers - 1, -1, -1):
        rows.append(row(f"<tr><th>L{li}</th>", lambda i, j: f'<td class="p{shade[li, i]}">{cells[str(ids[li, i])]}</td>'))
    shown = "" if len(cols) == t else (" (positions " + ", ".join(f"{a}–{b - 1}" for a, b in runs) +
                                       f" of {t}: the interactive view computes the rest as it scrolls)")
    grid = (f'<figure class="s-gridfig"><figcaption>Logit lens ({_e(meta["site"])}): top-1 token per layer and position, '
            f'shaded by its probability{shown}</figcaption><div class="s-gridwrap"><table class="s-grid">{"".join(rows)}</table>'
            "</div></figure>")

    amap, (abuf,) = payload.attention_map(tr, layer, head, "forward")
    n = amap["n"]
    vals, block = pooled_map(np.frombuffer(abuf, dtype=np.uint8).reshape(n, n) / 255)
    m = vals.shape[0]
    png = base64.b64encode(_map_png(vals)).decode()
    px = max(1, min(8, MAP_SIDE // max(m, 1)))
    pooled = f", each pixel the maximum of {block} x {block} entries" if block > 1 else ""
    fig = (f'<figure><img class="s-map" alt="attention map of layer {layer} head {head}, {n} by {n}" '
           f'width="{m * px}" height="{m * px}" src="data:image/png;base64,{png}">'
           f"<figcaption>Attention L{layer}H{head} (rows are queries{pooled})</figcaption></figure>")
    parts.append(f'<div class="s-row">{grid}{fig}</div></div>')
    return "".join(parts)
