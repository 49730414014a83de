"""lv.plot figures show inline in a fresh notebook kernel with no `%matplotlib` line: the notebook is
executed with nbclient in a kernel of this interpreter (no MPLBACKEND, fresh IPython and matplotlib
config), and the cell that returns a figure has exactly one image/png output, a real PNG."""
from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

from tests.conftest import PROMPT

REPO = Path(__file__).resolve().parents[1]
CELLS = [
    "import lensviz as lv\nfrom tests import models\n"
    f"tr = lv.Lens(models.build('llama'), models.tokenizer()).trace({PROMPT!r}, target=' Paris')",
    "lv.plot.attention(tr, 1, 0)",
    "fig = lv.plot.logit_lens(tr)\nfig",
    "import matplotlib\nprint('pyplot' in ' '.join(__import__('sys').modules), matplotlib.get_backend())",
]


@pytest.fixture
def fresh_kernel(tmp_path, monkeypatch):
    """A kernelspec of its own (this interpreter, the repo importable) and no inherited plotting set-up."""
    spec = tmp_path / "kernels" / "lensviz-inline-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lensviz inline test", "language": "python",
        "env": {"PYTHONPATH": str(REPO)}}))
    for var in ("MPLBACKEND", "PYTHONSTARTUP"):
        monkeypatch.delenv(var, raising=False)
    for var, sub in (("IPYTHONDIR", "ipython"), ("MPLCONFIGDIR", "mpl"), ("JUPYTER_CONFIG_DIR", "jupyter")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    return KernelManager(kernel_name="lensviz-inline-test",
                         kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]))


def test_plot_figures_display_inline_without_matplotlib_magic(tmp_path, fresh_kernel):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    NotebookClient(nb, km=fresh_kernel, timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()
    for cell in nb.cells[1:3]:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert len(images) == 1, cell.outputs                      # shown once, as a picture
        assert base64.b64decode(images[0]["data"]["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
        assert not any(o.output_type == "error" for o in cell.outputs)
    assert nb.cells[3].outputs[0]["text"].startswith("False")      # lensviz never touched pyplot
    assert not os.environ.get("MPLBACKEND")
