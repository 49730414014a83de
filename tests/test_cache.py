"""The GGUF conversion cache (lensviz/cache.py): a stored entry reloads the very same model and
tokenizer; a truncated, corrupt or half-written entry is detected, reported with one CacheWarning and
rebuilt; an unwritable cache folder gives one warning and no crash; a lensviz / transformers version
change makes a new entry and removes the old one. The tiny models stand in for a converted GGUF file
(the cache keys on the source file's bytes, whatever they are); the last test runs lv.load() end to
end on the embedded SmolLM2."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import lensviz as lv
from lensviz import cache
from tests import models
from tests.conftest import PROMPT


@pytest.fixture
def gguf(tmp_path):
    path = tmp_path / "models" / "tiny.Q8_0.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + os.urandom(4096))
    return path


@pytest.fixture
def root(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(cache.ENV, str(folder))
    return folder


def _tiny(family="llama"):
    return models.build(family, dtype=torch.float32), models.tokenizer()


def _reload(entry):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(entry)


def _no_warnings(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error", cache.CacheWarning)
        return fn(*args)


@pytest.mark.parametrize("family", ["llama", "gpt2"])   # gpt2: tied input / output embeddings
def test_an_entry_reloads_the_same_model_and_tokenizer(family, gguf, root):
    model, tok = _tiny(family)
    model.config._name_or_path = str(gguf.parent)           # where a GGUF load leaves it
    assert _no_warnings(cache.lookup, gguf) is None          # a miss, silently
    entry = _no_warnings(cache.store, gguf, model, tok)
    assert entry.parent == root / "gguf" and entry.name.startswith("tiny.Q8_0-")
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]          # no temporary folder left
    assert _no_warnings(cache.lookup, gguf) == entry
    manifest = json.loads((entry / "entry.json").read_text())
    assert manifest["gguf_sha256"] == cache.file_sha256(gguf) and manifest["lensviz"] == lv.__version__
    config = json.loads((entry / "config.json").read_text())
    assert "_name_or_path" not in config and "quantization_config" not in config
    assert str(gguf.parent) not in (entry / "config.json").read_text()      # no path of the machine in it

    again, tok2 = _reload(entry)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(tok2(PROMPT, return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    if family == "gpt2":
        assert again.lm_head.weight.data_ptr() == again.transformer.wte.weight.data_ptr()


def test_the_cache_folder_follows_the_platform_and_the_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV, str(tmp_path / "mine"))
    assert cache.root() == tmp_path / "mine"
    monkeypatch.delenv(cache.ENV)
    monkeypatch.setattr(cache.sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.root() == tmp_path / "xdg" / "lensviz"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.root() == tmp_path / "home" / ".cache" / "lensviz"
    monkeypatch.setattr(cache.sys, "platform", "darwin")
    assert cache.root() == tmp_path / "home" / "Library" / "Caches" / "lensviz"
    monkeypatch.setattr(cache.sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert cache.root() == tmp_path / "local" / "lensviz" / "Cache"


def _damage_truncate(entry):
    w = entry / cache.WEIGHTS
    data = w.read_bytes()
    w.write_bytes(data[: len(data) - 100])


def _damage_flip(entry):          # same size, different bytes
    t = entry / "tokenizer.json"
    data = bytearray(t.read_bytes())
    data[len(data) // 2] ^= 0x01
    t.write_bytes(bytes(data))


def _damage_manifest(entry):
    (entry / "entry.json").write_text("{not json")


def _damage_missing(entry):
    (entry / "config.json").unlink()


def _damage_header(entry):         # bytes the safetensors header does not account for, manifest updated
    w = entry / cache.WEIGHTS
    with open(w, "ab") as f:
        f.write(bytes(64))
    manifest = json.loads((entry / "entry.json").read_text())
    manifest["files"][cache.WEIGHTS]["size"] = w.stat().st_size
    (entry / "entry.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, says", [
    (_damage_truncate, "truncated"), (_damage_flip, "sha256"), (_damage_manifest, "unreadable entry.json"),
    (_damage_missing, "config.json is missing"), (_damage_header, "header accounts for")],
    ids=["truncated", "flipped-byte", "bad-manifest", "missing-file", "header"])
def test_a_damaged_entry_is_detected_and_rebuilt_with_a_warning(damage, says, gguf, root):
    model, tok = _tiny()
    entry = cache.store(gguf, model, tok)
    damage(entry)
    with pytest.warns(cache.CacheWarning, match=f"damaged.*{says}") as got:
        assert cache.lookup(gguf) is None
    assert len(got) == 1 and not entry.exists()           # removed, so the next store rebuilds it
    assert _no_warnings(cache.store, gguf, model, tok) == entry
    assert _no_warnings(cache.lookup, gguf) == entry
    with torch.no_grad():
        ids = tok(PROMPT, return_tensors="pt").input_ids
        assert torch.equal(_reload(entry)[0](ids).logits, model(ids).logits)


def test_an_unwritable_cache_folder_warns_once_and_does_not_crash(gguf, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")   # unwritable even for root
    monkeypatch.setenv(cache.ENV, str(blocker))
    model, tok = _tiny()
    with pytest.warns(cache.CacheWarning, match="cannot write the model cache") as got:
        assert cache.store(gguf, model, tok) is None
        assert cache.store(gguf, model, tok) is None        # the second attempt stays quiet
        assert cache.lookup(gguf) is None
    assert len(got) == 1 and blocker.read_text().startswith("a file")


def test_a_failed_write_leaves_no_entry_and_no_temporary_folder(gguf, root, monkeypatch):
    model, tok = _tiny()

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tok, "save_pretrained", broken)
    with pytest.warns(cache.CacheWarning, match="No space left"):
        assert cache.store(gguf, model, tok) is None
    assert list((root / "gguf").iterdir()) == []
    assert _no_warnings(cache.lookup, gguf) is None


def test_a_version_change_makes_a_new_entry_and_drops_the_old(gguf, root, monkeypatch):
    model, tok = _tiny()
    old = cache.store(gguf, model, tok)
    real = cache.versions()
    monkeypatch.setattr(cache, "versions", lambda: {**real, "transformers": real["transformers"] + ".post1"})
    assert _no_warnings(cache.lookup, gguf) is None          # a miss, not damage
    new = _no_warnings(cache.store, gguf, model, tok)
    assert new != old and new.exists() and not old.exists()
    monkeypatch.setattr(cache, "versions", lambda: {**real, "lensviz": "99.0"})
    assert _no_warnings(cache.lookup, gguf) is None
    assert old.parent.is_dir()


def test_another_gguf_file_gets_its_own_entry(gguf, root):
    model, tok = _tiny()
    a = cache.store(gguf, model, tok)
    other = gguf.with_name("tiny.Q8_0.gguf.copy")
    other.write_bytes(gguf.read_bytes() + b"x")
    assert cache.lookup(other) is None
    b = cache.store(other, model, tok)
    assert a.exists() and b.exists() and a != b


def test_lv_load_asks_the_cache_only_for_a_local_gguf_file_and_not_with_cache_false(gguf, root, monkeypatch):
    from lensviz import loading

    asked = []
    monkeypatch.setattr(loading, "embedded_model_file", lambda: (gguf.parent, gguf.name))
    monkeypatch.setattr(cache, "lookup", lambda path, folder=None: asked.append(path))
    monkeypatch.setattr(cache, "store", lambda *a, **k: pytest.fail("nothing was converted, nothing to store"))
    with pytest.raises(lv.LensvizError, match="could not read the config"):   # random bytes are no GGUF file
        lv.load(progress=False, cache=False)
    assert asked == []
    with pytest.raises(lv.LensvizError, match="could not read the config"):
        lv.load(progress=False)
    assert asked == [gguf]
    with pytest.raises(lv.LensvizError):
        lv.load(str(gguf.parent), gguf_file=gguf.name, progress=False)   # a GGUF file in a local folder too
    assert asked == [gguf, gguf]
    with pytest.raises(lv.LensvizError, match="cache must be True or False"):
        lv.load(cache="yes")


@pytest.mark.slow
def test_lv_load_converts_once_then_reads_the_cache(tmp_path, monkeypatch, no_from_pretrained):
    monkeypatch.setenv(cache.ENV, str(tmp_path / "on"))
    ref = lv.load(progress=False)                            # converts and stores
    (entry,) = (tmp_path / "on" / "gguf").iterdir()
    assert (entry / cache.WEIGHTS).stat().st_size > 500e6
    no_from_pretrained.clear()
    warm = _no_warnings(lv.load, None)                       # reads safetensors + tokenizer.json
    assert no_from_pretrained == []                          # the fast read, no from_pretrained
    for lens in (ref, warm):
        assert lens.name == "SmolLM2-135M-Instruct (embedded)"
        assert repr(lens).startswith("Lens('SmolLM2-135M-Instruct (embedded)', LlamaForCausalLM")
    assert warm.model.config._name_or_path == str(entry)
    assert type(warm.model) is type(ref.model) and type(warm.tokenizer) is type(ref.tokenizer)
    assert warm.model.dtype == torch.float32 and not warm.model.training
    assert warm.model.lm_head.weight is warm.model.model.embed_tokens.weight          # tied, as converted
    assert warm.model.generation_config.to_dict() == ref.model.generation_config.to_dict()
    assert warm.tokenizer.special_tokens_map == ref.tokenizer.special_tokens_map
    t_ref, t_warm = ref.trace(PROMPT, target=" Florence"), warm.trace(PROMPT, target=" Florence")
    assert t_ref.tokens == t_warm.tokens
    assert torch.equal(t_ref.logits, t_warm.logits) and t_ref.loss == t_warm.loss
    chat = [{"role": "user", "content": "Hi"}]
    assert (ref.tokenizer.apply_chat_template(chat, tokenize=False)
            == warm.tokenizer.apply_chat_template(chat, tokenize=False))
    assert (ref.tokenizer.eos_token_id, ref.tokenizer.bos_token_id) == (warm.tokenizer.eos_token_id,
                                                                        warm.tokenizer.bos_token_id)
    half = lv.load(progress=False, dtype=torch.bfloat16)      # other dtypes load from the float32 entry
    assert half.model.dtype == torch.bfloat16 and list((tmp_path / "on" / "gguf").iterdir()) == [entry]



# the fast read of an entry (the second lv.load(), without from_pretrained) ----------------------------
def _same_model(fast, ref):
    """Everything from_pretrained gives that a user or lensviz can see, bit for bit."""
    assert type(fast) is type(ref) and fast.dtype == ref.dtype == torch.float32
    assert not fast.training and not any(m.training for m in fast.modules())
    assert fast.config.to_dict() == ref.config.to_dict()
    assert fast.config._attn_implementation == ref.config._attn_implementation
    assert fast.generation_config.to_dict() == ref.generation_config.to_dict()
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert all(p.requires_grad for p in fast.parameters())
    got, want = dict(fast.named_buffers()), dict(ref.named_buffers())
    assert list(got) == list(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in got)
    got, want = fast.state_dict(), ref.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in got)
    tied = lambda m: {(a.data_ptr() == b.data_ptr()) for a, b in [(m.get_input_embeddings().weight,  # noqa: E731
                                                                    m.get_output_embeddings().weight)]}
    assert tied(fast) == tied(ref)


@pytest.mark.parametrize("family", models.FAMILIES)
def test_read_gives_what_from_pretrained_gives(family, gguf, root):
    model, tok = _tiny(family)
    entry = cache.store(gguf, model, tok)
    fast, fast_tok = cache.read(entry)
    ref, _ = _reload(entry)
    _same_model(fast, ref)
    assert type(fast_tok) is type(tok)                     # the converted model's tokenizer class, as it was
    assert fast_tok.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert fast_tok.special_tokens_map == tok.special_tokens_map
    assert fast_tok.all_special_ids == tok.all_special_ids and fast_tok.chat_template == tok.chat_template
    assert str(fast_tok.added_tokens_decoder) == str(tok.added_tokens_decoder)
    plain = type(fast_tok).from_pretrained(entry)          # the same class, reading tokenizer.json's added tokens
    seen = lambda t: {k: str(sorted(v.items(), key=str) if isinstance(v, dict) else v)  # noqa: E731
                      for k, v in vars(t).items() if k != "_tokenizer"}
    assert seen(fast_tok) == seen(plain) and fast_tok.backend_tokenizer.to_str() == plain.backend_tokenizer.to_str()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(fast_tok(PROMPT, return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        assert torch.equal(fast(ids).logits, ref(ids).logits)
        assert torch.equal(fast(ids).logits, model(ids).logits)
    if family == "gpt2":        # tied: one parameter, so a change to one is a change to the other
        assert fast.lm_head.weight is fast.transformer.wte.weight


def test_read_declines_an_entry_it_cannot_account_for(gguf, root):
    from safetensors.torch import load_file, save_file

    model, tok = _tiny()
    entry = cache.store(gguf, model, tok)
    weights = load_file(entry / cache.WEIGHTS)
    save_file({**weights, "model.extra.weight": torch.zeros(2)}, str(entry / cache.WEIGHTS))  # unexpected
    assert cache.read(entry) is None
    del weights["model.norm.weight"]                       # missing and not tied to anything
    save_file(weights, str(entry / cache.WEIGHTS))
    assert cache.read(entry) is None
    config = json.loads((entry / "config.json").read_text())
    (entry / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    assert cache.read(entry) is None


@pytest.fixture
def no_from_pretrained(monkeypatch):
    import transformers

    calls = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        real = cls.from_pretrained
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, _real=real, **k: calls.append(a) or _real(*a, **k))
    return calls


def test_lv_load_reads_a_cached_entry_without_from_pretrained(gguf, root, monkeypatch, no_from_pretrained):
    from lensviz import loading

    model, tok = _tiny()
    entry = cache.store(gguf, model, tok)
    monkeypatch.setattr(loading, "embedded_model_file", lambda: (gguf.parent, gguf.name))
    lens = _no_warnings(lv.load, None)
    assert no_from_pretrained == [] and lens.name == loading.EMBEDDED_DISPLAY_NAME
    assert lens.model.config._name_or_path == str(entry)
    with torch.no_grad():
        ids = tok(PROMPT, return_tensors="pt").input_ids
        assert torch.equal(lens.model(ids).logits, model(ids).logits)
    double = lv.load(progress=False, dtype=torch.float64)      # another dtype: from_pretrained of the entry
    assert double.model.dtype == torch.float64 and no_from_pretrained
    no_from_pretrained.clear()
    eager = lv.load(progress=False, attn_implementation="eager")   # keyword arguments: from_pretrained too
    assert eager.model.config._attn_implementation == "eager" and no_from_pretrained


def test_the_gguf_hash_is_remembered_across_processes_until_the_file_changes(gguf, root, monkeypatch):
    model, tok = _tiny()
    entry = cache.store(gguf, model, tok)
    hashed = []
    real = cache.file_sha256
    monkeypatch.setattr(cache, "file_sha256", lambda path, remember=False: hashed.append(path) or real(path, remember))
    monkeypatch.setattr(cache, "_digests", {})             # a new process: nothing remembered in memory
    assert cache.lookup(gguf) == entry and str(gguf) not in map(str, hashed)   # its stat matched: not hashed
    book = json.loads((root / cache.HASHES).read_text())
    assert book[str(gguf)]["sha256"] == real(gguf)
    gguf.write_bytes(gguf.read_bytes()[:-1] + b"!")        # same size, new bytes, new modification time
    os.utime(gguf, ns=(os.stat(gguf).st_atime_ns, os.stat(gguf).st_mtime_ns + 10**9))
    monkeypatch.setattr(cache, "_digests", {})
    assert cache.lookup(gguf) is None and str(gguf) in map(str, hashed)   # hashed again: a new file, no entry
    (root / cache.HASHES).write_text("{broken")             # a damaged hash book is only a miss
    monkeypatch.setattr(cache, "_digests", {})
    assert cache.entry_path(gguf)[1]["gguf_sha256"] == real(gguf)


def test_a_failing_fast_read_falls_back_to_from_pretrained(gguf, root, monkeypatch, no_from_pretrained):
    from lensviz import loading

    model, tok = _tiny()
    entry = cache.store(gguf, model, tok)
    monkeypatch.setattr(loading, "embedded_model_file", lambda: (gguf.parent, gguf.name))

    def broken(entry):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(cache, "read", broken)
    lens = lv.load(progress=False)
    assert no_from_pretrained and lens.model.config._name_or_path == str(entry)
    with torch.no_grad():
        ids = tok(PROMPT, return_tensors="pt").input_ids
        assert torch.equal(lens.model(ids).logits, model(ids).logits)


def test_changing_a_fast_read_model_leaves_the_entry_as_it_was(gguf, root):
    model, tok = _tiny()
    entry = cache.store(gguf, model, tok)
    before = cache.file_sha256(entry / cache.WEIGHTS)
    fast, _ = cache.read(entry)
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(1.0)                                  # the weights are a private, copy-on-write mapping
    del fast
    assert cache.file_sha256(entry / cache.WEIGHTS) == before
    again, _ = cache.read(entry)
    with torch.no_grad():
        ids = tok(PROMPT, return_tensors="pt").input_ids
        assert torch.equal(again(ids).logits, model(ids).logits)
