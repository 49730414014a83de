"""A throw-away Voilà server for browser tests: the same isolated home, kernelspec and temporary copy
of the notebooks as LabServer, served by ``python -m voila`` on 127.0.0.1.

    with VoilaServer(folder, notebook="explorer.ipynb") as v:
        page.goto(v.page_url)
"""
from __future__ import annotations

import socket
import sys

from harness.browser import LabServer


class VoilaServer(LabServer):
    APPS = {"voila": "voila"}

    def __init__(self, folder, notebook: str, **kw):
        super().__init__(folder, app="voila", **kw)
        self.notebook, self.name = notebook, "voila"

    @property
    def page_url(self) -> str:
        return self.url                          # a single notebook is served at the root

    def _argv(self) -> list[str]:
        return [sys.executable, "-m", "voila", str(self.root / self.notebook), "--no-browser",
                f"--port={self.port}", "--Voila.ip=127.0.0.1", "--show_tracebacks=True",
                "--KernelSpecManager.ensure_native_kernel=False", "--theme=light"] + self.extra_args

    def _wait_ready(self):
        def ready():
            if "Voilà is running at" not in self.log() and "Voila is running at" not in self.log():
                return False
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        self._wait(ready, "did not start")
