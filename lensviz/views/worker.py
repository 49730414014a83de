"""Runs the Explorer's model calls off the kernel's message loop, one at a time, so that a Stop message
can arrive while a run is in flight. A run reports its progress (blocks done) once it has taken longer
than `PROGRESS_AFTER` seconds and ends with `capture.Cancelled` at the next block after stop().
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from ..capture import Cancelled, watching

PROGRESS_AFTER = 1.0   # seconds before a run starts showing its progress
PROGRESS_EVERY = 0.1   # seconds between progress reports


class Worker:
    """One background thread at a time. submit(fn) runs fn() inside `capture.watching`; report(done, stage,
    seconds) is called (from the worker thread) at most every PROGRESS_EVERY s after PROGRESS_AFTER s."""

    def __init__(self, report: Callable[[int, str, float], None], background: bool = True,
                 thread_class: type = threading.Thread):
        self.report = report
        self.background = background
        self.thread_class = thread_class
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self.blocks_done = 0

    @property
    def busy(self) -> bool:
        return self._thread is not None

    @property
    def stop_requested(self) -> bool:
        """True once stop() was called for the run in flight (a job's own progress callback checks it)."""
        return self._stop.is_set()

    def stop(self) -> bool:
        """Ask the run in flight to end at its next block; False when none is running."""
        if not self.busy:
            return False
        self._stop.set()
        return True

    def _watch(self, started: float):
        last = [0.0]

        def watch(stage: str, layer: int) -> None:
            if self._stop.is_set():
                raise Cancelled(f"stopped by the user after {self.blocks_done} blocks")
            self.blocks_done += 1
            now = time.perf_counter()
            if now - started >= PROGRESS_AFTER and now - last[0] >= PROGRESS_EVERY:
                last[0] = now
                self.report(self.blocks_done, stage, now - started)

        return watch

    def _go(self, fn: Callable[[], None]) -> None:
        while fn is not None:
            self.blocks_done = 0
            with watching(self._watch(time.perf_counter())):
                fn()
            with self._lock:          # a run that came in meanwhile: only the latest one is kept
                fn, self._next = self._next, None
                if fn is None:
                    self._thread = None
                else:
                    self._stop.clear()

    def submit(self, fn: Callable[[], None]) -> None:
        """Run fn (which handles its own errors): at once in the caller's thread when not background; else
        in the worker thread, after the run in flight (a later submit replaces one still waiting)."""
        if not self.background:
            self._stop.clear()
            self._go(fn)
            return
        with self._lock:
            if self._thread is not None:
                self._next = fn
                return
            self._stop.clear()
            self._thread = self.thread_class(target=self._go, args=(fn,), name="lensviz-explorer-run", daemon=True)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> None:
        """Until no run is in flight or waiting (for tests and scripts)."""
        t = self._thread
        while t is not None:
            t.join(timeout)
            if timeout is not None:
                return
            t = self._thread


def host_thread() -> type | None:
    """The thread class for the Explorer's background runs in this host: threading.Thread inside an IPython
    kernel (Jupyter, Voilà, VS Code), marimo's mo.Thread inside a marimo notebook (a plain thread there
    cannot reach the front end), None elsewhere (scripts and tests: runs happen in the caller)."""
    import sys

    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with ipywidgets
        get_ipython = None
    if get_ipython is not None and getattr(get_ipython(), "kernel", None) is not None:
        return threading.Thread
    mo = sys.modules.get("marimo")
    if mo is not None and getattr(mo, "running_in_notebook", lambda: False)() and hasattr(mo, "Thread"):
        return mo.Thread
    return None
