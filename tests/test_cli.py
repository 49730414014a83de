"""The `lensviz` command (lensviz/cli.py) and `python -m lensviz.demo`: `lensviz export` writes one
offline Explorer page for a prompt on a local model folder and prints its path; bad input exits 1 with
a clear message; the demo on the embedded model prints its summary and writes lensviz-demo.html."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lensviz as lv
from lensviz import cli
from tests import models
from tests.conftest import PROMPT

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    models.build("llama", dtype=torch.float32).save_pretrained(path)
    models.tokenizer().save_pretrained(path)
    return path


def _state(page: Path) -> dict:
    """The Explorer state embedded in an exported page (base64 of gzip of JSON)."""
    import base64
    import gzip
    import re

    blob = re.search(r'id="lv-data"[^>]*>([^<]+)<', page.read_text())
    return json.loads(gzip.decompress(base64.b64decode(blob.group(1))))["state"]


def test_export_writes_a_page_for_a_local_model(folder, tmp_path, capsys):
    out = tmp_path / "page.html"
    assert cli.main(["export", PROMPT, "--target", " Paris", "--model", str(folder), "-o", str(out), "-q"]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out.resolve()}" in said and "tiny-llama" in said and "target ' Paris'" in said
    state = _state(out)
    assert state["model_name"] == "tiny-llama" and state["target"] == " Paris"
    assert state["tokens"] == lv.Lens(models.build("llama"), models.tokenizer()).trace(PROMPT).tokens
    assert str(folder.parent) not in out.read_text()        # the folder's name, not where it lies


def test_the_command_runs_as_a_module_too(folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    got = subprocess.run([sys.executable, "-m", "lensviz.cli", "export", "Paris is", "--model", str(folder),
                          "-o", "p.html", "-q"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "p.html").stat().st_size > 10_000 and "wrote" in got.stdout
    version = subprocess.run([sys.executable, "-m", "lensviz.cli", "--version"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert version.stdout.strip() == f"lensviz {lv.__version__}"


def test_bad_input_exits_1_with_a_clear_message(tmp_path, capsys):
    assert cli.main(["export", "hi", "--model", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.html")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lensviz: error: no model folder at") and not (tmp_path / "x.html").exists()
    with pytest.raises(SystemExit) as stop:
        cli.main(["export"])                                 # argparse: PROMPT is required
    assert stop.value.code == 2
    with pytest.raises(SystemExit):
        cli.main([])                                         # a subcommand is required


def test_demo_runs_on_a_given_model_and_writes_its_page(folder, tmp_path, capsys):
    out = tmp_path / "demo.html"
    assert cli.main(["demo", "I like Italy and France. I visited", " Paris", "--model", str(folder), "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert said.startswith("Lens('tiny-llama', LlamaForCausalLM")
    assert f"wrote the Explorer page {out.resolve()}" in said
    assert _state(out)["target"] == " Paris"


@pytest.mark.slow
def test_python_m_lensviz_demo_writes_lensviz_demo_html(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "TQDM_DISABLE": "1"}
    got = subprocess.run([sys.executable, "-m", "lensviz.demo"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    lines = got.stdout.splitlines()
    assert lines[0].startswith("Lens('SmolLM2-135M-Instruct (embedded)', LlamaForCausalLM, arch='llama', layers=30")
    assert any(line.startswith("next token: ' Venice'") for line in lines)
    page = tmp_path / "lensviz-demo.html"
    assert lines[-1] == f"wrote the Explorer page {page.resolve()} (offline, one file): open it in a browser"
    state = _state(page)
    assert state["model_name"] == "SmolLM2-135M-Instruct (embedded)" and state["target"] == " Florence"
    assert "site-packages" not in page.read_text()
