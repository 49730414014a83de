#!/usr/bin/env python
"""Benchmark: building `lv.Explorer(lens, prompt)` in the kernel at T = 2048 tokens on the embedded
SmolLM2-135M-Instruct (30 layers, vocabulary 49,152), the initial state's size, and (for an Explorer
with a windowed logit-lens grid, explorer.GRID_FULL_UPTO) the time of one "grid" window request, of a
patch re-run and of the whole-grid state an export adds. One repetition each (the build is minutes on
the 2 shared cores); the load average is printed next to the figures.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_grid_build.py [--tokens 2048] [--threads 2] [--no-extra]

Point PYTHONPATH at another checkout (e.g. `git archive <commit> lensviz | tar -x -C /tmp/old`) to time
the code before a change; the parts it lacks are skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import lensviz as lv  # noqa: E402
from lensviz.views import explorer as E  # noqa: E402


def state_bytes(ex) -> dict:
    """Bytes of the widget state as sent (binary traits: their length; the rest: JSON length);
    code = _esm, _css, _modules (as benchmarks/bench_widget.py counts)."""
    sizes = {k: len(v) if isinstance(v, (bytes, bytearray, memoryview)) else len(json.dumps(v))
             for k, v in ex.get_state().items()}
    code = sum(n for k, n in sizes.items() if k in ("_esm", "_css", "_modules"))
    return {"total": sum(sizes.values()), "code": code, "data": sum(sizes.values()) - code,
            "grid": sum(n for k, n in sizes.items() if k.startswith("grid_"))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-extra", action="store_true", help="only the build and the state size")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lens = lv.load(progress=False)
    text = " ".join(["the quick brown fox jumps over the lazy dog, and then it rests."] * (args.tokens // 8))
    ids = lens.tokenizer(text)["input_ids"][:args.tokens]
    prompt = lens.tokenizer.decode(ids)
    out = {"lensviz": lv.__file__, "T": None, "threads": args.threads, "loadavg_before": os.getloadavg()}
    t0 = time.perf_counter()
    ex = E.Explorer(lens, prompt)
    out["build_s"] = time.perf_counter() - t0
    out["T"] = len(ex.tokens)
    out["state"] = state_bytes(ex)
    out["loadavg_after_build"] = os.getloadavg()
    if not args.no_extra and hasattr(ex, "grid_window"):
        w = len(ex.tokens) // 2 // E.GRID_WINDOW
        t0 = time.perf_counter()
        ex.grid_window(w)
        out["window_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ex.run(patches=[{"type": "ablate", "layer": 3, "heads": [0]}])
        out["patch_rerun_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ex.grid_window(w)
        out["patched_window_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ex.full_grid_state()
        out["full_grid_for_export_s"] = time.perf_counter() - t0
        out["loadavg_end"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
