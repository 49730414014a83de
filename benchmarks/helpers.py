"""What the benchmarks share: logging, load average, peak-RSS probe, statistics and their formatting,
package versions, the machine, and prompts of an exact token length. Imported by bench_trace.py,
bench_lenses.py and bench_widget.py (same folder); nothing here imports from tests/.
"""
from __future__ import annotations

import ctypes
import gc
import importlib.metadata as md
import os
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TEXT = (
    "The history of the city begins with a small settlement on an island in the river. Over the "
    "centuries it grew into a centre of trade, learning and government, and its bridges, markets and "
    "churches drew travellers from every part of the continent. Writers described its streets, "
    "painters its light, and engineers rebuilt its quarters again and again. "
)


def log(*a):
    print(*a, flush=True)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


_LIBC = None


def malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS measures what is really held."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except OSError:
        pass


def vm_hwm() -> int | None:
    """Peak RSS in bytes since the last reset, from /proc/self/status (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (writing 5 to /proc/self/clear_refs, Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return vm_hwm() is not None
    except OSError:
        return False


class PeakRSS:
    """Peak RSS above the RSS at entry, sampled by a thread every `interval` seconds (psutil), with the
    kernel's VmHWM (reset at entry) as a cross-check."""

    def __init__(self, interval: float = 0.001):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self._stop = threading.Event()

    def _rss(self) -> int:
        return self.proc.memory_info().rss

    def _loop(self):
        while not self._stop.is_set():
            r = self._rss()
            if r > self.peak:
                self.peak = r
            time.sleep(self.interval)

    def __enter__(self):
        gc.collect()
        malloc_trim()
        self.hwm_ok = reset_hwm()
        self.base = self.peak = self._rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.end = self._rss()
        self.peak = max(self.peak, self.end)
        self.hwm = vm_hwm() if self.hwm_ok else None
        return False

    @property
    def hwm_mb(self) -> float | None:
        """Cross-check: the kernel's exact peak RSS (VmHWM, reset at entry) minus RSS at entry."""
        return None if self.hwm is None else (self.hwm - self.base) / 2**20

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.base) / 2**20

    @property
    def held_mb(self) -> float:
        return (self.end - self.base) / 2**20


def stats(xs) -> dict | None:
    """median, min, max and n of the values that are not None (None when there are none)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def fmt_s(st, unit="s", scale=1.0, nd=3) -> str:
    if not st:
        return "n/a"
    f = f"{{:.{nd}f}}"
    return (f"{f.format(st['median'] * scale)} (min {f.format(st['min'] * scale)}, max "
            f"{f.format(st['max'] * scale)}, n={st['n']}) {unit}").rstrip()


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    if n >= 1e6:
        return f"{n / 1e6:,.2f} MB"
    if n >= 1e3:
        return f"{n / 1e3:,.1f} kB"
    return f"{n} B"


def versions(packages) -> dict:
    """Python, the given packages' versions (None when absent) and lensviz's git revision."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "lensviz"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["lensviz_git"] = (rev or "?") + ("+dirty(lensviz/)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        out["lensviz_git"] = None
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    mem = None
    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # noqa: BLE001
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "ram_gib": mem, "torch_threads": torch.get_num_threads(),
            "gpu": gpu, "platform": platform.platform()}


def prompt_of_length(lens, n_tokens: int, text: str = PROMPT_TEXT):
    """Text that lens.encode turns into exactly n_tokens ids, and those ids."""
    text = text * (n_tokens // 40 + 2)
    ids_all, _ = lens.encode(text)
    cut = n_tokens
    for _ in range(40):
        prompt = lens.tokenizer.decode(ids_all[:cut].tolist())
        ids, _ = lens.encode(prompt)
        if len(ids) == n_tokens:
            return prompt, ids
        cut += n_tokens - len(ids)
    raise RuntimeError(f"could not build a prompt of exactly {n_tokens} tokens")
