"""The Explorer's logit-lens grid for long prompts: the first state carries only the first columns and
the selection's window, the rest comes window by window on request ("grid"), each window the same
cells as trace.logit_lens (and as a projection by hand through the model's own final norm and
unembedding); nonsense requests become widget errors; a patch re-run starts a new generation.
The thresholds are lowered so that tiny float64 models exercise the long-prompt path."""
from __future__ import annotations

import base64
import gzip
import json
import re

import numpy as np
import pytest
import torch

import lensviz as lv
from lensviz.views import explorer as E
from tests import models
from tests.conftest import PROMPT

W = 4


@pytest.fixture
def small_windows(monkeypatch):
    monkeypatch.setattr(E, "GRID_FULL_UPTO", 8)
    monkeypatch.setattr(E, "GRID_WINDOW", W)
    monkeypatch.setattr(E, "GRID_FIRST", W)


@pytest.fixture(params=["llama", "gpt2"])
def ex(request, small_windows, tiny_tokenizer):
    return E.Explorer(lv.Lens(models.build(request.param), tiny_tokenizer), PROMPT, target=" Paris")


def ask(ex, **req):
    """Send one widget "get" message and return its reply (and buffers), as the browser would get them."""
    out = []
    ex.send = lambda content, buffers=None: out.append((content, buffers))
    ex._on_msg(ex, {"type": "get", "id": 7, **req}, [])
    del ex.send
    assert [c["type"] for c, _ in out] == ["ack", "reply"]
    return out[1]


def decode(meta, bufs):
    """(columns, ids, probs u8, ranks, changed or None) of a grid payload, [L, n] each."""
    L = meta["shape"][0]
    cols = [j for a, b in meta["columns"] for j in range(a, b)]
    arr = lambda b, dt: np.frombuffer(b, dt).reshape(L, len(cols))  # noqa: E731
    changed = arr(bufs[3], np.uint8) if len(bufs) > 3 and bufs[3] else None
    return cols, arr(bufs[0], "<i4"), arr(bufs[1], np.uint8), arr(bufs[2], "<i4"), changed


def by_hand(trace, positions, site="post"):
    """Top-1 id, its probability and the target's rank per (layer, position): softmax(W_U N_f(v)) in
    float64 through the model's own final norm and unembedding modules (independent of lensviz.vocab)."""
    lens = trace.lens
    with torch.no_grad():
        v = torch.stack([trace.resid(layer, site)[positions] for layer in range(lens.n_layers)])
        logp = torch.log_softmax(lens.unembed_module(lens.final_norm_module(v)).double(), -1)
    tgt = logp[..., trace.target_id]
    return logp.argmax(-1).numpy(), logp.max(-1).values.exp().numpy(), (logp > tgt[..., None]).sum(-1).numpy()


def test_first_state_holds_the_first_columns_and_the_selections_window(ex):
    t = len(ex.trace)
    assert t > 8 and ex.grid_meta["lazy"] and ex.grid_meta["window"] == W and ex.grid_meta["shape"] == [ex.lens.n_layers, t]
    last = (t - 1) // W * W
    assert ex.grid_meta["columns"] == [[0, W], [last, t]]
    cols, ids, probs, ranks, changed = decode(ex.grid_meta, [ex.grid_ids, ex.grid_probs, ex.grid_ranks, ex.grid_changed])
    full = ex.trace.logit_lens(k=1)
    assert np.array_equal(ids, full.ids[:, cols, 0].numpy()) and np.array_equal(ranks, full.target_rank[:, cols].numpy())
    assert changed is None and set(ex.grid_meta["strings"]) == {str(i) for i in np.unique(ids)}


def test_every_window_is_the_logit_lens_of_its_positions(ex):
    t, full = len(ex.trace), ex.trace.logit_lens(k=1)
    seen = []
    for w in range(-(-t // W)):
        reply, bufs = ask(ex, what="grid", window=w)
        meta = reply["meta"]
        assert "error" not in reply and meta["gen"] == ex.grid_meta["gen"] and meta["index"] == w
        cols, ids, probs, ranks, _ = decode(meta, bufs)
        assert cols == list(range(w * W, min(t, (w + 1) * W)))
        assert np.array_equal(ids, full.ids[:, cols, 0].numpy())
        assert np.array_equal(ranks, full.target_rank[:, cols].numpy())
        assert np.array_equal(probs, (full.probs[:, cols, 0].float().clamp(0, 1) * 255).round().to(torch.uint8).numpy())
        hid, hp, hr = by_hand(ex.trace, cols)
        assert np.array_equal(ids, hid) and np.array_equal(ranks, hr)
        assert np.abs(probs / 255 - hp).max() <= 0.5 / 255 + 1e-9
        assert all(meta["strings"][str(i)] == ex.lens.token_strings[i] for i in np.unique(ids))
        seen += cols
    assert seen == list(range(t))                      # the windows tile the grid
    again, _ = ex.grid_window(1)
    assert again is ex.grid_window(1)[0]               # answered once per generation


def test_trace_logit_lens_positions_are_the_full_grids_columns(tiny_tokenizer):
    lens = lv.Lens(models.build("llama"), tiny_tokenizer)
    tr = lens.trace(PROMPT, target=" Paris")
    part = tr.logit_lens(k=3, site="mid", positions=[5, -1, 2])          # computed alone
    full = tr.logit_lens(k=3, site="mid")
    cols = [5, len(tr) - 1, 2]
    assert part.ids.shape == (lens.n_layers, 3, 3)
    assert torch.equal(part.ids, full.ids[:, cols]) and torch.equal(part.target_rank, full.target_rank[:, cols])
    assert torch.allclose(part.probs, full.probs[:, cols], atol=1e-12)
    sliced = tr.logit_lens(k=3, site="mid", positions=range(2, 6))      # now from the cached full grid
    assert torch.equal(sliced.ids, full.ids[:, 2:6]) and sliced.tokens[0][0] == full.tokens[0][2]
    for bad in (len(tr), "3", [], [1.5], {"a": 1}):
        with pytest.raises(lv.LensvizError, match="position"):
            tr.logit_lens(k=1, positions=bad)


def test_nonsense_grid_requests_are_widget_errors(ex):
    n = -(-len(ex.trace) // W)
    for window in (None, -1, n, 10**9, "1", 1.5, True, [0], {"w": 0}, float("nan")):
        reply, bufs = ask(ex, what="grid", window=window)
        assert reply["type"] == "reply" and reply["error"].startswith("window must be an int in [0, "), window
        assert bufs is None
    reply, _ = ask(ex, what="grid")
    assert "window" in reply["error"]
    assert ex.error == ""                               # the view itself is fine


def test_a_patch_rerun_starts_a_new_generation_with_changed_cells(ex):
    gen0 = ex.grid_meta["gen"]
    old, _ = ask(ex, what="grid", window=1)
    assert old["meta"]["gen"] == gen0
    ex._on_msg(ex, {"type": "run", "seq": 2, "patches": [{"type": "ablate", "layer": 1, "heads": [0, 1]}]}, [])
    assert ex.error == "" and ex.trace is not ex.base
    gen1 = ex.grid_meta["gen"]
    assert gen1 == gen0 + 1 and not ex._grid_windows          # the old windows are dropped
    assert "changed" not in ex.diff and ex.diff["prob_after"] != ex.diff["prob_before"]   # cells come per window
    reply, bufs = ask(ex, what="grid", window=1)
    assert reply["meta"]["gen"] == gen1 and reply["meta"]["changed"] is True
    cols, ids, _, ranks, changed = decode(reply["meta"], bufs)
    patched, base = ex.trace.logit_lens(k=1), ex.base.logit_lens(k=1)
    assert np.array_equal(ids, patched.ids[:, cols, 0].numpy())
    assert np.array_equal(ranks, patched.target_rank[:, cols].numpy())
    assert np.array_equal(changed.astype(bool), (patched.ids[:, cols, 0] != base.ids[:, cols, 0]).numpy())
    ref = lv.compare(ex.base, ex.trace)["changed"]      # the same flags as the whole-grid diff
    assert changed.astype(bool).tolist() == [row[cols[0]:cols[-1] + 1] for row in ref]
    fcols, *_, fchanged = decode(ex.grid_meta, [ex.grid_ids, ex.grid_probs, ex.grid_ranks, ex.grid_changed])
    assert fchanged.astype(bool).tolist() == [[row[j] for j in fcols] for row in ref]
    ex.site = "mid"                                     # a site change is a new generation too
    assert ex.grid_meta["gen"] == gen1 + 1 and ex.grid_meta["site"] == "mid"
    reply, bufs = ask(ex, what="grid", window=1)
    assert reply["meta"]["site"] == "mid"
    assert np.array_equal(decode(reply["meta"], bufs)[1], ex.trace.logit_lens(k=1, site="mid").ids[:, cols, 0].numpy())


def test_export_and_snapshot_of_a_long_prompt(ex, tmp_path):
    ex._on_msg(ex, {"type": "run", "seq": 2, "patches": [{"type": "ablate", "layer": 1, "heads": [0]}]}, [])
    html = lv.export_html(ex, tmp_path / "long.html").read_text()
    state = json.loads(gzip.decompress(base64.b64decode(re.search(r'id="lv-data">([^<]+)</script>', html).group(1))))["state"]
    meta, t = state["grid_meta"], len(ex.trace)
    assert meta["columns"] == [[0, t]] and meta["lazy"] is False   # the page has no kernel: the whole grid
    ids = np.frombuffer(base64.b64decode(state["grid_ids"]["$b64"]), "<i4").reshape(ex.lens.n_layers, t)
    assert np.array_equal(ids, ex.trace.logit_lens(k=1).ids[..., 0].numpy())
    assert state["diff"]["changed"] == lv.compare(ex.base, ex.trace)["changed"]
    snap = ex._repr_mimebundle_()
    snap = (snap[0] if isinstance(snap, tuple) else snap)["text/html"]
    n_cols = sum(b - a for a, b in ex.grid_meta["columns"])
    assert len(re.findall(r'<td class="p\d">', snap)) == ex.lens.n_layers * n_cols < ex.lens.n_layers * t
    assert f"of {t}: the interactive view computes the rest" in snap and 's-gap' in snap


@pytest.mark.slow
def test_smollm2_windows_match_its_logit_lens(smol, monkeypatch):
    monkeypatch.setattr(E, "GRID_FULL_UPTO", 16)
    monkeypatch.setattr(E, "GRID_WINDOW", 16)
    monkeypatch.setattr(E, "GRID_FIRST", 16)
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 5)
    ex = E.Explorer(smol, text)
    t = len(ex.trace)
    assert t > 32 and ex.grid_meta["columns"] == [[0, 16], [(t - 1) // 16 * 16, t]]
    reply, bufs = ask(ex, what="grid", window=1)
    cols, ids, probs, ranks, _ = decode(reply["meta"], bufs)
    assert cols == list(range(16, 32))
    full = ex.trace.logit_lens(k=1)
    assert np.array_equal(ids, full.ids[:, cols, 0].numpy()) and np.array_equal(ranks, full.target_rank[:, cols].numpy())
    assert np.array_equal(probs, (full.probs[:, cols, 0].float().clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    hid, hp, hr = by_hand(ex.trace, cols)
    assert (ids == hid).mean() >= 0.995 and np.abs(probs / 255 - hp).max() <= 0.5 / 255 + 1e-4


def independent_norms(trace):
    """[2, L, H]: ||A_h||_F from trace.attention and ||RA_h||_F from autograd of the plain eager maths
    (tests/oracle.py), independent of lensviz's head_norms."""
    from tests import oracle
    lens = trace.lens
    ids = trace.input_ids
    ref = oracle.run(lens.model, ids, trace.target_id)
    fwd = torch.stack([trace.attention(layer).flatten(1).norm(dim=1) for layer in range(lens.n_layers)])
    ra = torch.stack([s.grad[0].flatten(1).norm(dim=1) for s in ref["S"]])
    return torch.stack([fwd, ra]).float().numpy()


def test_long_prompt_head_norms_come_on_request_once_per_run(ex, monkeypatch):
    """Long prompts leave the head norms out of the state (norms_meta.lazy); the "norms" request answers
    ||A|| and ||RA|| per head as an independent computation gives them, computes them once per run, and
    a patch re-run announces a new generation whose norms are the patched run's."""
    from lensviz.views import payload
    L, H = ex.lens.n_layers, ex.lens.n_heads
    assert ex.norms_meta["lazy"] is True and ex.norms == b"" and ex.norms_meta["shape"] == [2, L, H]
    calls = []
    real = payload.head_norms
    monkeypatch.setattr(payload, "head_norms", lambda tr: calls.append(tr) or real(tr))
    reply, bufs = ask(ex, what="norms")
    got = np.frombuffer(bufs[0], "<f4").reshape(2, L, H)
    np.testing.assert_allclose(got, independent_norms(ex.trace), rtol=1e-5, atol=1e-7)
    assert reply["meta"]["gen"] == ex.norms_meta["gen"]
    ask(ex, what="norms")
    assert len(calls) == 1                                        # the second request is answered from the run's cache
    gen = ex.norms_meta["gen"]
    ex.run(patches=[{"type": "ablate", "layer": 1, "heads": [0, 2]}])
    assert ex.norms_meta["gen"] == gen + 1 and ex.norms_meta["lazy"] and ex.norms == b""
    _, bufs = ask(ex, what="norms")
    patched = np.frombuffer(bufs[0], "<f4").reshape(2, L, H)
    assert len(calls) == 2 and not np.allclose(patched, got)
    np.testing.assert_allclose(patched[0], np.stack([ex.trace.attention(la).flatten(1).norm(dim=1).float().numpy()
                                                     for la in range(L)]), rtol=1e-5)


def test_short_prompt_head_norms_stay_in_the_state(tiny_tokenizer):
    ex = E.Explorer(lv.Lens(models.build("llama"), tiny_tokenizer), PROMPT, target=" Paris")
    L, H = ex.lens.n_layers, ex.lens.n_heads
    assert ex.norms_meta["lazy"] is False
    np.testing.assert_allclose(np.frombuffer(ex.norms, "<f4").reshape(2, L, H), independent_norms(ex.trace),
                               rtol=1e-5, atol=1e-7)
    _, bufs = ask(ex, what="norms")
    assert bytes(bufs[0]) == ex.norms


def test_export_of_a_long_prompt_carries_the_head_norms(ex, tmp_path):
    path = lv.export_html(ex, tmp_path / "long.html")
    blob = re.search(r'id="lv-data">([^<]*)</script>', path.read_text(encoding="utf-8")).group(1)
    state = json.loads(gzip.decompress(base64.b64decode(blob)))["state"]
    assert state["norms_meta"]["lazy"] is False
    L, H = ex.lens.n_layers, ex.lens.n_heads
    raw = state["norms"]
    buf = base64.b64decode(raw["$b64"]) if isinstance(raw, dict) else bytes(raw)
    np.testing.assert_allclose(np.frombuffer(buf, "<f4").reshape(2, L, H), independent_norms(ex.trace),
                               rtol=1e-5, atol=1e-7)
