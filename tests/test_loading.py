"""Loading: the embedded SmolLM2 (offline), local folders of every tiny family, offline hub ids, and
architectures lensviz cannot read (refused before any weight is loaded)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import lensviz as lv
from tests import models
from tests.conftest import PROMPT

TARGET = " Paris"


def save_tiny(family: str, folder: Path, dtype=torch.float64):
    model = models.build(family, dtype=dtype)
    model.save_pretrained(folder)
    models.tokenizer().save_pretrained(folder)
    return model


# the embedded default ----------------------------------------------------------------------------
def test_embedded_smollm2(smol):
    assert smol.arch == "llama"
    assert (smol.n_layers, smol.n_heads, smol.n_kv_heads) == (30, 9, 3)
    assert (smol.d_model, smol.d_head, smol.d_mlp, smol.vocab_size) == (576, 64, 1536, 49152)
    assert smol.model.dtype == torch.float32
    assert not smol.model.training
    assert type(smol.model).__name__ == "LlamaForCausalLM"
    ids, _ = smol.encode("The capital of France is")
    assert smol.tokenizer.decode(ids) == "The capital of France is"
    tr = smol.trace("The capital of France is", backward=False)
    assert tr.logits.shape == (len(ids), 49152) and torch.isfinite(tr.logits).all()
    assert tr.target == " Paris"  # the instruct model knows this one


def test_embedded_model_file_is_found_without_network():
    from lensviz.loading import embedded_model_file

    folder, name = embedded_model_file()
    assert name.endswith(".gguf") and (folder / name).is_file()
    assert "SmolLM2" in name or "smollm2" in name.lower()


# local folders -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", models.FAMILIES)
def test_local_folder_matches_in_memory_model(tmp_path, family, tiny_tokenizer):
    model = save_tiny(family, tmp_path)
    lens = lv.load(str(tmp_path), dtype=torch.float64, progress=False)
    assert lens.arch == family.replace("_seq", "")
    assert lens.model.dtype == torch.float64 and not lens.model.training
    assert lens.encode(PROMPT)[0].tolist() == tiny_tokenizer(PROMPT)["input_ids"]  # the saved tokenizer
    ref = lv.Lens(model, tiny_tokenizer).trace(PROMPT, target=TARGET)
    tr = lens.trace(PROMPT, target=TARGET)
    assert tr.tokens == ref.tokens and tr.target_id == ref.target_id
    assert torch.equal(tr.logits, ref.logits)
    assert tr.loss == ref.loss
    for layer in range(lens.n_layers):
        assert torch.equal(tr.resid_grad(layer, "pre"), ref.resid_grad(layer, "pre"))


def test_local_folder_default_dtype_and_path_objects(tmp_path, tiny_tokenizer):
    model = save_tiny("gpt2", tmp_path)
    lens = lv.load(tmp_path, progress=False)  # a Path works too; the default dtype is float32
    assert lens.model.dtype == torch.float32
    ref = lv.Lens(model, tiny_tokenizer).trace(PROMPT, target=TARGET, backward=False)
    tr = lens.trace(PROMPT, target=TARGET, backward=False)
    assert tr.logits.dtype == torch.float32
    assert torch.allclose(tr.logits.double(), ref.logits, rtol=1e-5, atol=1e-5)


def test_local_folder_works_in_offline_mode(tmp_path, monkeypatch):
    save_tiny("llama", tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lens = lv.load(str(tmp_path), progress=False)
    assert lens.arch == "llama" and lens.n_layers == 3


def test_keyword_arguments_reach_from_pretrained(tmp_path):
    save_tiny("llama", tmp_path)
    lens = lv.load(str(tmp_path), dtype="float64", progress=False, attn_implementation="eager")
    assert lens.model.dtype == torch.float64
    assert lens.model.config._attn_implementation == "eager"
    err = pytest.raises(lv.LensvizError, lv.load, str(tmp_path), progress=False, no_such_option=1)
    assert "no_such_option" in str(err.value) and "keyword arguments" in str(err.value)


# offline hub ids ---------------------------------------------------------------------------------
def test_offline_hub_id_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(lv.LensvizError) as info:
        lv.load("gpt2-nonexistent-xyz", progress=False)
    assert time.monotonic() - start < 10, "offline mode must not retry the network"
    msg = str(info.value)
    assert "offline" in msg.lower() and "local folder" in msg
    assert "'gpt2-nonexistent-xyz'" in msg and "lv.load()" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


# folders lensviz refuses -------------------------------------------------------------------------
@pytest.fixture
def no_weight_loading(monkeypatch):
    """Any attempt to read weights or a tokenizer fails the test."""
    import transformers

    def forbidden(*args, **kwargs):
        raise AssertionError("weights were loaded for an unsupported model")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModel, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", forbidden)


def _unsupported_config(kind):
    import transformers as tf

    if kind == "bert":
        return tf.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32)
    if kind == "mamba":
        return tf.MambaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, state_size=4)
    return tf.T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)


@pytest.mark.parametrize("kind", ["bert", "mamba", "t5"])
def test_unsupported_folder_refused_before_weights(tmp_path, kind, no_weight_loading):
    _unsupported_config(kind).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not read")  # would fail loudly if anything read it
    with pytest.raises(lv.UnsupportedModelError) as info:
        lv.load(str(tmp_path), progress=False)
    msg = str(info.value)
    assert f"'{kind}'" in msg
    for family in ("gpt2", "llama", "qwen2", "gpt_neox"):
        assert family in msg


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(lv.LensvizError, match="could not read the config"):
        lv.load(str(tmp_path), progress=False)


def test_folder_without_weights(tmp_path):
    models.config("llama").save_pretrained(tmp_path)
    models.tokenizer().save_pretrained(tmp_path)
    with pytest.raises(lv.LensvizError, match="could not load") as info:
        lv.load(str(tmp_path), progress=False)
    assert "model.safetensors" in str(info.value)


def test_folder_without_tokenizer(tmp_path):
    models.build("gpt2").save_pretrained(tmp_path)
    with pytest.raises(lv.LensvizError, match="no tokenizer files"):
        lv.load(str(tmp_path), progress=False)


def test_folder_with_broken_config(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(lv.LensvizError, match="could not read the config"):
        lv.load(str(tmp_path), progress=False)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    with pytest.raises(lv.LensvizError, match="could not read the config"):
        lv.load(str(tmp_path), progress=False)


def test_load_pauses_the_garbage_collector_and_restores_it(tmp_path, monkeypatch):
    import gc

    from lensviz import loading

    save_tiny("llama", tmp_path)
    seen = []
    real = loading._load
    monkeypatch.setattr(loading, "_load", lambda *a, **k: seen.append(gc.isenabled()) or real(*a, **k))
    assert gc.isenabled()
    lv.load(str(tmp_path), progress=False)
    assert seen == [False] and gc.isenabled()                 # off while loading, on again after
    gc.disable()
    try:
        with pytest.raises(lv.LensvizError):
            lv.load(str(tmp_path / "missing"), progress=False)
        assert not gc.isenabled()                             # a caller's choice is kept, also on errors
    finally:
        gc.enable()
    with pytest.raises(lv.LensvizError):
        lv.load(str(tmp_path / "missing"), progress=False)
    assert gc.isenabled()

