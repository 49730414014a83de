"""lv.plot: every figure saves to PNG and SVG and shows what it claims (titles, token tick labels, colour
limits, masked upper triangles, cell texts), on tiny gpt2 and llama models (flow graph: also gpt_neox)."""
from __future__ import annotations

import math
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

import lensviz as lv  # noqa: E402
from lensviz import plot  # noqa: E402
from lensviz.lenses.backward import backward_lens  # noqa: E402
from lensviz.lenses.reversed import head_norms  # noqa: E402
from tests import models  # noqa: E402

PROMPT = "I like Italy and France. I visited the city of"
FAMILIES = ("gpt2", "llama")


@pytest.fixture(scope="module", params=FAMILIES)
def trace(request):
    lens = lv.Lens(models.build(request.param), models.tokenizer())
    return lens.trace(PROMPT, target=" Florence")


def saved(fig, tmp_path, name: str) -> None:
    """PNG (magic bytes) and SVG (well-formed XML) files, both non-empty; the figure is not in pyplot."""
    png, svg = tmp_path / f"{name}.png", tmp_path / f"{name}.svg"
    fig.savefig(png, dpi=40)
    fig.savefig(svg)
    assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert svg.stat().st_size > 0 and ET.parse(svg).getroot().tag.endswith("svg")
    assert fig.canvas.manager is None  # built with the object API, no pyplot figure manager


def labels(ticklabels) -> list[str]:
    return [t.get_text() for t in ticklabels]


def token_labels(tr) -> list[str]:
    return [plot.token_label(t, 14) for t in tr.tokens]


def colorbar_of(fig, ax):
    return next(a for a in fig.axes if a is not ax and a.get_label() == "<colorbar>" and
                a.get_position().x0 > ax.get_position().x0)


# attention maps ---------------------------------------------------------------------------------------
def test_attention_heatmap(trace, tmp_path):
    fig = plot.attention(trace, 1, 2)
    saved(fig, tmp_path, "attention")
    ax = fig.axes[0]
    t = len(trace)
    assert ax.get_title() == "Attention A — layer 1, head 2"
    assert labels(ax.get_xticklabels()) == labels(ax.get_yticklabels()) == token_labels(trace)
    im = ax.images[0]
    assert im.get_clim() == (0.0, 1.0) and im.get_cmap().name.startswith("Greens")
    data = im.get_array()
    assert isinstance(data, np.ma.MaskedArray)
    assert (np.ma.getmaskarray(data) == np.triu(np.ones((t, t), bool), k=1)).all()
    a = trace.attention(1)[2].numpy()
    assert np.allclose(data.filled(0.0), np.tril(a))
    diag = [p for p in ax.patches if p.get_width() == 1 and not p.get_fill()]
    assert sorted((p.get_x() + 0.5, p.get_y() + 0.5) for p in diag) == [(i, i) for i in range(t)]


def test_reversed_attention_heatmap(trace, tmp_path):
    fig = plot.reversed_attention(trace, -1, 0)
    saved(fig, tmp_path, "reversed")
    ax = fig.axes[0]
    t = len(trace)
    last = trace.n_layers - 1
    assert ax.get_title() == f"Reversed attention RA — layer {last}, head 0"
    assert labels(ax.get_xticklabels()) == token_labels(trace)
    im = ax.images[0]
    ra = torch.tril(trace.reversed_attention(last)[0]).numpy()
    lo, hi = im.get_clim()
    assert lo == -hi and hi == pytest.approx(np.abs(ra).max())
    assert (np.ma.getmaskarray(im.get_array()) == np.triu(np.ones((t, t), bool), k=1)).all()
    assert np.allclose(im.get_array().filled(0.0), ra)
    assert im.get_cmap()(0.0)[:3] == (1.0, 0.0, 0.0) and im.get_cmap()(1.0)[:3] == (0.0, 0.0, 1.0)
    assert im.get_cmap()(0.5)[:3] == (1.0, 1.0, 1.0)  # white at 0
    cbar = colorbar_of(fig, ax)
    assert np.allclose(sorted(cbar.get_yticks()), sorted({0.8 * ra.min(), 0.0, 0.85 * ra.max()}))


def test_compare_maps(trace, tmp_path):
    fig = plot.compare_maps(trace, 0, 1)
    saved(fig, tmp_path, "compare")
    maps = [a for a in fig.axes if a.images and a.get_label() != "<colorbar>"]
    assert [a.get_title() for a in maps] == ["Attention A — layer 0, head 1",
                                             "Reversed attention RA — layer 0, head 1"]
    assert maps[0].images[0].get_clim() == (0.0, 1.0)
    lo, hi = maps[1].images[0].get_clim()
    assert lo == -hi
    assert "forward vs reversed" in fig.get_suptitle() and plot.token_label(trace.target) in fig.get_suptitle()
    for a in maps:
        assert labels(a.get_yticklabels()) == token_labels(trace)


def test_head_norms_grid(trace, tmp_path):
    for kind, cmap in (("reversed", "Purples"), ("forward", "Greens")):
        fig = plot.head_norms(trace, kind)
        saved(fig, tmp_path, f"norms_{kind}")
        ax = fig.axes[0]
        im = ax.images[0]
        assert im.get_cmap().name.startswith(cmap)
        expected = head_norms(trace, kind).numpy().T  # [H, L]
        assert np.allclose(im.get_array(), expected)
        assert labels(ax.get_xticklabels()) == [str(i) for i in range(trace.n_layers)]
        assert ax.get_xlabel() == "layer" and ax.get_ylabel() == "head"
        assert ("‖RA‖_F" if kind == "reversed" else "‖A‖_F") in ax.get_title()
        assert im.get_clim() == (0.0, pytest.approx(expected.max()))


# vocabulary views -------------------------------------------------------------------------------------
def test_logit_lens_heatmap(trace, tmp_path):
    fig = plot.logit_lens(trace)
    saved(fig, tmp_path, "logit_lens")
    ax = fig.axes[0]
    top = trace.logit_lens(k=1)
    n_l, t = trace.n_layers, len(trace)
    assert ax.get_title().startswith("Logit lens (resid post)")
    assert labels(ax.get_xticklabels()) == token_labels(trace)
    assert labels(ax.get_yticklabels()) == [str(i) for i in range(n_l)]
    lo, hi = ax.get_ylim()
    assert lo < hi  # origin lower: the last layer is drawn on top
    im = ax.images[0]
    assert im.get_clim() == (0.0, 1.0)
    assert np.allclose(im.get_array(), top.probs[..., 0].numpy())
    texts = {(round(x.get_position()[1]), round(x.get_position()[0])): x for x in ax.texts}
    assert len(ax.texts) == n_l * t
    for layer in range(n_l):
        for pos in range(t):
            text = texts[(layer, pos)]
            assert text.get_text() == plot.token_label(top.tokens[layer][pos][0], 9)
            assert not text.get_parse_math()


def test_logit_lens_rank_colour(trace, tmp_path):
    from matplotlib.colors import LogNorm

    fig = plot.logit_lens(trace, site="mid", k=2, colour="rank")
    saved(fig, tmp_path, "logit_lens_rank")
    ax = fig.axes[0]
    im = ax.images[0]
    top = trace.logit_lens(k=2, site="mid")
    assert isinstance(im.norm, LogNorm) and im.get_clim() == (1.0, trace.lens.vocab_size)
    assert np.allclose(im.get_array(), top.target_rank.numpy() + 1)
    assert "resid mid" in ax.get_title() and "rank of" in ax.get_title()
    assert all(len(x.get_text().split("\n")) == 2 for x in ax.texts)
    with pytest.raises(lv.LensvizError):
        plot.logit_lens(trace, colour="entropy")


def test_backward_lens_tables(trace, tmp_path):
    fig = plot.backward_lens(trace)
    saved(fig, tmp_path, "backward_lens")
    bl = backward_lens(trace, k=1)
    tables = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    assert [a.get_title().split(":")[0] for a in tables] == ["FF1 hidden states (x_i) projection",
                                                             "FF2 VJPs (δ_i) projection"]
    n_l, t = trace.n_layers, len(trace)
    white_to = []
    for ax, grid in zip(tables, (bl.ff1, bl.ff2)):
        assert labels(ax.get_xticklabels()) == token_labels(trace)
        im = ax.images[0]
        assert np.allclose(im.get_array(), bl.delta_norm.numpy())  # colour = |delta_FF2| in both tables
        assert im.get_clim() == (0.0, pytest.approx(bl.delta_norm.max().item()))
        white_to.append(im.get_cmap()(1.0)[:3])
        assert im.get_cmap()(0.0)[:3] == (1.0, 1.0, 1.0)
        assert len(ax.texts) == n_l * t
        texts = {(round(x.get_position()[1]), round(x.get_position()[0])): x.get_text() for x in ax.texts}
        top, bottom = grid.top.tokens, grid.bottom.tokens
        for layer in range(n_l):
            for pos in range(t):
                if grid.norm[layer, pos] > 0:
                    assert texts[(layer, pos)] == (f"{plot.token_label(top[layer][pos][0], 8)} \\ "
                                                   f"{plot.token_label(bottom[layer][pos][0], 8)}")
                else:
                    assert texts[(layer, pos)] == "· 0 ·"
    blue, purple = white_to
    assert blue[2] > blue[0] and purple[0] > purple[1] and purple[2] > purple[1]
    # the last layer's delta is zero except at the positions the loss reads (no other path to the loss)
    explained = set(trace.explained_positions)
    assert explained and [texts[(n_l - 1, p)] == "· 0 ·" for p in range(t)] == [p not in explained for p in range(t)]


def test_target_rank_by_layer(trace, tmp_path):
    fig = plot.target_rank_by_layer(trace)
    saved(fig, tmp_path, "target_rank")
    ax = fig.axes[0]
    bl = backward_lens(trace, k=1)
    ranks = bl.ff2.target_rank.double().numpy() + 1
    ranks[bl.delta_norm.numpy() == 0] = np.nan
    assert len(ax.lines) == len(trace)
    for pos, line in enumerate(ax.lines):
        assert list(line.get_xdata()) == list(range(trace.n_layers))
        assert np.allclose(line.get_ydata(), ranks[:, pos], equal_nan=True)
    assert [x.get_text() for x in ax.get_legend().get_texts()] == [
        f"{i}: {plot.token_label(tok, 12)}" for i, tok in enumerate(trace.tokens)]
    assert ax.get_yscale() == "log" and "proj(δ_FF2)" in ax.get_title()


# flow graph -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_flow_graph(family, tmp_path):
    from lensviz.lenses.visit import visit_graph

    lens = lv.Lens(models.build(family), models.tokenizer())
    tr = lens.trace(PROMPT, target=" Florence")
    fig = plot.flow_graph(tr, layers=[1, 2])
    saved(fig, tmp_path, f"flow_{family}")
    ax = fig.axes[0]
    g = visit_graph(tr, layers=[1, 2], **plot.FLOW_DEFAULTS)
    points = sum(len(c.get_offsets()) for c in ax.collections[1:])  # [0] holds the links, then the node markers
    assert points == len(g["nodes"])
    assert sorted(x.get_text() for x in ax.texts) == sorted(plot.token_label(n["label"], 10) for n in g["nodes"])
    drawn = [e for e in g["edges"] if e["kind"] != "layout"]
    assert len(ax.collections[0].get_segments()) == len(drawn)
    assert f"position {len(tr) - 1}" in ax.get_title() and "layers 1, 2" in ax.get_title()
    ticks = labels(ax.get_yticklabels())
    assert "L1 block_input" in ticks and "L2 block_output" in ticks
    assert ("L2 residual_after_attn" in ticks) == (family != "gpt_neox")  # parallel block: no mid residual


def test_flow_graph_on_moe(tmp_path):
    """Mixture of experts (tiny float64 Mixtral): the MLP nodes are the routed experts' neurons, all drawn."""
    from lensviz.lenses.visit import visit_graph
    from tests.test_conformance import build

    lens = lv.Lens(build("mixtral"), models.tokenizer())
    tr = lens.trace(PROMPT, target=" Florence")
    fig = plot.flow_graph(tr, layers=[1, 2])
    saved(fig, tmp_path, "flow_mixtral")
    ax = fig.axes[0]
    g = visit_graph(tr, layers=[1, 2], **plot.FLOW_DEFAULTS)
    for layer in (1, 2):
        mlp = [n for n in g["nodes"] if n["kind"] == "mlp_value" and n["layer"] == layer]
        assert len(mlp) == 9 and {n["expert"] for n in mlp} <= set(tr.router(layer)[0][-1].tolist())
    points = sum(len(c.get_offsets()) for c in ax.collections[1:])
    assert points == len(g["nodes"])
    assert sorted(x.get_text() for x in ax.texts) == sorted(plot.token_label(n["label"], 10) for n in g["nodes"])
    assert len(ax.collections[0].get_segments()) == len([e for e in g["edges"] if e["kind"] != "layout"])


# experiments and weights ------------------------------------------------------------------------------
def test_patch_sweep(tmp_path):
    etas = [-2.0, -1.0, 0.0, 1.0, 2.0]
    fig = plot.patch_sweep(etas, {"RA patch": [3.0, 2.0, 1.5, 1.2, 1.1], "forward patch": torch.ones(5)},
                           ylabel="target NLL")
    saved(fig, tmp_path, "sweep")
    ax = fig.axes[0]
    curves = [line for line in ax.lines if len(line.get_xdata()) == 5]
    assert len(curves) == 2 and list(curves[0].get_xdata()) == etas
    assert list(curves[1].get_ydata()) == [1.0] * 5
    assert [x.get_text() for x in ax.get_legend().get_texts()] == ["RA patch", "forward patch"]
    assert ax.get_xlabel() == "η" and ax.get_ylabel() == "target NLL"
    assert ax.get_title() == "target NLL against η"
    assert any(list(line.get_xdata()) == [0, 0] for line in ax.lines)  # eta = 0 marked
    one = plot.patch_sweep(np.arange(3), [5, 4, 3], ylabel="target rank", title="rank")
    assert one.axes[0].get_title() == "rank" and one.axes[0].get_legend() is None
    wide = plot.patch_sweep([-40, -1, 0, 1], [4, 3, 2, 1], xscale="symlog")
    assert wide.axes[0].get_xscale() == "symlog"
    assert labels(wide.axes[0].get_xticklabels()) == ["-40", "-1", "0", "1"]
    with pytest.raises(lv.LensvizError):
        plot.patch_sweep([0, 1], [1, 2, 3])


def test_composition_heatmap(tmp_path):
    from lensviz.lenses.composition import composition_scores

    lens = lv.Lens(models.build("llama"), models.tokenizer())
    scores = composition_scores(lens, "q")
    fig = plot.composition(scores, mode="q")
    saved(fig, tmp_path, "composition")
    ax = fig.axes[0]
    n = lens.n_layers * lens.n_heads
    im = ax.images[0]
    data = im.get_array()
    assert data.shape == (n, n)
    flat = scores.reshape(n, n).numpy()
    assert (np.ma.getmaskarray(data) == np.isnan(flat)).all()
    assert im.get_clim() == (0.0, pytest.approx(np.nanmax(flat)))
    assert labels(ax.get_xticklabels()) == [f"L{i}" for i in range(lens.n_layers)]
    assert ax.get_title() == (f"Q-composition scores: sender W_OV → receiver ({lens.n_layers} layers × "
                              f"{lens.n_heads} heads)")
    assert ax.get_ylabel() == "sender head (layer, head)" and ax.get_xlabel() == "receiver head (layer, head)"
    with pytest.raises(lv.LensvizError):
        plot.composition(torch.zeros(3, 4))


# token text -------------------------------------------------------------------------------------------
def test_token_text_is_literal(tmp_path):
    assert plot.token_label(" cost") == " cost"
    assert plot.token_label("a\nb\t") == "a↵b⇥"
    assert plot.token_label("\x0c") == "\\x0c" and plot.token_label("  ") == "␣␣" and plot.token_label("") == "∅"
    assert plot.token_label("$x$") == "$x$"
    assert plot.token_label("abcdefghij", 5) == "abcd…"
    lens = lv.Lens(models.build("gpt2"), models.tokenizer())
    tr = lens.trace("It costs $5 or $6.\nThen $x$ and $y$", target=" the")
    fig = plot.attention(tr, 0, 0)
    saved(fig, tmp_path, "dollars")
    fig.savefig(tmp_path / "dollars.pdf")
    assert (tmp_path / "dollars.pdf").read_bytes()[:5] == b"%PDF-"
    ticks = fig.axes[0].get_xticklabels()
    assert labels(ticks) == token_labels(tr)
    assert any("$" in x.get_text() for x in ticks) and any("↵" in x.get_text() for x in ticks)
    assert not any(x.get_parse_math() for x in ticks)  # '$' is never read as mathtext


def test_matplotlib_is_imported_lazily():
    code = "import sys, lensviz, lensviz.plot; assert 'matplotlib' not in sys.modules, 'imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_bad_layer_and_head(trace):
    with pytest.raises(lv.LensvizError):
        plot.attention(trace, trace.n_layers, 0)
    with pytest.raises(lv.LensvizError):
        plot.reversed_attention(trace, 0, 99)
    assert math.isfinite(trace.loss)
