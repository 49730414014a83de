"""Bad input never escapes as a traceback from inside torch or transformers: every case below raises
`lv.LensvizError` (a ValueError) from lensviz's own validation, with a message that says what was
wrong. Each case checks the exception type, a substring of the message, and that no frame of the
traceback lies in torch or transformers (the input was rejected before reaching them)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import lensviz as lv
from tests import models
from tests.conftest import PROMPT

LENSVIZ_DIR = os.path.dirname(lv.__file__)
ACCESSORS = ("resid", "resid_grad", "attention", "reversed_attention", "head_outputs", "mlp_activations",
             "mlp_output_grad", "qkv", "attention_scaling", "head_output_grad")
GRAD_ACCESSORS = ("resid_grad", "reversed_attention", "mlp_output_grad", "head_output_grad")


def expect_error(fn, *substrings, cls=lv.LensvizError):
    """Call fn; it must raise `cls` with every substring in its message, from lensviz code only."""
    with pytest.raises(cls) as info:
        fn()
    err = info.value
    assert isinstance(err, ValueError)
    msg = str(err)
    for s in substrings:
        assert s.lower() in msg.lower(), f"{s!r} not in message {msg!r}"
    frames = [entry.path for entry in info.traceback]
    foreign = [str(p) for p in frames if "site-packages" in str(p) or "/torch/" in str(p)]
    assert not foreign, f"raised through third-party code: {foreign}"
    assert str(frames[-1]).startswith(LENSVIZ_DIR), f"raised outside lensviz: {frames[-1]}"
    # no torch/transformers traceback chained underneath
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    return err


@pytest.fixture(scope="module", params=models.FAMILIES)
def traced(request):
    """(lens, trace with gradients, trace without) for each tiny family, shared by the module."""
    lens = lv.Lens(models.build(request.param), models.tokenizer())
    return lens, lens.trace(PROMPT, target=" Paris"), lens.trace(PROMPT, backward=False)


@pytest.fixture(scope="module")
def llama():
    return lv.Lens(models.build("llama"), models.tokenizer())


# prompts ------------------------------------------------------------------------------------------
BAD_PROMPTS = [
    pytest.param(None, "prompt must be a non-empty str", id="None"),
    pytest.param(7, "got int", id="int"),
    pytest.param(b"I like Italy", "got bytes", id="bytes"),
    pytest.param(3.5, "got float", id="float"),
    pytest.param("", "prompt is empty", id="empty-str"),
    pytest.param([], "(empty)", id="empty-list"),
    pytest.param((), "(empty)", id="empty-tuple"),
    pytest.param(["I like", 3], "segment 1 must be a str, got int", id="list-with-int"),
    pytest.param(["I like", None], "segment 1 must be a str, got NoneType", id="list-with-None"),
    pytest.param([b"I like"], "segment 0 must be a str, got bytes", id="list-with-bytes"),
    pytest.param(["I like", ""], "segment 1 is empty", id="list-with-empty-segment"),
    pytest.param(["", ""], "prompt is empty", id="list-of-empties"),
    pytest.param([["I like"]], "segment 0 must be a str, got list", id="nested-list"),
    pytest.param({"text": "I like"}, "got dict", id="dict"),
    pytest.param(torch.tensor([1, 2, 3]), "got Tensor", id="tensor-of-ids"),
    pytest.param(" Paris" * 100, "this model accepts at most 64", id="over-long"),
    pytest.param(["I like"] + [" Paris"] * 80, "this model accepts at most 64", id="over-long-segments"),
]


@pytest.mark.parametrize("prompt, message", BAD_PROMPTS)
def test_bad_prompt(llama, prompt, message):
    expect_error(lambda: llama.trace(prompt), message)


def test_prompt_length_boundary(llama):
    """Exactly max_tokens tokens is accepted; one more is refused (the limit is the model's positions)."""
    assert llama.max_tokens == 64
    segs = ["I"] + [" Paris"] * 63
    ids, spans = llama.encode(segs)
    assert len(ids) == 64 and len(spans) == 64
    assert llama.trace(segs, backward=False).logits.shape[0] == 64
    expect_error(lambda: llama.trace(segs + [" Paris"]), "65 tokens long", "at most 64")


def test_max_tokens_override(tiny_tokenizer):
    lens = lv.Lens(models.build("gpt2"), tiny_tokenizer, max_tokens=5)
    assert lens.max_tokens == 5
    expect_error(lambda: lens.trace(PROMPT), "at most 5")


@pytest.mark.parametrize("value", [0, -3, 2.5, "64", True])
def test_bad_max_tokens(tiny_tokenizer, value):
    expect_error(lambda: lv.Lens(models.build("gpt2"), tiny_tokenizer, max_tokens=value),
                 "max_tokens must be a positive int")


# targets ------------------------------------------------------------------------------------------
BAD_TARGETS = [
    pytest.param("", "target is an empty string", id="empty-str"),
    pytest.param(1.5, "got float", id="float"),
    pytest.param(2.0, "got float", id="integral-float"),
    pytest.param([" Paris"], "got list", id="list"),  # a list of ids is a multi-token target; of str, not
    pytest.param((" Paris",), "got tuple", id="tuple"),
    pytest.param(b" Paris", "got bytes", id="bytes"),
    pytest.param(320, "outside the vocabulary [0, 319]", id="vocab-size"),
    pytest.param(10**9, "outside the vocabulary", id="huge-int"),
    pytest.param(-1, "target id -1 is outside the vocabulary", id="negative"),
    pytest.param(True, "got True", id="True"),
    pytest.param(False, "got False", id="False"),
    pytest.param(torch.tensor(3.0), "got tensor(3.)", id="float-tensor"),
    pytest.param(torch.tensor([1, 2]), "target must be a str", id="2-elem-tensor"),
    pytest.param(np.int64(-2), "target id -2 is outside", id="numpy-negative"),
]


@pytest.mark.parametrize("target, message", BAD_TARGETS)
def test_bad_target(llama, target, message):
    expect_error(lambda: llama.trace(PROMPT, target=target), message)


def test_integer_like_targets_are_accepted(llama):
    """numpy ints and 0-d integer tensors are token ids too (e.g. target=trace.input_ids[3])."""
    tr = llama.trace(PROMPT, target=5, backward=False)
    assert llama.trace(PROMPT, target=np.int64(5), backward=False).target_id == 5
    assert llama.trace(PROMPT, target=torch.tensor(5), backward=False).target_id == 5
    assert tr.target_id == 5
    assert llama.trace(PROMPT, target=[5, 7], backward=False).target_ids == [5, 7]  # a multi-token target by id


# trace keywords -----------------------------------------------------------------------------------
BAD_KWARGS = [
    pytest.param(dict(backward=1), "backward must be True or False, got 1", id="backward-int"),
    pytest.param(dict(backward="yes"), "backward must be True or False", id="backward-str"),
    pytest.param(dict(backward=None), "backward must be True or False, got None", id="backward-None"),
    pytest.param(dict(backward=np.bool_(True)), "backward must be True or False", id="backward-numpy"),
    pytest.param(dict(gradient="nonsense"), "gradient must be one of", id="gradient-nonsense"),
    pytest.param(dict(gradient=None), "gradient must be one of", id="gradient-None"),
    pytest.param(dict(gradient=["standard"]), "gradient must be one of", id="gradient-list"),
    pytest.param(dict(patches="SegmentMask"), "patches must be a tuple or list", id="patches-str"),
    pytest.param(dict(patches=None), "patches must be a tuple or list", id="patches-None"),
    pytest.param(dict(patches=object()), "patches must be a tuple or list", id="patches-object"),
    pytest.param(dict(patches=("HeadAblation",)), "patches must be lensviz patches", id="patches-of-str"),
    pytest.param(dict(patches=[None]), "patches must be lensviz patches", id="patches-of-None"),
    pytest.param(dict(patches=(lv.HeadAblation(3, 0),)), "layer 3 is out of range", id="patch-layer"),
    pytest.param(dict(patches=(lv.HeadAblation(0, 4),)), "head 4 is out of range", id="patch-head"),
]


@pytest.mark.parametrize("kwargs, message", BAD_KWARGS)
def test_bad_trace_keyword(llama, kwargs, message):
    expect_error(lambda: llama.trace(PROMPT, **kwargs), message)


def test_backward_inside_inference_mode(llama):
    with torch.inference_mode():
        expect_error(lambda: llama.trace(PROMPT), "inference_mode", "backward=False")
        # forward only is fine there
        assert llama.trace(PROMPT, backward=False).logits.shape[0] == len(llama.encode(PROMPT)[0])


def test_tokenizer_vocab_mismatch(tiny_tokenizer):
    """A tokenizer that is not the model's emits ids beyond the model's vocabulary: refused before the
    embedding would raise an IndexError."""
    cfg = models.config("llama")
    cfg.vocab_size = 40
    from transformers import AutoModelForCausalLM

    lens = lv.Lens(AutoModelForCausalLM.from_config(cfg), tiny_tokenizer)
    expect_error(lambda: lens.trace(PROMPT), "outside the model's vocabulary [0, 39]", "tokenizer")
    expect_error(lambda: lens.trace("12+3=", target=" Paris"), "the target ' Paris'", "outside the model's vocabulary")
    assert lens.trace("12+3=", target="4", backward=False).target_id == 20  # in-range ids still work


# layers, sites and gradients on a trace ------------------------------------------------------------
BAD_LAYERS = [
    ("n_layers", "out of range"),
    ("-n_layers-1", "out of range"),
    (1.0, "must be an int"),
    ("1", "must be an int"),
    (None, "must be an int"),
    (True, "must be an int"),
    (False, "must be an int"),
    (torch.tensor(1.0), "must be an int"),
    (torch.tensor([0, 1]), "must be an int"),
    (slice(0, 2), "must be an int"),
]


@pytest.mark.parametrize("accessor", ACCESSORS)
def test_bad_layer(traced, accessor):
    lens, tr, _ = traced
    n = lens.n_layers
    for layer, message in BAD_LAYERS:
        layer = {"n_layers": n, "-n_layers-1": -n - 1}.get(layer, layer) if isinstance(layer, str) else layer
        err = expect_error(lambda: getattr(tr, accessor)(layer), "layer", message)
        if message == "out of range":
            assert f"{-n}..{n - 1} allowed" in str(err)
    # and the valid extremes work
    for layer in (0, n - 1, -n, -1):
        getattr(tr, accessor)(layer)


@pytest.mark.parametrize("accessor", ["resid", "resid_grad"])
@pytest.mark.parametrize("site", ["middle", "Post", "", None, 0, ["pre"]])
def test_bad_site(traced, accessor, site):
    _, tr, _ = traced
    expect_error(lambda: getattr(tr, accessor)(0, site), "site must be one of ('pre', 'mid', 'post')")


@pytest.mark.parametrize("accessor", GRAD_ACCESSORS)
def test_gradients_of_forward_only_trace(traced, accessor):
    _, tr, fwd = traced
    assert fwd.has_backward is False and tr.has_backward is True
    expect_error(lambda: getattr(fwd, accessor)(0), "backward=False", "gradients were not recorded")
    # the forward-only trace still answers forward questions, equal to the full trace's
    assert torch.equal(fwd.resid(1), tr.resid(1))
    assert torch.equal(fwd.attention(1), tr.attention(1))


@pytest.mark.parametrize("site", ["pre", "mid", "post"])
def test_forward_only_resid_grad_every_site(traced, site):
    _, _, fwd = traced
    expect_error(lambda: fwd.resid_grad(-1, site=site), "backward=False")


# Lens.weight ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    pytest.param((0, "nonsense"), "part must be one of", id="part"),
    pytest.param((0, None), "part must be one of", id="part-None"),
    pytest.param((0, "blocks"), "part must be one of", id="model-level-part"),
    pytest.param((3, "o_proj"), "layer 3 is out of range", id="layer"),
    pytest.param(("0", "o_proj"), "layer must be an int", id="layer-str"),
    pytest.param((0, "o_proj", "nonsense"), "has no parameter 'nonsense'", id="name"),
])
def test_bad_weight(traced, args, message):
    lens, _, _ = traced
    expect_error(lambda: lens.weight(*args), message)


# building a Lens -----------------------------------------------------------------------------------
def _unsupported_models():
    import transformers as tf

    return {
        "bert": tf.BertForMaskedLM(tf.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32)),
        "t5": tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                        num_heads=2)),
        "mamba": tf.MambaForCausalLM(tf.MambaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                                                    state_size=4)),
    }


@pytest.mark.parametrize("kind", ["bert", "t5", "mamba"])
def test_unsupported_model(tiny_tokenizer, kind):
    model = _unsupported_models()[kind]
    err = expect_error(lambda: lv.Lens(model, tiny_tokenizer), f"model_type '{kind}'",
                       cls=lv.UnsupportedModelError)
    for family in ("gpt2", "llama", "qwen2", "gpt_neox"):
        assert family in str(err)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_bare_backbone(tiny_tokenizer, family):
    from transformers import AutoModel

    backbone = AutoModel.from_config(models.config(family))
    err = expect_error(lambda: lv.Lens(backbone, tiny_tokenizer), "AutoModelForCausalLM", "LM head",
                       cls=lv.UnsupportedModelError)
    assert type(backbone).__name__ in str(err)


def test_bad_lens_arguments(tiny_tokenizer):
    from transformers import PreTrainedTokenizerFast

    model = models.build("llama")
    expect_error(lambda: lv.Lens(None, tiny_tokenizer), "needs a Hugging Face model", "got NoneType")
    expect_error(lambda: lv.Lens("gpt2", tiny_tokenizer), "needs a Hugging Face model", "got str")
    expect_error(lambda: lv.Lens(torch.nn.Linear(2, 2), tiny_tokenizer), "with a .config", "got Linear")
    expect_error(lambda: lv.Lens(type(model), tiny_tokenizer), "needs a Hugging Face model", "got type")
    expect_error(lambda: lv.Lens(model, None), "needs the model's tokenizer", "got NoneType")
    expect_error(lambda: lv.Lens(model, "gpt2"), "needs the model's tokenizer", "got str")
    expect_error(lambda: lv.Lens(model, PreTrainedTokenizerFast), "tokenizer instance", "got the class")
    with pytest.raises(TypeError):  # a missing argument is a Python error, not bad input
        lv.Lens(model)


# loading -------------------------------------------------------------------------------------------
BAD_LOADS = [
    pytest.param(("/no/such/folder",), {}, "no model folder at '/no/such/folder'", id="missing-folder"),
    pytest.param(("./no/such/folder",), {}, "no model folder", id="missing-relative-folder"),
    pytest.param((Path("/no/such/folder"),), {}, "no model folder", id="missing-Path"),
    pytest.param(("",), {}, "must be a hub id or a folder path, got ''", id="empty"),
    pytest.param(("   ",), {}, "must be a hub id or a folder path", id="blank"),
    pytest.param((123,), {}, "must be a hub id or a folder path, got 123", id="int"),
    pytest.param((["gpt2"],), {}, "must be a hub id or a folder path", id="list"),
    pytest.param((b"gpt2",), {}, "must be a hub id or a folder path", id="bytes"),
    pytest.param(("gpt2",), {"dtype": 5}, "dtype must be a torch dtype", id="dtype-int"),
    pytest.param(("gpt2",), {"dtype": "float99"}, "dtype must be a torch dtype", id="dtype-name"),
    pytest.param(("gpt2",), {"progress": "yes"}, "progress must be True or False", id="progress"),
]


@pytest.mark.parametrize("args, kwargs, message", BAD_LOADS)
def test_bad_load(args, kwargs, message):
    expect_error(lambda: lv.load(*args, **kwargs), message)


def test_load_a_file_or_an_empty_folder(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    expect_error(lambda: lv.load(str(f)), "is a file", "gguf_file")
    expect_error(lambda: lv.load(str(tmp_path)), "could not read the config", "local folder")
