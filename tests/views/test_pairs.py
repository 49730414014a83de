"""The Explorer's prompt pairs (views/pairs.py): construction and its errors, the metric header, the
patching heatmap payloads against lens.patching_sweep, pair patches against lens.trace with the same
patch, the head grid's measures against lv.head_importance, nonsense messages, snapshot and export."""
from __future__ import annotations

import base64
import gzip
import json
import random
import re
import struct
import zlib

import numpy as np
import pytest
import torch

import lensviz as lv
from lensviz.lenses.reversed import head_norms
from lensviz.views.explorer import Explorer
from tests import models
from tests.conftest import PROMPT

CLEAN = PROMPT                                        # "... Italy and France. ..." (20 tokens)
CORRUPT = PROMPT.replace(" France", " Paris")         # one token replaced: the same length
TARGET, DISTRACTOR = " Paris", " the"


@pytest.fixture
def lens(tiny_tokenizer):
    return lv.Lens(models.build("llama"), tiny_tokenizer)


@pytest.fixture
def ex(lens):
    return Explorer(lens, CLEAN, corrupt=CORRUPT, target=TARGET, distractor=DISTRACTOR)


def f32(buf, shape):
    return np.frombuffer(buf, dtype="<f4").reshape(shape)


def test_pair_state_shows_both_prompts_and_their_metrics(ex, lens):
    clean = lens.trace(CLEAN, target=TARGET, distractor=DISTRACTOR)
    corrupt = lens.trace(CORRUPT, target=TARGET, distractor=DISTRACTOR)
    p = ex.pair
    assert p["clean_tokens"] == clean.tokens and ex.tokens == corrupt.tokens and ex.prompt == CORRUPT
    assert p["clean_prompt"] == CLEAN and p["differ"] == [9]           # " France" vs " Paris"
    assert p["kind"] == "logit_diff" and (p["target"], p["distractor"]) == (TARGET, DISTRACTOR)
    logits = clean.logits[-1].double()
    assert p["metric_clean"] == pytest.approx(float(logits[lens.token_id(TARGET)] - logits[lens.token_id(DISTRACTOR)]))
    assert p["metric_corrupt"] == pytest.approx(corrupt.metric) and p["metric"] == pytest.approx(corrupt.metric)
    assert ex.base.input_ids.tolist() == corrupt.input_ids.tolist() and ex.base.has_backward


def test_unequal_lengths_are_refused_at_construction_with_how_to_align(lens):
    with pytest.raises(lv.LensvizError, match="same length. Align them"):
        Explorer(lens, CLEAN, corrupt=PROMPT.replace("Italy", "Spain"), target=TARGET)
    with pytest.raises(lv.LensvizError, match="corrupt must be a prompt"):
        Explorer(lens, CLEAN, corrupt=3, target=TARGET)
    with pytest.raises(lv.LensvizError, match="cannot be combined"):
        Explorer(lens, CLEAN, corrupt=CORRUPT, generate=3)
    with pytest.raises(lv.LensvizError, match="needs a prompt pair"):
        Explorer(lens, CLEAN, target=TARGET, tab="patching")
    assert Explorer(lens, CLEAN, corrupt=CORRUPT, target=TARGET, tab="patching").tab == "patching"


def test_multi_token_target_marks_the_appended_positions(lens):
    ex = Explorer(lens, CLEAN, corrupt=CORRUPT, target=" Eiffel Tower")
    ref = lens.trace(CORRUPT, target=" Eiffel Tower")
    n = len(lens.token_ids(" Eiffel Tower"))
    assert ex.pair["appended"] == list(range(20, 20 + n - 1)) == ref.appended
    assert ex.pair["kind"] == "logprob" and ex.pair["metric_corrupt"] == pytest.approx(-ref.loss)
    # a patch keeps the whole target: the patched run is the same teacher-forced run
    ex.run(patches=[{"type": "head", "layer": 1, "heads": [0]}])
    assert ex.error == "" and len(ex.trace) == len(ref) and ex.trace.target_ids == ref.target_ids


@pytest.mark.parametrize("site", ["pre", "mid", "post", "head"])
def test_sweep_payloads_equal_lens_patching_sweep(ex, lens, site):
    meta, (buf,) = ex.answer({"what": "sweep", "site": site, "method": "attribution"})
    ref = lens.patching_sweep(CLEAN, CORRUPT, target=TARGET, distractor=DISTRACTOR, site=site, method="attribution")
    assert meta["shape"] == list(ref.effect.shape) == [lens.n_layers, lens.n_heads if site == "head" else 20]
    assert np.allclose(f32(buf, meta["shape"]), ref.effect.numpy(), rtol=1e-5, atol=1e-6)
    assert meta["denom"] == pytest.approx(ref.metric_clean - ref.metric_corrupt)
    # exact: missing until the job ran, then equal to the sweep
    missing, bufs = ex.answer({"what": "sweep", "site": site, "method": "exact"})
    assert missing["missing"] and bufs == []
    sent = []
    ex.send = lambda content, buffers=None: sent.append(content)
    ex._on_msg(ex, {"type": "sweep", "site": site, "seq": 5}, [])
    assert ex.error == "" and ex.done_seq == 5
    assert sent[-1]["type"] == "sweep_done" and any(m["type"] == "sweep_progress" for m in sent)
    meta, (buf,) = ex.answer({"what": "sweep", "site": site, "method": "exact"})
    exact = lens.patching_sweep(CLEAN, CORRUPT, target=TARGET, distractor=DISTRACTOR, site=site, method="exact")
    assert np.allclose(f32(buf, meta["shape"]), exact.effect.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("site", ["post", "mid", "head"])
def test_a_clicked_cell_is_the_patch_and_the_views_follow(ex, lens, site):
    layer, col = 1, (2 if site == "head" else 9)
    spec = ({"type": "head", "layer": layer, "heads": [col]} if site == "head"
            else {"type": "activation", "layer": layer, "site": site, "position": col})
    ex._on_msg(ex, {"type": "run", "seq": 2, "prompt": CORRUPT, "target": TARGET, "patches": [spec]}, [])
    assert ex.error == "" and ex.patches == [spec]
    clean = lens.trace(CLEAN, target=TARGET, distractor=DISTRACTOR)
    patch = lv.HeadPatch(clean, layer, [col]) if site == "head" else lv.ActivationPatch(clean, layer, site, positions=[col])
    ref = lens.trace(CORRUPT, target=TARGET, distractor=DISTRACTOR, patches=(patch,))
    assert torch.allclose(ex.trace.logits, ref.logits, atol=1e-9)
    assert ex.pair["metric"] == pytest.approx(ref.metric)
    # the cell's exact effect is this patch's effect on the metric
    exact = lens.patching_sweep(CLEAN, CORRUPT, target=TARGET, distractor=DISTRACTOR, site=site, method="exact")
    assert ex.pair["metric"] - ex.pair["metric_corrupt"] == pytest.approx(float(exact.effect[layer, col]), abs=1e-9)
    # every view follows: the logit-lens grid is the patched run's
    L, T = ex.grid_meta["shape"]
    assert np.array_equal(np.frombuffer(ex.grid_ids, "<i4").reshape(L, T), ref.logit_lens(k=1).ids[..., 0].numpy())
    assert ex.diff["prob_after"] == pytest.approx(float(torch.softmax(ref.logits[-1].double(), -1)[ref.target_id]))
    # copy as code reproduces it with `clean` as the source
    again = lens.trace(CORRUPT, target=TARGET, distractor=DISTRACTOR, patches=eval(ex.code, {"lv": lv, "clean": clean}))
    assert torch.allclose(again.logits, ref.logits, atol=1e-9)
    ex._on_msg(ex, {"type": "run", "seq": 3, "prompt": CORRUPT, "target": TARGET, "patches": []}, [])              # removed again
    assert ex.trace is ex.base and ex.pair["metric"] == pytest.approx(ex.pair["metric_corrupt"])


@pytest.mark.parametrize("measure", ["dla", "ablation", "ra", "norm"])
def test_head_grid_measures_equal_head_importance(ex, measure):
    if measure == "ablation":          # exact runs: a background job first, with progress
        assert ex.answer({"what": "importance", "measure": measure}) == ({"measure": measure, "missing": True}, [])
        sent = []
        ex.send = lambda content, buffers=None: sent.append(content)
        ex._on_msg(ex, {"type": "importance", "measure": measure, "seq": 3}, [])
        assert ex.error == "" and ex.done_seq == 3 and sent[-1] == {"type": "importance_done", "measure": measure}
        assert [m["done"] for m in sent if m["type"] == "importance_progress"][-1] == ex.lens.n_layers
    meta, (buf,) = ex.answer({"what": "importance", "measure": measure})
    tr = ex.trace
    ref = head_norms(tr, "forward") if measure == "norm" else lv.head_importance(tr, measure)
    assert meta["measure"] == measure and meta["shape"] == [ex.lens.n_layers, ex.lens.n_heads]
    assert np.allclose(f32(buf, meta["shape"]), ref.numpy(), rtol=1e-5, atol=1e-6)
    if measure == "dla":   # it points at something: not nearly constant like ||A||
        v = ref.flatten()
        assert float(v.std()) > 0.1 * float(v.abs().mean())


def test_ablation_measure_of_a_patched_run_uses_the_unpatched_one(ex):
    ex.run(patches=[{"type": "head", "layer": 0, "heads": [1]}])
    ex._on_msg(ex, {"type": "importance", "measure": "ablation", "seq": 1}, [])
    meta, (buf,) = ex.answer({"what": "importance", "measure": "ablation"})
    assert meta["of"] == "unpatched"
    assert np.allclose(f32(buf, meta["shape"]), lv.head_importance(ex.base, "ablation").numpy(), rtol=1e-5, atol=1e-6)


def test_stop_ends_an_exact_sweep_with_a_message(ex, monkeypatch):
    sent = []
    ex.send = lambda content, buffers=None: sent.append(content)
    monkeypatch.setattr(type(ex._worker), "stop_requested", property(lambda self: True))
    ex._on_msg(ex, {"type": "sweep", "site": "post", "seq": 7}, [])
    assert ex.error == "" and "stopped by the user" in ex.status and ex.done_seq == 7   # Stop is no error
    assert ex.answer({"what": "sweep", "site": "post", "method": "exact"})[0]["missing"]
    ex._on_msg(ex, {"type": "importance", "measure": "ablation", "seq": 8}, [])
    assert ex.error == "" and "stopped by the user" in ex.status and ex.done_seq == 8
    assert ex.answer({"what": "importance", "measure": "ablation"})[0]["missing"]


def test_nonsense_pair_messages_become_widget_errors(ex):
    before = (ex.tokens, ex.pair)
    bad = [
        {"type": "run", "seq": 1, "target": TARGET, "patches": [{"type": "activation", "layer": 99, "site": "post", "position": 0}]},
        {"type": "run", "seq": 2, "target": TARGET, "patches": [{"type": "activation", "layer": 0, "site": "sideways", "position": 0}]},
        {"type": "run", "seq": 3, "target": TARGET, "patches": [{"type": "activation", "layer": 0, "site": "post", "position": "x"}]},
        {"type": "run", "seq": 4, "target": TARGET, "patches": [{"type": "head", "layer": 0, "heads": "1"}]},
        {"type": "run", "seq": 5, "target": TARGET, "patches": [{"type": "head", "layer": 0, "heads": [True]}]},
        {"type": "run", "seq": 6, "target": TARGET, "patches": [{"type": "head", "layer": 0, "heads": []}]},
        {"type": "sweep", "seq": 7, "site": "everywhere"},
        {"type": "sweep", "seq": 8, "site": None},
        {"type": "clean", "seq": 9, "clean": PROMPT.replace("Italy", "Spain")},   # another length
        {"type": "clean", "seq": 10, "clean": 42},
        {"type": "importance", "seq": 11, "measure": "vibes"},
        {"type": "importance", "seq": 12, "measure": ["dla"]},
    ]
    for msg in bad:
        ex.error = ""
        ex._on_msg(ex, msg, [])
        assert ex.error, msg
        assert ex.done_seq == msg["seq"]
    assert (ex.tokens, ex.pair) == before
    replies = []
    ex.send = lambda content, buffers=None: replies.append(content)
    rng = random.Random(2)
    junk = [None, -1, 10**9, "x", 1.5, [], {}, True, "exact", "head"]
    for what in ("sweep", "importance"):
        for _ in range(6):
            ex._on_msg(ex, {"type": "get", "id": 1, "what": what, "site": rng.choice(junk),
                            "method": rng.choice(junk), "measure": rng.choice(junk[:-2])}, [])
    answers = [r for r in replies if r["type"] == "reply"]
    assert len(answers) == 12 and all("error" in r for r in answers)


def test_pair_patches_need_a_pair(lens):
    ex = Explorer(lens, CLEAN, target=TARGET)
    ex._on_msg(ex, {"type": "run", "seq": 1, "target": TARGET, "patches": [{"type": "head", "layer": 0, "heads": [0]}]}, [])
    assert "prompt pair" in ex.error
    replies = []
    ex.send = lambda content, buffers=None: replies.append(content)
    ex._on_msg(ex, {"type": "get", "id": 2, "what": "sweep", "site": "post"}, [])
    assert "prompt pair" in replies[-1]["error"]


def test_a_new_clean_prompt_makes_a_new_pair(ex, lens):
    ex.run(patches=[{"type": "activation", "layer": 0, "site": "pre", "position": 9}])
    ex._on_msg(ex, {"type": "clean", "seq": 4, "clean": CORRUPT}, [])       # clean == corrupt: effect 0
    assert ex.error == "" and ex.pair["clean_prompt"] == CORRUPT and ex.pair["differ"] == []
    assert ex.patches == []                                                  # pair patches of the old clean run go
    meta, (buf,) = ex.answer({"what": "sweep", "site": "post", "method": "attribution"})
    assert np.allclose(f32(buf, meta["shape"]), 0.0)


def test_distractor_without_a_pair_shows_the_logit_difference(lens):
    ex = Explorer(lens, CLEAN, target=TARGET, distractor=DISTRACTOR)
    tr = lens.trace(CLEAN, target=TARGET, distractor=DISTRACTOR)
    assert ex.pair["kind"] == "logit_diff" and ex.pair["metric"] == pytest.approx(tr.metric)
    assert "clean_prompt" not in ex.pair


def test_snapshot_and_export_work_with_a_pair(ex, tmp_path):
    ex.run(patches=[{"type": "activation", "layer": 1, "site": "post", "position": 9}])
    bundle = ex._repr_mimebundle_()
    data = bundle[0] if isinstance(bundle, tuple) else bundle
    assert "lv-snapshot" in data["text/html"] and "Paris" in data["text/html"]
    ex._on_msg(ex, {"type": "sweep", "site": "head", "seq": 9}, [])      # an exact sweep done before the export
    path = lv.export_html(ex, tmp_path / "pair.html")
    page = path.read_text(encoding="utf-8")
    blob = re.search(r'id="lv-data">([^<]*)</script>', page).group(1)
    data = json.loads(gzip.decompress(base64.b64decode(blob)))
    assert data["state"]["pair"]["clean_prompt"] == CLEAN
    for req in ({"measure": "dla", "what": "importance"}, {"method": "attribution", "site": "post", "what": "sweep"},
                {"method": "exact", "site": "head", "what": "sweep"}):
        got = data["replies"][json.dumps([[k, req[k]] for k in sorted(req)], separators=(",", ":"))]
        meta, (buf,) = ex.answer(req)
        assert got["meta"]["shape"] == meta["shape"]
        assert base64.b64decode(got["buffers"][0]["$b64"]) == bytes(buf)


def test_snapshot_shows_both_prompts_the_metrics_and_the_attribution_heatmap(ex, lens):
    from lensviz.views import snapshot
    ex.run(patches=[{"type": "activation", "layer": 1, "site": "post", "position": 9}])
    data = ex._repr_mimebundle_()
    html = (data[0] if isinstance(data, tuple) else data)["text/html"]
    pair = re.search(r'<div class="s-pair">(.*?)</div>', html).group(1)
    strips = re.findall(r'<span class="s-strip">(.*?)</span></span>', pair)
    assert len(strips) == 2
    outlined = [[m.start() for m in re.finditer(r'class="s-tok s-diff', st)] for st in strips]
    sw = lens.patching_sweep(CLEAN, CORRUPT, target=TARGET, distractor=DISTRACTOR, site="post", method="attribution")
    differ = [i for i, (a, b) in enumerate(zip(sw.clean.input_ids.tolist(), sw.corrupt.input_ids.tolist())) if a != b]
    assert differ and all(len(o) == len(differ) for o in outlined)
    texts = [re.findall(r'<span class="s-tok[^"]*">([^<]*)</span>', st) for st in strips]
    assert [texts[0][i] for i in differ] == [snapshot._show(sw.clean.tokens[i]) for i in differ]
    assert [texts[1][i] for i in differ] == [snapshot._show(sw.corrupt.tokens[i]) for i in differ]
    shown = lens.trace(CORRUPT, target=TARGET, distractor=DISTRACTOR,
                       patches=[lv.ActivationPatch(sw.clean, 1, "post", positions=[9])]).metric
    way = 100 * (shown - sw.metric_corrupt) / (sw.metric_clean - sw.metric_corrupt)
    assert (f"logit difference: clean {sw.metric_clean:.3f} · corrupt {sw.metric_corrupt:.3f} · shown {shown:.3f} "
            f"({way:.0f} % of the way)") in html
    # the heatmap PNG: layers (last on top) x positions, its pixels the effect / max|effect| on util.js's scale
    b64 = re.findall(r'alt="patching attribution[^"]*" width="\d+" height="\d+" src="data:image/png;base64,([^"]+)"', html)
    png = base64.b64decode(b64[0])
    w, h = struct.unpack(">II", png[16:24])
    assert (w, h) == (len(sw.tokens), lens.n_layers)
    raw = zlib.decompress(png[png.index(b"IDAT") + 4:])
    img = np.frombuffer(raw, np.uint8).reshape(h, 1 + 3 * w)[:, 1:].reshape(h, w, 3).astype(float)
    e = sw.effect.numpy() / sw.effect.abs().max().item()
    mid, neg, pos = (np.array(c, float) for c in (snapshot.MID, snapshot.NEG, snapshot.POS))
    for layer, p in [(0, differ[0]), (lens.n_layers - 1, len(sw.tokens) - 1), (1, 0)]:
        v = e[layer, p]
        want = mid + ((neg - mid) * -v if v < 0 else (pos - mid) * v)
        assert np.abs(img[lens.n_layers - 1 - layer, p] - want).max() <= 1.0, (layer, p)


def test_a_new_corrupt_prompt_from_the_widget_is_checked_against_the_clean_one(ex, lens):
    before = (ex.tokens, ex.pair)
    ex._on_msg(ex, {"type": "run", "seq": 1, "prompt": PROMPT.replace("Italy", "Spain"), "target": TARGET,
                    "patches": []}, [])
    assert "same length" in ex.error and (ex.tokens, ex.pair) == before
    other = PROMPT.replace(" France", " city")                              # another one-token word
    ex._on_msg(ex, {"type": "run", "seq": 2, "prompt": other, "target": TARGET,
                    "patches": [{"type": "activation", "layer": 2, "site": "pre", "position": 9}]}, [])
    assert ex.error == "" and ex.prompt == other and ex.pair["clean_prompt"] == CLEAN
    clean = lens.trace(CLEAN, target=TARGET, distractor=DISTRACTOR)
    ref = lens.trace(other, target=TARGET, distractor=DISTRACTOR,
                     patches=(lv.ActivationPatch(clean, 2, "pre", positions=[9]),))
    assert torch.allclose(ex.trace.logits, ref.logits, atol=1e-9)
    assert ex.pair["metric_corrupt"] == pytest.approx(lens.trace(other, target=TARGET, distractor=DISTRACTOR).metric)


def test_from_trace_keeps_the_distractor(lens):
    tr = lens.trace(CLEAN, target=TARGET, distractor=DISTRACTOR, patches=(lv.HeadAblation(0, [1]),))
    ex = Explorer.from_trace(tr)
    assert ex.base.distractor_id == tr.distractor_id and ex.pair["metric_base"] == pytest.approx(
        lens.trace(CLEAN, target=TARGET, distractor=DISTRACTOR).metric)
    assert ex.pair["metric"] == pytest.approx(tr.metric)


def test_the_first_runs_dla_is_ready_before_the_grid_asks(lens, monkeypatch):
    """The head grid's default measure is computed with the first run, so the first render's request is
    answered from the cache (no computation behind the other views' first requests), with the same numbers."""
    from lensviz.views import payload
    single = Explorer(lens, CLEAN, target=TARGET)
    monkeypatch.setattr(payload, "head_importance", lambda *a, **k: pytest.fail("DLA recomputed on request"))
    meta, (buf,) = single.answer({"what": "importance", "measure": "dla"})
    ref = lv.head_importance(single.trace, "dla")
    assert meta["measure"] == "dla"
    np.testing.assert_array_equal(f32(buf, tuple(ref.shape)), ref.float().numpy())
