#!/usr/bin/env python
"""Benchmark: `lv.load()` of the embedded SmolLM2 (a Q4_1 GGUF file), cold against warm, each sample a
separate Python process (what a user's next notebook or script pays):

  convert       lv.load(cache=False): de-quantise the GGUF file and convert its tokenizer (the only path
                before the cache existed)
  cold+store    lv.load() with an empty cache folder: convert, then write the cache entry
  warm          lv.load() with the entry from the previous cold+store: the fast read (lensviz.cache.read:
                the model built from the entry's config with initialisation off, the safetensors weights
                memory-mapped and assigned, the tokenizer from tokenizer.json)
  warm-fp       the same entry read with `from_pretrained` (the warm path before the fast read; what a
                load with another dtype or keyword arguments still takes), for comparison

Per process: `import` = `import lensviz` from the child's first line (torch is most of it); `load` = the
`lv.load()` call; `total` = import + load (process start to a usable Lens, less the interpreter start);
`cpu` = the CPU seconds of the `lv.load()` call and `cpu_total` those of the process up to the usable Lens
(interpreter start, import and load; less sensitive to other processes on a shared machine than the
wall-clock figures, and what the wall clock reads on an idle one: the load runs on one thread); `trace` = a first forward `lens.trace(..., backward=False)` of 6 tokens
after the load (the warm weights are memory-mapped, so a first pass also pages them in); `process` =
the whole `python -c` run as the parent sees it. Median, min and max per mode. The modes run
round-robin (one of each per repetition), so a change in machine load hits all of them alike; the load
average before and after is printed, since on a busy machine the figures are not worth much.

    .venv/bin/python benchmarks/bench_load.py                 # --reps 5
    .venv/bin/python benchmarks/bench_load.py --reps 5 --cold-reps 2 --out benchmarks/results

Writes benchmarks/results/load.md. Each process gets its own LENSVIZ_CACHE under a temporary folder;
the user's cache is never touched.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHILD = """
import time
t0 = time.perf_counter()
import lensviz as lv
t1 = time.perf_counter()
if {slow_read}:
    import lensviz.cache
    lensviz.cache.read = lambda entry: None        # warm-fp: the entry through from_pretrained
c1 = time.process_time()
lens = lv.load(progress=False, cache={cache})
t2, c2 = time.perf_counter(), time.process_time()
assert lens.name == "SmolLM2-135M-Instruct (embedded)"
where = lv.__file__
lens.trace("The capital of France is", backward=False)
t3 = time.perf_counter()
import json
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "total_s": t2 - t0, "cpu_s": c2 - c1, "cpu_total_s": c2, "trace_s": t3 - t2, "file": where}}))
"""
MODES = ("convert", "cold+store", "warm", "warm-fp")
FIGURES = ("import_s", "load_s", "total_s", "cpu_s", "cpu_total_s", "trace_s", "process_s")


def sample(cache_dir: Path, cache: bool, slow_read: bool = False, tree: Path = REPO) -> dict:
    env = {**os.environ, "LENSVIZ_CACHE": str(cache_dir), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)}
    t0 = time.perf_counter()
    got = subprocess.run([sys.executable, "-c", CHILD.format(cache=cache, slow_read=slow_read)], env=env,
                         cwd=tree, capture_output=True, text=True, timeout=900)   # cwd: `-c` puts it first on sys.path
    wall = time.perf_counter() - t0
    if got.returncode != 0:
        raise SystemExit(f"the load failed:\n{got.stderr[-3000:]}")
    return {**json.loads(got.stdout.strip().splitlines()[-1]), "process_s": wall, "warnings": got.stderr.count("Warning")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="processes per warm mode (default 5)")
    ap.add_argument("--cold-reps", type=int, default=None,
                    help="processes for the two converting modes (default: --reps; they take ~15-30 s each)")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for load.md")
    ap.add_argument("--base", default=None, metavar="TREE",
                    help="also time cold+store and warm of another source tree (e.g. `git archive` of an older "
                         "commit), interleaved with these modes, as modes cold+store@base and warm@base")
    ap.add_argument("--warm-only", default=None, metavar="CACHE",
                    help="time only the warm modes, reading the entry already in this LENSVIZ_CACHE folder "
                         "(quick: no conversions; the folder is only read)")
    args = ap.parse_args()
    modes = MODES + (("cold+store@base", "warm@base") if args.base else ())
    if args.warm_only:
        modes = tuple(m for m in modes if m.startswith("warm"))
    load_before = os.getloadavg()
    cold_reps = max(1, min(args.reps, args.reps if args.cold_reps is None else args.cold_reps))
    runs = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="lv-bench-load-") as tmp:
        filled = base_cache = Path(args.warm_only) if args.warm_only else None
        for rep in range(args.reps):
            if rep < cold_reps and not args.warm_only:
                runs["convert"].append(sample(Path(tmp) / "unused", cache=False))
                if filled is not None:
                    shutil.rmtree(filled, ignore_errors=True)
                filled = Path(tmp) / f"cache-{rep}"
                runs["cold+store"].append(sample(filled, cache=True))
                if args.base:
                    base_cache = Path(tmp) / f"base-{rep}"
                    shutil.rmtree(Path(tmp) / f"base-{rep - 1}", ignore_errors=True)
                    runs["cold+store@base"].append(sample(base_cache, cache=True, tree=Path(args.base)))
            runs["warm"].append(sample(filled, cache=True))
            runs["warm-fp"].append(sample(filled, cache=True, slow_read=True))
            if args.base:
                runs["warm@base"].append(sample(base_cache, cache=True, tree=Path(args.base)))
            print(f"rep {rep + 1}/{args.reps}, load average {os.getloadavg()[0]:.1f}: " + ", ".join(
                f"{m} {runs[m][-1]['import_s']:.2f} + {runs[m][-1]['load_s']:.2f} s" for m in modes
                if len(runs[m]) == rep + 1), flush=True)
        entry = next(p for p in (filled / "gguf").iterdir() if p.is_dir())
        entry_mb = sum(f.stat().st_size for f in entry.iterdir()) / 1e6
    load_after = os.getloadavg()

    def stats(xs):
        return f"{statistics.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})"

    import torch
    import transformers

    import lensviz as lv

    lines = [
        "# lv.load() of the embedded SmolLM2: cold against warm",
        "",
        "n separate processes per mode, round-robin; seconds, median (min–max). `import` = `import lensviz`; "
        "`load` = the `lv.load()` call; `total` = both (process start to a usable Lens, less the interpreter "
        "start); `cpu` = CPU seconds of the load, `cpu_total` of the process up to the usable Lens; `trace` = a first 6-token forward trace after it; "
        "`process` = the whole `python -c` run.",
        "",
        "| mode | n | " + " | ".join(f.removesuffix("_s") for f in FIGURES) + " |",
        "|---|---|" + "---|" * len(FIGURES),
    ]
    for m in modes:
        lines.append(f"| {m} | {len(runs[m])} | " + " | ".join(stats([r[f] for r in runs[m]]) for f in FIGURES) + " |")
    med = {m: {f: statistics.median(r[f] for r in runs[m]) for f in FIGURES} for m in modes}
    med.setdefault("convert", {"load_s": float("nan")})
    med.setdefault("cold+store", {"load_s": float("nan")})
    med.setdefault("cold+store@base", {"load_s": float("nan")})
    lines += ["", f"cold+store / convert (load) = {med['cold+store']['load_s'] / med['convert']['load_s']:.2f}; "
              f"warm / convert = {med['warm']['load_s'] / med['convert']['load_s']:.3f}; "
              f"warm / warm-fp = {med['warm']['load_s'] / med['warm-fp']['load_s']:.2f}; cache entry {entry_mb:.0f} MB."
              + (f" Against {args.base}: cold+store {med['cold+store']['load_s'] / med['cold+store@base']['load_s']:.2f}x, "
                 f"warm {med['warm']['load_s'] / med['warm@base']['load_s']:.2f}x (load), "
                 f"{med['warm']['total_s'] / med['warm@base']['total_s']:.2f}x (total)." if args.base else ""),
              f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"torch {torch.__version__}, transformers {transformers.__version__}, lensviz {lv.__version__}; "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; load average "
              f"{load_before[0]:.1f} before, {load_after[0]:.1f} after.", ""]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
