"""The Explorer's kernel side: state, on-demand payloads, re-execution, and robustness to nonsense
messages (the browser side is tested in tests/browser)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import lensviz as lv
from lensviz.views import magic, payload
from lensviz.views.explorer import Explorer, patch_code
from tests import models
from tests.conftest import PROMPT


@pytest.fixture
def ex(tiny_tokenizer):
    return Explorer(lv.Lens(models.build("llama"), tiny_tokenizer), PROMPT, target=" Paris")


def state_bytes(widget) -> int:
    state = widget.get_state()
    return sum(len(v) if isinstance(v, (bytes, memoryview)) else len(json.dumps(v)) for v in state.values())


def test_initial_state_matches_the_trace(ex):
    tr = ex.trace
    assert ex.tokens == tr.tokens and ex.summary["target"] == " Paris"
    assert ex.summary["target_prob"] == pytest.approx(float(torch.softmax(tr.logits[-1].double(), -1)[tr.target_id]))
    L, T = ex.grid_meta["shape"]
    ids = np.frombuffer(ex.grid_ids, dtype="<i4").reshape(L, T)
    assert (L, T) == (ex.lens.n_layers, len(tr))
    assert np.array_equal(ids, tr.logit_lens(k=1).ids[..., 0].numpy())
    assert set(ex.grid_meta["strings"]) == {str(i) for i in np.unique(ids)}
    norms = np.frombuffer(ex.norms, dtype="<f4").reshape(2, L, ex.lens.n_heads)
    assert np.allclose(norms[1, 2], tr.reversed_attention(2).flatten(1).norm(dim=1).numpy(), rtol=1e-5)
    assert ex.selection["position"] == T - 1
    assert repr(ex) == "Explorer(llama, 20 tokens, target=' Paris', patches=0)"


def test_maps_are_quantised_faithfully(ex):
    meta, (buf,) = ex.answer({"what": "attention", "layer": 1, "head": 2, "kind": "forward"})
    a = np.frombuffer(buf, dtype=np.uint8).reshape(meta["n"], meta["n"]) / 255
    assert np.abs(a - ex.trace.attention(1)[2].numpy()).max() <= 0.5 / 255 + 1e-9
    meta, (buf,) = ex.answer({"what": "attention", "layer": 1, "head": 2, "kind": "reversed"})
    ra = np.frombuffer(buf, dtype=np.int8).reshape(meta["n"], meta["n"]) / 127 * meta["scale"]
    exact = ex.trace.reversed_attention(1)[2].numpy()
    assert np.abs(ra - exact).max() <= 0.5 / 127 * np.abs(exact).max() + 1e-12
    meta, (buf,) = ex.answer({"what": "thumbs", "layer": 0, "kind": "reversed"})
    assert len(buf) == meta["heads"] * meta["n"] ** 2


def test_cell_neurons_backward_flow_answers(ex):
    cell, _ = ex.answer({"what": "cell", "layer": 2, "position": 4, "site": "mid"})
    top = ex.lens.project(ex.trace.resid(2, "mid")[4], k=10, target=ex.trace.target_id)
    assert [t["token"] for t in cell["top"]] == top.tokens and cell["target_rank"] == int(top.target_rank)
    cells = [(layer, p) for layer in range(ex.lens.n_layers) for p in (0, 4, len(ex.trace) - 1)]
    batched = payload.cell_topks(ex.trace, cells, "mid")  # what export_html precomputes in one projection
    single = [ex.answer({"what": "cell", "layer": la, "position": p, "site": "mid"})[0] for la, p in cells]
    assert len(batched) == len(single) == 3 * ex.lens.n_layers
    for b, s in zip(batched, single):
        assert [t["token"] for t in b["top"]] == [t["token"] for t in s["top"]]
        assert (b["layer"], b["position"], b["target_rank"]) == (s["layer"], s["position"], s["target_rank"])
        assert [t["prob"] for t in b["top"]] == pytest.approx([t["prob"] for t in s["top"]], abs=1e-9)
    neurons, _ = ex.answer({"what": "neurons", "layer": 1, "position": 3})
    a = ex.trace.mlp_activations(1)[3]
    w = ex.lens.adapter.as_in_out(ex.lens.weight(1, "mlp_out"))
    best = int((a.abs() * w.norm(dim=-1)).argmax())
    assert neurons["subupdates"][0]["neuron"] == best
    meta, bufs = ex.answer({"what": "backward"})
    assert meta["shape"] == [ex.lens.n_layers, len(ex.trace)] and len(bufs) == 7
    graph, _ = ex.answer({"what": "flow", "position": 5, "layers": [1]})
    assert {n["layer"] for n in graph["nodes"]} == {1} and all("row" in n for n in graph["nodes"])
    json.dumps(graph)


def test_patch_messages_rerun_and_report_the_diff(ex):
    ex._on_msg(ex, {"type": "run", "seq": 3, "prompt": PROMPT, "target": " Paris",
                    "patches": [{"type": "attention", "eta": -2.0, "layers": [1, 2], "heads": None}]}, [])
    assert ex.done_seq == 3 and ex.error == ""
    ref = ex.lens.trace(PROMPT, target=" Paris", patches=(lv.AttentionPatch(-2.0, layers=[1, 2]),))
    assert ex.diff["prob_after"] == pytest.approx(float(torch.softmax(ref.logits[-1].double(), -1)[ref.target_id]))
    assert ex.diff["prob_before"] == pytest.approx(ex.base_summary["target_prob"])
    patches = eval(ex.code, {"lv": lv})  # "copy as code" reproduces the patch set
    again = ex.lens.trace(PROMPT, target=" Paris", patches=patches)
    assert torch.equal(again.logits, ref.logits)
    ex._on_msg(ex, {"type": "run", "seq": 4, "patches": []}, [])
    assert ex.diff == {} and ex.trace is ex.base and ex.done_seq == 4


def test_new_prompt_and_target_reset_the_base(ex):
    ex._on_msg(ex, {"type": "run", "seq": 1, "prompt": "The capital of France is", "target": ""}, [])
    assert ex.tokens == ex.lens.trace("The capital of France is").tokens
    assert ex.target == "" and ex.summary["target_id"] == int(ex.trace.logits[-1].argmax())


def test_nonsense_messages_become_errors_not_crashes(ex):
    before = (ex.tokens, ex.summary)
    bad = [
        {"type": "run", "seq": 1, "patches": [{"type": "attention", "eta": "lots"}]},
        {"type": "run", "seq": 2, "patches": [{"type": "ablate", "layer": 99, "heads": [0]}]},
        {"type": "run", "seq": 3, "patches": [{"type": "neuron", "layer": 0, "neuron": -999}]},
        {"type": "run", "seq": 4, "patches": [{"type": "topk", "k": 0}]},
        {"type": "run", "seq": 5, "patches": [{"type": "warp"}]},
        {"type": "run", "seq": 6, "patches": "all"},
        {"type": "run", "seq": 7, "prompt": ""},
        {"type": "run", "seq": 8, "prompt": None, "target": 3.5},
        {"type": "run", "seq": 9, "patches": [{"type": "attention", "eta": float("nan")}]},
        {"type": "run", "seq": 10, "patches": [{"type": "ablate", "layer": 0, "heads": "1"}]},
    ]
    for msg in bad:
        ex.error = ""
        ex._on_msg(ex, msg, [])
        assert ex.error, msg
        assert ex.done_seq == msg["seq"]
    assert (ex.tokens, ex.summary) == before  # the last good view stays
    replies = []
    ex.send = lambda content, buffers=None: replies.append(content)
    rng = random.Random(1)
    junk = [None, -1, 10**9, "x", 1.5, [], {}, True]
    for what in ("attention", "thumbs", "cell", "neurons", "flow", "search", "nope"):
        for _ in range(5):
            ex._on_msg(ex, {"type": "get", "id": 1, "what": what, "layer": rng.choice(junk), "head": rng.choice(junk),
                            "position": rng.choice(junk), "kind": rng.choice(["forward", "sideways", None]),
                            "token": rng.choice(junk), "layers": rng.choice(junk)}, [])
    acks = [r for r in replies if r["type"] == "ack"]
    answers = [r for r in replies if r["type"] != "ack"]
    assert len(acks) == len(answers) == 7 * 5      # every message is acknowledged, then answered
    assert all(r["type"] == "reply" and "error" in r for r in answers)
    ex.site = "nowhere"
    assert ex.site in ("pre", "mid", "post") and "site" in ex.error


def test_patch_code_round_trips():
    code = patch_code((lv.HeadAblation(1, [0, 2]), lv.TopKAttention(4)))
    assert code == "(lv.HeadAblation(layer=1, heads=[0, 2]), lv.TopKAttention(k=4))"
    assert eval(code, {"lv": lv}) == (lv.HeadAblation(1, [0, 2]), lv.TopKAttention(4))


def test_magic_options_and_cell(monkeypatch, tiny_tokenizer):
    lens = lv.Lens(models.build("gpt2"), tiny_tokenizer)
    monkeypatch.setitem(magic._LENSES, None, lens)
    ex = magic.lensviz_magic('--target " Paris" --segments "|||"', "I like Italy.||| I visited the city of\n")
    assert ex.trace.segments == [(0, len(lens.encode("I like Italy.")[0])), (ex.trace.segments[1][0], len(ex.trace))]
    assert ex.summary["target"] == " Paris"
    with pytest.raises(lv.LensvizError, match="unknown"):
        magic.parse_line("--colour red")

    class FakeIPython:
        def register_magic_function(self, fn, magic_kind, magic_name):
            self.registered = (fn, magic_kind, magic_name)

    ip = FakeIPython()
    lv.load_ipython_extension(ip)
    assert ip.registered[1:] == ("cell", "lensviz")


@pytest.mark.slow
def test_initial_state_is_small_for_a_long_prompt(smol):
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)
    ids = smol.tokenizer(text)["input_ids"][:256]
    ex = Explorer(smol, smol.tokenizer.decode(ids))
    assert len(ex.tokens) == 256
    assert state_bytes(ex) <= 1_000_000
