"""Packaging: the wheel and the sdist built from a copy of the repository carry every front-end file
of lensviz/views/static, the licence as an SPDX expression, the one version and the `lensviz` command;
`lv.__version__` is the installed metadata; a missing view module is a clear error, not a silent gap.
(tests/browser/test_wheel.py installs the wheel into a fresh environment and opens the Explorer.)"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from importlib.metadata import version
from pathlib import Path

import pytest

import lensviz as lv

REPO = Path(__file__).resolve().parents[1]
STATIC = sorted(p.relative_to(REPO / "lensviz" / "views" / "static").as_posix()
                for p in (REPO / "lensviz" / "views" / "static").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "artifacts",
                              ".pytest_cache", "benchmarks", "notebooks", "docs")


def build(kind: str, out: Path) -> Path:
    """Build a wheel or sdist of a clean copy of the repository (no stale build/ folder), offline, with
    this environment's setuptools; returns the file."""
    src = out / "src"
    shutil.copytree(REPO, src, ignore=SKIP)
    hook = {"wheel": "build_wheel", "sdist": "build_sdist"}[kind]
    got = subprocess.run([sys.executable, "-c", f"import sys; from setuptools import build_meta as b; "
                          f"print(b.{hook}(sys.argv[1]))", str(out / "dist")],
                         cwd=src, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    return out / "dist" / got.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build("wheel", tmp_path_factory.mktemp("wheel"))


def test_the_wheel_carries_every_view_and_the_metadata(wheel):
    assert STATIC and {"explorer.js", "style.css", "tokens.js", "util.js"} <= set(STATIC)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = Parser().parsestr(z.read(f"lensviz-{lv.__version__}.dist-info/METADATA").decode())
        entry_points = z.read(f"lensviz-{lv.__version__}.dist-info/entry_points.txt").decode()
        for f in STATIC:
            assert z.read(f"lensviz/views/static/{f}") == (REPO / "lensviz" / "views" / "static" / f).read_bytes()
    assert {f"lensviz/views/static/{f}" for f in STATIC} <= names
    assert "lensviz/cache.py" in names and "lensviz/cli.py" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    assert meta["License-Expression"] == "Apache-2.0" and meta["Version"] == lv.__version__
    assert "lensviz = lensviz.cli:main" in entry_points


def test_the_sdist_carries_every_view(tmp_path):
    sdist = build("sdist", tmp_path)
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {f"lensviz/views/static/{f}" for f in STATIC} <= names and "pyproject.toml" in names


def test_the_version_comes_from_the_metadata():
    assert lv.__version__ == version("lensviz")
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'version = "{lv.__version__}"' in pyproject
    assert pyproject.count('version = "') == 1                 # one place


def test_a_missing_view_module_is_a_clear_error(monkeypatch, tmp_path):
    from lensviz.views import explorer

    static = tmp_path / "static"
    shutil.copytree(REPO / "lensviz" / "views" / "static", static)
    (static / "neurons.js").unlink()
    monkeypatch.setattr(explorer, "STATIC", static)
    with pytest.raises(lv.LensvizError, match=r"lacks its front-end files neurons\.js .*reinstall lensviz"):
        explorer.view_sources()
    monkeypatch.setattr(explorer, "STATIC", REPO / "lensviz" / "views" / "static")
    assert set(explorer.view_sources()) == set(explorer.VIEW_MODULES)
