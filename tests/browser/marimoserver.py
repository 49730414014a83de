"""A throw-away marimo server (``marimo edit`` or ``marimo run``) for browser tests.

    with MarimoServer(notebook_source, mode="edit") as mo:
        page.goto(mo.url)

It listens on a free 127.0.0.1 port with a token, serves a temporary copy of the notebook, keeps
marimo's config, cache and state in a temporary home that is deleted on stop, and never checks for
updates. The notebook runs in this interpreter (the venv) with the repository root on PYTHONPATH.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from harness.browser import REPO, Server, free_port, http_ok


def marimo_notebook(cells: list[str]) -> str:
    """A marimo notebook file from cell sources; each cell returns nothing, the last expression of a
    cell is its output. Names are shared between cells via globals, so ``refs`` lists none."""
    out = ["import marimo", "", 'app = marimo.App(width="full")', ""]
    for src in cells:
        body = "\n".join("    " + line if line else "" for line in src.splitlines())
        out += ["@app.cell", "def _():", body, ""]
    out += ['if __name__ == "__main__":', "    app.run()", ""]
    return "\n".join(out)


class MarimoServer(Server):
    MODES = ("edit", "run")

    def __init__(self, source: str, mode: str = "edit", *, name: str = "explorer_nb.py",
                 startup_timeout: float = 90.0, tmp_parent=None, theme: str = "light"):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, not {mode!r}")
        self.source, self.mode, self.file, self.startup_timeout = source, mode, name, startup_timeout
        self.name = f"marimo {mode}"
        self.tmp_parent, self.theme = tmp_parent, theme
        self.token = "lensviz-test-" + os.urandom(8).hex()
        self.proc = None
        self.port = 0
        self.home = self.log_path = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/?access_token={self.token}"

    def _env(self) -> dict:
        h = self.home
        for d in ("config", "cache", "state", "data"):
            (h / d).mkdir()
        # run every cell when the notebook opens (marimo edit), no AI, no update checks
        (h / "config" / "marimo").mkdir()
        (h / "config" / "marimo" / "marimo.toml").write_text(
            "[runtime]\nauto_instantiate = true\n\n[completion]\ncopilot = false\nactivate_on_typing = false\n"
            f'\n[display]\ntheme = "{self.theme}"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MARIMO", "XDG_"))}
        pp = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env.update(HOME=str(h), XDG_CONFIG_HOME=str(h / "config"), XDG_CACHE_HOME=str(h / "cache"),
                   XDG_STATE_HOME=str(h / "state"), XDG_DATA_HOME=str(h / "data"), PYTHONPATH=pp,
                   MARIMO_SKIP_UPDATE_CHECK="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        return env

    def start(self) -> "MarimoServer":
        self.home = Path(tempfile.mkdtemp(prefix=f"lv-marimo-{self.mode}-", dir=self.tmp_parent))
        nb = self.home / self.file
        nb.write_text(self.source)
        env = self._env()
        self.log_path = self.home / "server.log"
        self.port = free_port()
        self._log = open(self.log_path, "ab")
        argv = [sys.executable, "-m", "marimo", self.mode, str(nb), "--headless", "--host", "127.0.0.1",
                "--port", str(self.port), "--token-password", self.token]
        if self.mode == "edit":
            argv += ["--skip-update-check", "--no-sandbox"]
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=self.home, start_new_session=True)
        try:
            self._wait_ready()
        except Exception:
            self.stop()
            raise
        return self

    def _wait_ready(self):
        self._wait(lambda: http_ok(f"http://127.0.0.1:{self.port}/health"), "no answer from /health")

    def stop(self):
        if self.proc is not None:
            self._stop_process()
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None
