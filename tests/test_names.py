"""Model names on screen (Lens.name): a hub id as it is, a local folder by its folder name, the embedded
model as "SmolLM2-135M-Instruct (embedded)" — in repr, the Explorer header, exported pages and plots,
never an absolute path of the machine."""
from __future__ import annotations

import pytest
import torch

import lensviz as lv
from lensviz.lens import display_name
from tests import models
from tests.conftest import PROMPT


@pytest.mark.parametrize("source, shown", [
    ("gpt2", "gpt2"), ("EleutherAI/pythia-70m", "EleutherAI/pythia-70m"),
    ("/home/someone/models/my-llama", "my-llama"), ("/home/someone/models/my-llama/", "my-llama"),
    ("~/models/tiny", "tiny"), ("C:\\Users\\someone\\models\\qwen-small", "qwen-small"), ("", "")])
def test_display_name(source, shown):
    assert display_name(source) == shown


def test_a_relative_folder_is_named_by_its_real_name(tmp_path, monkeypatch):
    (tmp_path / "here-model").mkdir()
    monkeypatch.chdir(tmp_path / "here-model")
    assert display_name(".") == "here-model" and display_name("./") == "here-model"


@pytest.fixture
def named(tmp_path):
    model = models.build("llama", dtype=torch.float32)
    model.config._name_or_path = str(tmp_path / "secret-home" / "tiny-llama")
    return lv.Lens(model, models.tokenizer()), str(tmp_path / "secret-home")


def test_the_name_is_used_everywhere_and_no_path(named, tmp_path):
    lens, where = named
    assert lens.name == "tiny-llama"
    assert repr(lens).startswith("Lens('tiny-llama', LlamaForCausalLM, arch='llama'") and where not in repr(lens)
    ex = lv.Explorer(lens, PROMPT, target=" Paris")
    assert ex.model_name == "tiny-llama"
    page = lv.export_html(ex, tmp_path / "page.html").read_text()
    assert '"model_name":"tiny-llama"' in _unpacked(page) and where not in page and where not in _unpacked(page)
    tr = ex.trace
    for fig in (lv.plot.attention(tr, 1, 0), lv.plot.logit_lens(tr), lv.plot.compare_maps(tr, 1, 0),
                lv.plot.head_norms(tr), lv.plot.backward_lens(tr)):
        texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
        assert texts.count("tiny-llama") == 1 and not any(where in t for t in texts)


def test_an_explicit_name_wins_and_bad_names_are_refused():
    lens = lv.Lens(models.build("gpt2"), models.tokenizer(), name="my experiment")
    assert lens.name == "my experiment" and repr(lens).startswith("Lens('my experiment', GPT2LMHeadModel")
    with pytest.raises(lv.LensvizError, match="name must be a non-empty str"):
        lv.Lens(models.build("gpt2"), models.tokenizer(), name="  ")
    unnamed = models.build("gpt2")
    unnamed.config._name_or_path = ""
    assert lv.Lens(unnamed, models.tokenizer()).name == "GPT2LMHeadModel"


def test_lv_load_of_a_local_folder_names_it_by_the_folder(tmp_path, monkeypatch):
    path = tmp_path / "somewhere" / "tiny-qwen"
    models.build("qwen2", dtype=torch.float32).save_pretrained(path)
    models.tokenizer().save_pretrained(path)
    assert lv.load(str(path), progress=False).name == "tiny-qwen"
    monkeypatch.chdir(path.parent)
    lens = lv.load("./tiny-qwen", progress=False)
    assert lens.name == "tiny-qwen" and str(tmp_path) not in repr(lens)


def _unpacked(page: str) -> str:
    import base64
    import gzip
    import re

    return gzip.decompress(base64.b64decode(re.search(r'id="lv-data"[^>]*>([^<]+)<', page).group(1))).decode()
