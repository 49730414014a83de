"""The browser harness shared by tests/browser and benchmarks/bench_widget.py: a throw-away JupyterLab /
Notebook 7 server, page helpers, and the headless Chromium to drive them with.

    with LabServer("path/to/notebooks") as lab:            # JupyterLab  (lab.url + "lab/tree/x.ipynb")
    with LabServer(folder, app="notebook") as lab:         # Notebook 7  (lab.url + "notebooks/x.ipynb")

The server listens on a free 127.0.0.1 port with token auth, runs as root if need be, and keeps *all*
Jupyter state (config, data, runtime, settings, workspaces, IPython, matplotlib) in a temporary home
that is deleted on stop. It serves a temporary copy of the given folder (Lab autosaves into its root).
Kernels run in this interpreter (``sys.executable``, the venv) with the repository root on PYTHONPATH,
so ``import lensviz`` and ``from tests import models`` both work in a notebook; ``kernel_python=`` runs
them in another environment's interpreter instead, isolated (``python -I``: no PYTHONPATH, no current
folder on sys.path), e.g. a fresh virtual environment with lensviz installed from its wheel.
The kernelspec has its own name (``KERNEL_NAME``), so no ``python3`` kernelspec of a virtual
environment (which wins over ours under JUPYTER_PREFER_ENV_PATH=1) can stand in for it.

No news, no update checks, no extension manager talking to PyPI, no notifications: nothing but
127.0.0.1. Chromium (Debian's /usr/bin/chromium, `CHROMIUM`) runs with `CHROMIUM_ARGS`: no sandbox
(root in containers), no GPU, no background networking, and every host name but localhost unresolvable.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("LENSVIZ_CHROMIUM", "/usr/bin/chromium")   # override only to test the browser set-up
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 # every non-local host name fails inside Chromium: no DNS query leaves the machine
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1"]
KERNEL_DISPLAY_NAME = "Python 3 (ipykernel)"
KERNEL_NAME = "lensviz-test"     # not "python3": a venv's share/jupyter/kernels/python3 would shadow it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> bool:
    """True when `url` answers 200 (any connection error: False)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


class Server:
    """What every throw-away server of the tests shares: a process (`proc`) writing to `log_path`,
    waiting until it is ready, and stopping it with the processes it started (kernels)."""

    name = "server"
    startup_timeout = 90.0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, AttributeError):
            return ""

    def _wait(self, ready, what: str) -> None:
        """Poll `ready()` until it is true; RuntimeError when the process exits, TimeoutError after
        `startup_timeout` (both with the log's tail)."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log:\n{self.log()[-3000:]}")
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: {what} within {self.startup_timeout}s; log:\n{self.log()[-3000:]}")

    def _stop_process(self):
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            import psutil
            kids = psutil.Process(proc.pid).children(recursive=True)
        except Exception:                        # noqa: BLE001  (already gone, or no psutil)
            kids = []
        if proc.poll() is None:
            proc.terminate()                     # SIGTERM: a server shuts its kernels down itself
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for k in kids:                           # leftovers (kernels), ours by pid only
            try:
                if k.is_running():
                    k.kill()
            except Exception:                    # noqa: BLE001
                pass
        self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


@contextlib.contextmanager
def server_pool(request, describe=lambda s: s.name):
    """The list a server fixture appends what it starts to: every server is stopped when the test
    ends, and its log printed (its last 4000 characters) when the test failed."""
    servers = []
    try:
        yield servers
    finally:
        rep = getattr(request.node, "rep_call", None)
        for s in servers:
            if rep is not None and rep.failed:
                print(f"\n----- {describe(s)} log -----\n{s.log()[-4000:]}")
            s.stop()


class LabServer(Server):
    """Start with ``start()`` (or ``with``), stop with ``stop()``. Exposes ``url`` (ends in "/"),
    ``token``, ``root`` (the served copy, a Path), ``home``, ``app`` and ``log_path``."""

    APPS = {"lab": "jupyterlab", "notebook": "notebook"}

    def __init__(self, folder: str | os.PathLike | None = None, app: str = "lab", *,
                 startup_timeout: float = 90.0, tmp_parent: str | os.PathLike | None = None,
                 extra_args: list[str] | None = None, kernel_python: str | os.PathLike | None = None,
                 kernel_env: dict[str, str] | None = None):
        if app not in self.APPS:
            raise ValueError(f"app must be one of {sorted(self.APPS)}, not {app!r}")
        self.kernel_python = None if kernel_python is None else str(kernel_python)
        self.kernel_env = dict(kernel_env or {})
        self.app, self.folder, self.startup_timeout = app, folder, startup_timeout
        self.name = f"{app} server"
        self.tmp_parent, self.extra_args = tmp_parent, list(extra_args or [])
        self.token = "lensviz-test-" + os.urandom(8).hex()
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.home = self.root = self.log_path = None

    # ---------------------------------------------------------------- set-up
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def _make_home(self) -> dict:
        self.home = Path(tempfile.mkdtemp(prefix=f"lv-{self.app}home-", dir=self.tmp_parent))
        h = self.home
        self.root = h / "root"
        if self.folder is not None:
            shutil.copytree(self.folder, self.root,
                            ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
        else:
            self.root.mkdir()
        # Notifications: no news fetch, no update check (same plugin in Lab and Notebook 7).
        notif = h / "lab-settings" / "@jupyterlab" / "apputils-extension"
        notif.mkdir(parents=True)
        (notif / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True}))
        # Render every cell (no windowing): off-screen widgets stay in the DOM, laid out.
        nbset = h / "lab-settings" / "@jupyterlab" / "notebook-extension"
        nbset.mkdir(parents=True)
        (nbset / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
        # One kernelspec of its own name, pinned to this interpreter (the venv) with the repo root
        # importable, or to `kernel_python`, isolated.
        ks = h / "data" / "kernels" / KERNEL_NAME
        ks.mkdir(parents=True)
        if self.kernel_python is None:
            pp = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
            python, kernel_env = [sys.executable], {"PYTHONPATH": pp}
        else:
            python, kernel_env = [self.kernel_python, "-I"], {}
        (ks / "kernel.json").write_text(json.dumps({
            "argv": python + ["-Xfrozen_modules=off", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": KERNEL_DISPLAY_NAME, "language": "python",
            "env": {**kernel_env, **self.kernel_env}, "metadata": {"debugger": False}}))
        for d in ("config", "runtime", "ipython", "mpl", "workspaces"):
            (h / d).mkdir()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("JUPYTER", "JPY_", "IPYTHON", "MPL"))
               and not (self.kernel_python is not None and k == "PYTHONPATH")}
        env.update(JUPYTER_CONFIG_DIR=str(h / "config"), JUPYTER_DATA_DIR=str(h / "data"),
                   JUPYTER_RUNTIME_DIR=str(h / "runtime"), JUPYTER_PLATFORM_DIRS="1",
                   JUPYTER_PREFER_ENV_PATH="1", IPYTHONDIR=str(h / "ipython"), MPLCONFIGDIR=str(h / "mpl"),
                   JUPYTERLAB_SETTINGS_DIR=str(h / "lab-settings"),
                   JUPYTERLAB_WORKSPACES_DIR=str(h / "workspaces"),
                   MPLBACKEND="module://matplotlib_inline.backend_inline", PYTHONUNBUFFERED="1")
        return env

    def _argv(self) -> list[str]:
        argv = [sys.executable, "-m", self.APPS[self.app], "--no-browser", "--ip=127.0.0.1",
                f"--port={self.port}", "--port-retries=0", f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={self.root}", "--allow-root",
                "--KernelSpecManager.ensure_native_kernel=False",
                f"--MultiKernelManager.default_kernel_name={KERNEL_NAME}",
                "--ServerApp.shutdown_no_activity_timeout=0"]
        if self.app == "lab":
            argv += ["--LabApp.extension_manager=readonly",     # the default 'pypi' manager talks to PyPI
                     "--LabApp.news_url=None",
                     "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                     "--LabApp.expose_app_in_browser=True"]
        else:
            argv += ["--JupyterNotebookApp.expose_app_in_browser=True"]
        return argv + self.extra_args

    def start(self) -> "LabServer":
        env = self._make_home()
        self.log_path = self.home / "server.log"
        last = None
        for _ in range(3):                       # a free port can be taken in between: retry
            self.port = free_port()
            self._log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(self._argv(), stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, cwd=self.root,
                                         start_new_session=True)
            try:
                self._wait_ready()
                return self
            except Exception as e:               # noqa: BLE001
                last = e
                self._stop_process()
                if "already in use" not in self.log():
                    break
        self.cleanup()
        raise RuntimeError(f"{self.app} server did not start: {last}")

    def _wait_ready(self):
        self._wait(lambda: http_ok(f"{self.url}api/status?token={self.token}"), "no 200 from /api/status")

    def api(self, path: str, method: str = "GET", body=None):
        """Call the REST API (``lab.api("api/sessions")``) and return the decoded JSON (or None)."""
        req = urllib.request.Request(f"{self.url}{path.lstrip('/')}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read()
        return json.loads(data) if data else None

    def notebook_url(self, name: str) -> str:
        """The page that opens notebook ``name`` (relative to ``root``) in this server's front end."""
        path = urllib.request.pathname2url(str(name))
        front = "lab/tree" if self.app == "lab" else "notebooks"
        return f"{self.url}{front}/{path.lstrip('/')}?token={self.token}"

    def home_url(self) -> str:
        return f"{self.url}{'lab' if self.app == 'lab' else 'tree'}?token={self.token}"

    # ---------------------------------------------------------------- tear-down
    def cleanup(self):
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)

    def stop(self, keep_home: bool = False):
        self._stop_process()
        if not keep_home:
            self.cleanup()



# -------------------------------------------------------------------- notebooks
def write_notebook(path: str | os.PathLike, cells: list[str], **metadata) -> Path:
    """Write a code-cell notebook (sources as strings; a cell starting with "%%md" becomes markdown)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata.update({"kernelspec": {"name": KERNEL_NAME, "display_name": KERNEL_DISPLAY_NAME,
                                       "language": "python"},
                        "language_info": {"name": "python"}}, **metadata)
    for src in cells:
        if src.startswith("%%md\n"):
            nb.cells.append(nbformat.v4.new_markdown_cell(src[len("%%md\n"):]))
        else:
            nb.cells.append(nbformat.v4.new_code_cell(src))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


# -------------------------------------------------------------------- page helpers
# JS run in the page (needs expose_app_in_browser, set above): the current notebook's kernel state
# as the front end sees it, e.g. "connected idle".
# Records, per Explorer on the page, when its view started, when its first render was complete (token
# strip, logit-lens grid and head grid drawn) and when its first attention map appeared, into
# window.__lvTimes ({start, first, tokens, cells, map}, performance.now() ms). Evaluate before the cell runs.
RENDER_TIMES_JS = """() => {
  window.__lvTimes = [];
  const seen = new Map();
  const tick = () => {
    document.querySelectorAll('.lv-explorer').forEach((el) => {
      if (!seen.has(el)) { const r = {start: performance.now()}; seen.set(el, r); window.__lvTimes.push(r); }
      const r = seen.get(el);
      if (r.first === undefined && el.querySelector('.lv-grid .lv-cell') && el.querySelector('.lv-token')
          && el.querySelector('.lv-norm-cell')) { r.first = performance.now(); r.tokens = el.querySelectorAll('.lv-token').length;
          r.cells = el.querySelectorAll('.lv-grid .lv-cell').length; }
      if (r.map === undefined && el.querySelector('canvas.lv-map-forward')) r.map = performance.now();
    });
    requestAnimationFrame(tick);
  };
  tick();
}"""


_KERNEL_STATE_JS = """() => {
  const app = window.jupyterapp; if (!app) return 'no-app';
  const w = app.shell.currentWidget; const sc = w && w.sessionContext;
  const k = sc && sc.session && sc.session.kernel;
  return k ? `${k.connectionStatus} ${k.status}` : 'no-kernel';
}"""


def wait_kernel_idle(page, timeout: float = 120_000):
    """Wait until the open notebook's kernel is connected and idle *as the front end sees it*.

    JupyterLab: the status bar reads "Python 3 (ipykernel) | Idle" (pitfall 3: the toolbar's
    execution indicator says idle too early and a Run All then does nothing). Notebook 7 has no
    status bar, so both front ends are also checked through window.jupyterapp."""
    from playwright.sync_api import expect
    if "/lab" in page.url:
        expect(page.locator(".jp-StatusBar-TextItem", has_text="| Idle")).to_have_text(
            re.compile(r"\| Idle$"), timeout=timeout)
    page.wait_for_function(f"({_KERNEL_STATE_JS})() === 'connected idle'", timeout=timeout, polling=200)


def open_notebook(page, lab: LabServer, name: str, timeout: float = 120_000):
    """Open ``name`` in ``lab``'s front end and wait until its kernel is connected and idle."""
    page.goto(lab.notebook_url(name))
    page.locator(".jp-Notebook").first.wait_for(state="visible", timeout=timeout)
    wait_kernel_idle(page, timeout)
    return page


def run_all(page, timeout: float = 120_000, check_errors: bool = True):
    """Run all cells through the Run menu (command runmenu:run-all, both front ends), after the
    kernel is idle (pitfalls 2-3). Returns once the run is over: the first code cell has an
    execution count and no cell is queued/running ("[*]"). With ``check_errors`` an error output
    (traceback) anywhere in the notebook raises AssertionError with its text. Widget views may
    still be rendering when this returns: use expect() on them."""
    from playwright.sync_api import expect
    wait_kernel_idle(page, timeout)
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()
    prompts = page.locator(".jp-CodeCell .jp-InputPrompt")
    expect(prompts.first).to_have_text(re.compile(r"\[\d+\]"), timeout=timeout)
    page.wait_for_function(
        """() => ![...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
                  .some(p => p.textContent.includes('[*]'))""", timeout=timeout, polling=200)
    wait_kernel_idle(page, timeout)
    if check_errors:
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
        if errors.count():
            raise AssertionError("a cell raised:\n" + "\n---\n".join(errors.all_inner_texts()))
    return page
