"""Issue 14 on the kernel side: generation step-through (ex.step), keywords and selections checked at the
door, background runs with progress and Stop (nothing left behind), run coalescing, and the payloads of
the readable views (multi-position sums, RA scales, Backward Lens cells)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import lensviz as lv
from lensviz import capture
from lensviz.views import payload, stepping
from lensviz.views.explorer import Explorer
from lensviz.views.worker import Worker
from tests import models
from tests.conftest import PROMPT


@pytest.fixture
def lens(tiny_tokenizer):
    return lv.Lens(models.build("llama"), tiny_tokenizer)


def hooks_left(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def attn_impls(model):
    return [m.config._attn_implementation_internal for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation_internal")]


# keywords and new traitlets at the door -------------------------------------------------------------
@pytest.mark.parametrize("kw, words", [
    ({"targt": " Paris"}, ["unknown keyword", "'targt'", "target"]),
    ({"generate": 0}, ["generate must be an int"]),
    ({"generate": "5"}, ["generate must be an int"]),
    ({"generate": 10_000}, ["at most"]),
    ({"generate": 3, "seed": -1, "sample": True}, ["seed"]),
    ({"generate": 3, "sample": "yes"}, ["sample must be True or False"]),
    ({"tab": "nope"}, ["tab must be one of"]),
    ({"site": "middle"}, ["site must be one of"]),
])
def test_bad_keywords_raise_clear_errors(lens, kw, words):
    with pytest.raises(lv.LensvizError) as info:
        Explorer(lens, PROMPT, **kw)
    for w in words:
        assert w in str(info.value)


def test_generate_past_the_model_limit_is_a_clear_error(lens):
    ex = Explorer(lens, PROMPT)
    with pytest.raises(lv.LensvizError, match="accepts"):
        ex.generate(lens.max_tokens)


# generation step-through ---------------------------------------------------------------------------
def test_steps_show_the_prefix_with_the_generated_token_as_target(lens):
    ex = Explorer(lens, PROMPT, generate=6)
    gen = lens.generate(PROMPT, 6)
    assert ex.generated == gen.tokens and ex.step == 0 and ex.generation["n"] == 6
    n_prompt = len(lens.encode(PROMPT)[0])
    for k in (0, 3, 5):
        ex.step = k
        want = lens.trace([PROMPT] + [[i] for i in gen.ids[:k].tolist()], int(gen.ids[k]))
        assert len(ex.tokens) == n_prompt + k and ex.trace.target_id == int(gen.ids[k])
        assert torch.equal(ex.trace.input_ids, torch.cat([lens.encode(PROMPT)[0], gen.ids[:k]]))
        assert torch.allclose(ex.trace.logits, want.logits) and ex.summary["target_prob"] == pytest.approx(
            float(torch.softmax(want.logits[-1].double(), -1)[int(gen.ids[k])]))
        # the last position predicts the token generated at step k (greedy): its logits are the argmax
        assert int(gen.logits[k].argmax()) == int(gen.ids[k])
        assert torch.allclose(ex.trace.logits[-1], gen.logits[k], atol=1e-9)
        assert f"step {k} of 6" in ex.status and ex.prompt == PROMPT


@pytest.mark.parametrize("bad, words", [(6, "0..5"), (-1, "0..5"), ("x", "must be an int"), (True, "must be an int"),
                                        (2.0, "must be an int")])
def test_step_is_validated(lens, bad, words):
    ex = Explorer(lens, PROMPT, generate=6)
    ex.step = 2
    with pytest.raises(lv.LensvizError, match=words):
        ex.step = bad
    assert ex.step == 2


def test_step_without_a_generation_is_refused(lens):
    ex = Explorer(lens, PROMPT)
    with pytest.raises(lv.LensvizError, match="needs a generation"):
        ex.step = 1


def test_a_step_costs_one_trace_of_its_prefix(lens, monkeypatch):
    ex = Explorer(lens, PROMPT, generate=5)
    calls = []
    real = capture.run
    monkeypatch.setattr(capture, "run", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    ex.step = 4
    n_prompt = len(lens.encode(PROMPT)[0])
    assert calls == [n_prompt + 4]          # one trace of that prefix, no more (and none for other steps)
    ex.step = 1
    ex.step = 4                             # a step seen before: its trace is kept
    assert calls == [n_prompt + 4, n_prompt + 1]


def test_patches_apply_during_generation_as_in_lens_generate(lens):
    ex = Explorer(lens, PROMPT)
    ex._on_msg(ex, {"type": "run", "seq": 1, "patches": [{"type": "ablate", "layer": 1, "heads": [0, 2]}]}, [])
    ex._on_msg(ex, {"type": "generate", "seq": 2, "n": 5}, [])
    assert ex.error == "" and ex.done_seq == 2
    want = lens.generate(PROMPT, 5, patches=(lv.HeadAblation(1, [0, 2]),))
    plain = lens.generate(PROMPT, 5)
    assert ex.generated == want.tokens
    assert ex.generated != plain.tokens or not torch.allclose(want.logits, plain.logits)
    assert ex.trace.patches == (lv.HeadAblation(1, [0, 2]),)   # the step's views are patched too


def test_segment_mask_applies_during_generation(lens):
    segs = ["I like Italy and France.", " I visited the city of"]
    ex = Explorer(lens, segs)
    ex._on_msg(ex, {"type": "run", "seq": 1, "patches": [{"type": "segments"}]}, [])
    ex.generate(4)
    want = lens.generate(segs, 4, patches=(lv.SegmentMask(),))
    assert ex.generated == want.tokens
    ex.step = 3
    assert torch.allclose(ex.trace.logits[-1], want.logits[3], atol=1e-9)


def test_sampling_with_a_seed_is_reproducible(lens):
    a = Explorer(lens, PROMPT, generate=8, sample=True, seed=3)
    b = Explorer(lens, PROMPT, generate=8, sample=True, seed=3)
    state = torch.random.get_rng_state()
    c = Explorer(lens, PROMPT, generate=8, sample=True, seed=4)
    assert torch.equal(state, torch.random.get_rng_state())   # the global generator is left as it was
    assert a.generated == b.generated and a.generation["seed"] == 3
    assert a.generated != c.generated or a.generated != Explorer(lens, PROMPT, generate=8).generated


def test_widget_step_messages_with_nonsense_become_errors(lens):
    ex = Explorer(lens, PROMPT, generate=4)
    for i, msg in enumerate([{"step": "z"}, {"step": 99}, {"step": None}, {"step": [1]}]):
        ex._on_msg(ex, {"type": "step", "seq": 10 + i, **msg}, [])
        assert ex.error and ex.done_seq == 10 + i and ex.step == 0
    for i, msg in enumerate([{"n": -3}, {"n": "lots"}, {"n": 2, "seed": "x", "sample": True}, {"n": 2, "sample": 7}]):
        ex._on_msg(ex, {"type": "generate", "seq": 20 + i, **msg}, [])
        assert ex.error and ex.done_seq == 20 + i
    ex._on_msg(ex, {"type": "step", "seq": 30, "step": 2}, [])
    assert ex.error == "" and ex.step == 2
    ex._on_msg(ex, {"type": "stop"}, [])          # nothing running: no error, no change
    assert ex.error == "" and ex.step == 2


def test_a_new_prompt_leaves_the_generation(lens):
    ex = Explorer(lens, PROMPT, generate=4)
    ex._on_msg(ex, {"type": "run", "seq": 1, "prompt": PROMPT, "target": "", "patches": []}, [])
    assert ex.step == 0 and ex.generated                       # same prompt: still stepping
    ex._on_msg(ex, {"type": "run", "seq": 2, "prompt": "Hello there", "target": "", "patches": []}, [])
    assert ex.step == -1 and ex.generated == [] and ex.prompt == "Hello there"


# selections ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sel", [{"position": 99}, {"positions": [1, 500]}, {"positions": "1,2"}, {"layer": -1},
                                 {"head": 1.5}, {"range": [0]}, {"wat": 1}, {"positions": [True]}])
def test_nonsense_selections_become_errors(lens, sel):
    ex = Explorer(lens, PROMPT)
    good = dict(ex.selection)
    ex.selection = {**good, **sel}
    assert ex.error.startswith("selection") and ex.selection == good


def test_positions_set_is_accepted(lens):
    ex = Explorer(lens, PROMPT)
    ex.selection = {**ex.selection, "positions": [2, 4]}
    assert ex.error == "" and ex.selection["positions"] == [2, 4]


# readable views: payloads ------------------------------------------------------------------------------
def test_attention_sum_over_rows_and_columns(lens):
    ex = Explorer(lens, PROMPT)
    tr, S = ex.trace, [1, 3, 4]
    for kind, full in (("forward", tr.attention(2)[1]), ("reversed", tr.reversed_attention(2)[1])):
        for axis, want in (("rows", full[S].sum(0)), ("cols", full[:, S].sum(1))):
            meta, (buf,) = ex.answer({"what": "attention_sum", "layer": 2, "head": 1, "kind": kind, "positions": S, "axis": axis})
            got = np.frombuffer(buf, dtype="<f4")
            assert meta["positions"] == S and np.allclose(got, want.numpy(), rtol=1e-5, atol=1e-7)
    if True:   # rows of A sum to 1: the set's rows sum to |S|
        meta, (buf,) = ex.answer({"what": "attention_sum", "layer": 0, "head": 0, "kind": "forward", "positions": S})
        assert np.frombuffer(buf, dtype="<f4").sum() == pytest.approx(len(S), rel=1e-5)
    for bad in ({"positions": []}, {"positions": [99]}, {"positions": [1], "axis": "diag"}):
        with pytest.raises(lv.LensvizError):
            ex.answer({"what": "attention_sum", "layer": 0, "head": 0, "positions": [1], **bad})


def test_ra_scales_symlog_and_row(lens):
    ex = Explorer(lens, PROMPT)
    ra = ex.trace.reversed_attention(1)[0].double()
    top = float(ra.abs().max())
    shown, info = payload.signed_scale(ra, "symlog")
    c = info["c"]
    assert c == pytest.approx(top / 1e3) and float(shown.abs().max()) == pytest.approx(1.0)
    back = shown.sign() * c * (10 ** (shown.abs() * np.log10(1 + top / c)) - 1)   # what the legend inverts
    assert torch.allclose(back, ra, rtol=1e-9, atol=1e-15)
    assert torch.equal(shown.sign(), ra.sign())
    rows, _ = payload.signed_scale(ra, "row")
    nz = ra.abs().amax(-1) > 0
    assert torch.allclose(rows[nz].abs().amax(-1), torch.ones(int(nz.sum()), dtype=rows.dtype))
    # per row the small rows are as visible as the largest one: every non-zero row reaches |1|
    meta, (buf,) = ex.answer({"what": "attention", "layer": 1, "head": 0, "kind": "reversed", "scale": "symlog"})
    assert meta["scale_mode"] == "symlog" and meta["scale"] == pytest.approx(top)
    q = np.frombuffer(buf, dtype=np.int8).reshape(ra.shape)
    assert np.abs(q / 127 - shown.numpy()).max() <= 0.5 / 127 + 1e-9
    with pytest.raises(lv.LensvizError, match="scale must be one of"):
        ex.answer({"what": "attention", "layer": 1, "head": 0, "kind": "reversed", "scale": "log"})


def test_backward_cell_has_full_top_and_bottom_k(lens):
    from lensviz.lenses.backward import backward_lens
    ex = Explorer(lens, PROMPT)
    bl = backward_lens(ex.trace, k=10)
    for part, grid in (("ff2", bl.ff2), ("ff1", bl.ff1)):
        meta, _ = ex.answer({"what": "bl_cell", "layer": 1, "position": 3, "part": part})
        assert [t["token"] for t in meta["top"]] == grid.top.tokens[1][3]
        assert [t["token"] for t in meta["bottom"]] == grid.bottom.tokens[1][3]
        assert meta["target_rank"] == int(grid.target_rank[1, 3]) and len(meta["top"]) == 10
    with pytest.raises(lv.LensvizError, match="part"):
        ex.answer({"what": "bl_cell", "layer": 1, "position": 3, "part": "ff3"})


# Stop, progress and coalescing ----------------------------------------------------------------------------
def test_cancelled_run_leaves_nothing_behind(lens):
    model = lens.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impls, hooks = attn_impls(model), hooks_left(model)
    seen = []

    def watch(stage, layer):
        seen.append((stage, layer))
        if stage == "backward":
            raise capture.Cancelled("stop")

    for patches in ((), (lv.AttentionPatch(-2.0),), (lv.HeadAblation(1, [0]),)):
        with capture.watching(watch), pytest.raises(capture.Cancelled):
            lens.trace(PROMPT, patches=patches)
    with capture.watching(lambda s, l: (_ for _ in ()).throw(capture.Cancelled("x")) if l == 1 else None), \
            pytest.raises(capture.Cancelled):
        lens.generate(PROMPT, 3)
    assert hooks_left(model) == hooks and attn_impls(model) == impls
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert ("forward", 0) in seen and ("forward", lens.n_layers - 1) in seen
    # and the next run is as if nothing had happened
    assert torch.allclose(lens.trace(PROMPT).logits, lens.trace(PROMPT).logits)


def test_watch_sees_every_block_forward_and_backward(lens):
    seen = []
    with capture.watching(lambda s, l: seen.append((s, l))):
        lens.trace(PROMPT)
    L = lens.n_layers
    assert [x for x in seen if x[0] == "forward"] == [("forward", i) for i in range(L)]
    assert sorted(x for x in seen if x[0] == "backward") == [("backward", i) for i in range(L)]


def test_worker_stops_within_a_block_and_reports_progress(monkeypatch):
    from lensviz.views import worker as W
    monkeypatch.setattr(W, "PROGRESS_AFTER", 0.05)
    monkeypatch.setattr(W, "PROGRESS_EVERY", 0.0)
    reports, ended = [], []
    w = Worker(lambda d, s, t: reports.append(d), background=True)
    gate = threading.Event()

    def slow_run():                       # 1000 "blocks" of 10 ms through the real watch
        try:
            for i in range(1000):
                capture._WATCH.get()("forward", i % 10)
                gate.set()
                time.sleep(0.01)
        except capture.Cancelled as e:
            ended.append(str(e))

    w.submit(slow_run)
    gate.wait(5)
    time.sleep(0.2)
    t0 = time.perf_counter()
    assert w.stop()
    w.wait()
    assert time.perf_counter() - t0 < 0.1 and ended and "stopped" in ended[0]
    assert reports and reports == sorted(reports) and not w.busy


def test_worker_keeps_only_the_latest_waiting_job():
    w = Worker(lambda *a: None, background=True)
    done, release = [], threading.Event()
    w.submit(lambda: (release.wait(5), done.append("first")))
    for i in range(20):                  # 20 slider values while the first run is in flight
        w.submit(lambda i=i: done.append(i))
    release.set()
    w.wait()
    assert done == ["first", 19]


# Stop is no error, tab= at the door, the host's thread, the static export ----------------------------------
def test_a_stopped_run_is_no_error_and_changes_nothing(lens, monkeypatch):
    ex = Explorer(lens, PROMPT, target=" Paris")
    shown, logits = ex.patches, ex.trace.logits.clone()

    def stopped(*a, **k):
        raise capture.Cancelled("stopped by the user after 2 blocks")

    monkeypatch.setattr(lens, "trace", stopped)
    ex._on_msg(ex, {"type": "run", "seq": 7, "patches": [{"type": "attention", "eta": -2.0}]}, [])
    assert ex.error == "" and "stopped by the user after 2 blocks" in ex.status
    assert ex.done_seq == 7 and ex.runs == 1 and ex.patches == shown and torch.equal(ex.trace.logits, logits)
    # a stopped step: the step shown stays, and the note says which one
    monkeypatch.undo()
    gen = Explorer(lens, PROMPT, generate=3)
    monkeypatch.setattr(lens, "trace", stopped)
    gen._on_msg(gen, {"type": "step", "seq": 3, "step": 2}, [])
    assert gen.step == 0 and gen.error == "" and "step 0 of 3" in gen.status and gen.done_seq == 3


def test_tab_keyword_opens_that_view(lens):
    ex = Explorer(lens, PROMPT, tab="reversed")
    assert ex.tab == "reversed" and ex.trace.has_backward


def test_runs_are_in_the_caller_outside_a_notebook_kernel(lens):
    from lensviz.views.worker import host_thread
    assert host_thread() is None and Explorer(lens, PROMPT).threaded is False


def test_static_export_opens_without_an_error_and_answers_backward_lens_hovers(lens, tmp_path):
    import base64
    import gzip
    import json
    import re

    ex = Explorer(lens, PROMPT, target=" Paris")
    ex.error = "an error from before the export"
    html = lv.export_html(ex, tmp_path / "x.html").read_text()
    blob = re.search(r'id="lv-data">([^<]+)</script>', html).group(1)
    data = json.loads(gzip.decompress(base64.b64decode(blob)))
    assert data["state"]["error"] == "" and data["state"]["_static"] is True
    pos = ex.selection["position"]
    for layer in range(lens.n_layers):
        for part in ("ff1", "ff2"):
            key = json.dumps([["layer", layer], ["part", part], ["position", pos], ["what", "bl_cell"]],
                             separators=(",", ":"))
            assert data["replies"][key]["meta"] == payload.backward_cell(ex.trace, layer, pos, part)


def test_long_prompt_export_keeps_only_the_selected_heads_maps(tiny_tokenizer, tmp_path):
    import base64
    import gzip
    import json
    import re

    from lensviz.export import ALL_HEADS_UPTO
    lens = lv.Lens(models.build("llama", dtype=torch.float32), tiny_tokenizer, max_tokens=4096)
    ids = lens.tokenizer(" ".join(models.CORPUS) * 3, return_tensors="pt")["input_ids"][0][:ALL_HEADS_UPTO + 40]
    ex = Explorer(lens, lens.tokenizer.decode(ids.tolist()))
    assert len(ex.trace) > ALL_HEADS_UPTO
    html = lv.export_html(ex, tmp_path / "long.html").read_text()
    data = json.loads(gzip.decompress(base64.b64decode(re.search(r'id="lv-data">([^<]+)</script>', html).group(1))))
    maps = [json.loads(k) for k in data["replies"] if '"attention"' in k]
    sel = ex.selection
    assert sorted((dict(m)["kind"], dict(m).get("scale")) for m in maps) == \
        [("forward", None)] + [("reversed", s) for s in sorted(payload.MAP_SCALES)]
    assert all(dict(m)["layer"] == sel["layer"] and dict(m)["head"] == sel["head"] for m in maps)
    assert len(html) < 3 * len(ex.trace) ** 2     # a few maps, not 4 per head
