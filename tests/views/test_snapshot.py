"""The Explorer's static snapshot (text/html beside the widget view): what it shows, that token text
is escaped, that no script is in it, and its size at T=64 on a 30-layer model."""
from __future__ import annotations

import re
import struct
import zlib

import numpy as np
import torch
from transformers import AutoModelForCausalLM

import lensviz as lv
from lensviz.views import snapshot
from tests import models
from tests.conftest import PROMPT

XSS = '<img src=x onerror="alert(1)"><script>alert(2)</script> &amp; "q" of'


def bundle_html(ex) -> str:
    bundle = ex._repr_mimebundle_()
    data = bundle[0] if isinstance(bundle, tuple) else bundle
    assert "application/vnd.jupyter.widget-view+json" in data    # the widget view stays first choice
    return data["text/html"]


def test_snapshot_shows_header_tokens_grid_and_map(tiny_tokenizer):
    lens = lv.Lens(models.build("llama"), tiny_tokenizer)
    ex = lv.Explorer(lens, PROMPT, target=" Paris")
    html = bundle_html(ex)
    tr = ex.trace
    assert html.count('class="s-tok') == len(tr)
    cells = re.findall(r'<td class="p(\d)">([^<]*)</td>', html)
    assert len(cells) == lens.n_layers * len(tr)
    # the last layer's cells, in order, are the logit lens's top-1 tokens (shown, escaped, clipped)
    top1 = tr.logit_lens(k=1).tokens[-1]
    probs = tr.logit_lens(k=1).probs[-1, :, 0].numpy()
    shades = [int(p) for p, _ in cells[: len(tr)]]
    assert shades == [min(int(round(p * 255)) * snapshot.STEPS // 256, snapshot.STEPS - 1) for p in probs]
    p = float(torch.softmax(tr.logits[-1].double(), -1)[tr.target_id])
    assert f'<span class="s-prob">{snapshot.percent(p)}</span>' in html
    # the attention map is a PNG of the selected head, T x T
    b64 = re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1)
    import base64
    png = base64.b64decode(b64)
    w, h = struct.unpack(">II", png[16:24])
    assert (w, h) == (len(tr), len(tr))
    raw = zlib.decompress(png[png.index(b"IDAT") + 4:])
    img = np.frombuffer(raw, np.uint8).reshape(h, 1 + 3 * w)[:, 1:].reshape(h, w, 3)
    assert (img[0, 1] == (217, 217, 217)).all()                # above the diagonal: masked grey
    a = tr.attention(ex.selection["layer"])[ex.selection["head"]].numpy()
    green = np.array(snapshot.LIGHT[0]) + (np.array(snapshot.LIGHT[-1]) - np.array(snapshot.LIGHT[0])) * a[5, 3]
    assert np.abs(img[5, 3].astype(float) - green).max() <= 2.0


def test_snapshot_css_rules_are_balanced_and_each_selector_is_scoped():
    """A stray brace drops the rule after it (the selected token lost its fill that way)."""
    css = snapshot._css()
    depth = 0
    for ch in css:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth in (0, 1), "nested or stray brace in the snapshot's CSS"
    assert depth == 0
    for rule in re.findall(r"([^{}]+)\{[^{}]*\}", css):
        for selector in rule.split(","):
            assert selector.strip().startswith(".lv-snapshot") or ".lv-snapshot" in selector, selector


def test_snapshot_escapes_token_text_and_has_no_script(tiny_tokenizer):
    ex = lv.Explorer(lv.Lens(models.build("gpt2"), tiny_tokenizer), XSS, target=" Paris")
    html = bundle_html(ex)
    assert "<script" not in html.lower() and "onerror=" not in html.replace("onerror=&quot;", "")
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
    assert "&amp;amp;" in html                                 # "&amp;" in the prompt stays text
    assert len(re.findall(r"<img\b", html)) == 1               # only the attention map


def test_snapshot_is_small_at_64_tokens_on_30_layers(tiny_tokenizer):
    cfg = models.config("llama")
    cfg.num_hidden_layers, cfg.max_position_embeddings = 30, 128
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    lens = lv.Lens(model, tiny_tokenizer)
    words, prompt = " ".join(models.CORPUS).split(), ""
    for w in words:                            # the longest prefix of whole words with <= 64 tokens
        longer = (prompt + " " + w).strip()
        if len(lens.encode(longer)[0]) > 64:
            break
        prompt = longer
    ex = lv.Explorer(lens, prompt)
    assert 60 <= len(ex.tokens) <= 64
    size = len(bundle_html(ex).encode())
    print(f"snapshot: {len(ex.tokens)} tokens x 30 layers = {size / 1000:.1f} kB")
    assert size <= 200_000


def test_long_prompt_map_is_pooled_to_block_maxima(tiny_tokenizer):
    """Past MAP_SIDE tokens the attention image is MAP_SIDE cells a side at most, each the maximum of its
    block of A (so a sharp peak stays visible), blocks wholly above the diagonal grey."""
    cfg = models.config("llama")
    cfg.max_position_embeddings = 512
    torch.manual_seed(0)
    lens = lv.Lens(AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval(), tiny_tokenizer)
    ex = lv.Explorer(lens, " ".join([PROMPT] * 18), target=" Paris")
    n = len(ex.tokens)
    assert n > snapshot.MAP_SIDE
    html = bundle_html(ex)
    import base64
    png = base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1))
    w, h = struct.unpack(">II", png[16:24])
    b = -(-n // snapshot.MAP_SIDE)
    m = -(-n // b)
    assert (w, h) == (m, m) and m <= snapshot.MAP_SIDE and b == 2
    assert f"each pixel the maximum of {b} x {b} entries" in html
    raw = zlib.decompress(png[png.index(b"IDAT") + 4:])
    img = np.frombuffer(raw, np.uint8).reshape(h, 1 + 3 * w)[:, 1:].reshape(h, w, 3).astype(float)
    a = ex.trace.attention(ex.selection["layer"])[ex.selection["head"]].numpy()
    lo, hi = np.array(snapshot.LIGHT[0], float), np.array(snapshot.LIGHT[-1], float)
    for i, j in [(m - 1, 0), (m - 1, m - 1), (m // 2, m // 3), (5, 5)]:
        block = a[i * b:(i + 1) * b, j * b:(j + 1) * b].max()
        q = np.round(block * 255) / 255                      # the map travels as uint8
        assert np.abs(img[i, j] - (lo + (hi - lo) * q)).max() <= 1.0, (i, j)
    assert (img[0, 1] == (217, 217, 217)).all() and (img[3, m - 1] == (217, 217, 217)).all()
