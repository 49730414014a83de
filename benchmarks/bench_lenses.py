"""Lens and patch figures on SmolLM2, interleaved in one process (medians and min-ratios):
logit lens over all layers x positions against the bare matmul + top-k floor (and its extra memory),
value-vector search latency, composition scores of all head pairs, and patched traces against an
unpatched trace at T=64.

Two floors: "floor" is the naive chunked torch.mm + topk (a fresh [chunk, V] tensor per chunk, the
issue's "bare matmul + top-k"); "tight floor" writes every chunk into one reused buffer (no page
faults), the fastest matmul + top-k we know. The logit lens also does the final norm, the softmax
normaliser and the target rank on top of them.

    .venv/bin/python benchmarks/bench_lenses.py
"""
from __future__ import annotations

import ctypes
import os
import statistics
import tempfile
import time

import torch

import lensviz as lv
from helpers import PeakRSS  # same folder: the benchmarks' shared helpers


def peak_mb(fn) -> float:
    """Peak memory of one call above the memory at entry, in MB: the kernel's exact VmHWM (reset at entry,
    after gc + malloc_trim) where Linux gives it, else the 1 ms RSS samples (bench_trace.PeakRSS)."""
    with PeakRSS() as m:
        out = fn()
    del out
    return m.hwm_mb if m.hwm_mb is not None else m.peak_mb


def timed(cases, reps=6):
    """Round-robin repetitions (the first one a warm-up); each repetition starts with the next case, so
    machine load and cache state hit all cases alike."""
    ts = {k: [] for k in cases}
    names = list(cases)
    for r in range(reps + 1):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            cases[k]()
            ts[k].append(time.perf_counter() - t)
    return {k: v[1:] for k, v in ts.items()}


def working_set_lines(runs: dict) -> list[str]:
    """The logit lens's own working set: peak memory with glibc's mmap threshold fixed at 128 KiB
    (mallopt, this process only, set last because it cannot be undone), so that every freed block of
    more than 128 KiB goes back to the OS. With the default dynamic threshold, glibc keeps some freed
    heap memory after a call, and how much depends on what ran before (the column above)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        if libc.mallopt(-3, 128 * 1024) != 1:  # M_MMAP_THRESHOLD
            return []
    except OSError:
        return []
    mems = {T: sorted(peak_mb(run) for _ in range(3)) for T, run in runs.items()}
    return ["", "Logit-lens working set (glibc mmap threshold fixed at 128 KiB): "
            + ", ".join(f"T={T}: {m[1]:.0f} MB (max {m[-1]:.0f})" for T, m in mems.items()) + "."]


def value_search_lines(lens) -> list[str]:
    """Build the value-vector index (all layers, k=50) cold and from the disk cache, then time queries."""
    from lensviz.lenses.neurons import build_value_index

    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        build_value_index(lens, cache_dir=cache)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        index = build_value_index(lens, cache_dir=cache)
        warm = time.perf_counter() - t
    words = [" Paris", " France", " city", " the", " dog", " Rome", " water", " king", " red", " music"] * 5
    qs = []
    for w in words:
        t = time.perf_counter()
        index.query(w, limit=20)
        qs.append(time.perf_counter() - t)
    return ["", f"Value-vector search ({len(index)} values x k={index.k}): index built in {cold:.1f} s cold, "
            f"{warm:.2f} s from the disk cache; query median {statistics.median(qs) * 1e3:.2f} ms, "
            f"max {max(qs) * 1e3:.2f} ms over {len(qs)} queries (goal < 50 ms)."]


def composition_lines(lens) -> list[str]:
    """Composition scores of all head pairs (Q-, K-, V-composition), the first call and a repeat."""
    from lensviz.lenses.composition import all_composition_scores

    times = []
    for _ in range(2):
        t = time.perf_counter()
        scores = all_composition_scores(lens)
        times.append(time.perf_counter() - t)
    shape = tuple(next(iter(scores.values())).shape)
    return ["", f"Composition scores, all head pairs {shape} x modes {sorted(scores)}: "
            f"{times[0]:.2f} s first call, {times[1]:.2f} s repeat."]


def main():
    torch.set_num_threads(2)
    lens = lv.load(progress=False)
    tok = lens.tokenizer
    text_ids = tok("The quick brown fox jumps over the lazy dog. " * 60)["input_ids"]
    w_t = lens.unembed_module.weight.detach().T.contiguous()
    lines = [f"# Lens and patch figures (SmolLM2), load {os.getloadavg()}", ""]
    runs = {}
    lines += ["| T | logit lens median s | floor median s | median-ratio | min-ratio | tight floor median s | "
              "ratio to tight (median / min) | extra peak MB, median of 3 |", "|---|---|---|---|---|---|---|---|"]
    for T in (64, 256):
        prompt = tok.decode(text_ids[:T])
        tr = lens.trace(prompt, backward=False)
        rows = torch.stack([tr.resid(layer, "post") for layer in range(lens.n_layers)]).reshape(-1, lens.d_model)

        def lens_run():
            tr.__dict__.pop("_cache", None)
            return tr.logit_lens(k=10)

        def floor():  # chunked matmul + top-k, no norm, no softmax, no ranks
            chunk = max(1, 64 * 2**20 // (4 * lens.vocab_size))
            with torch.no_grad():
                return [torch.mm(rows[i:i + chunk], w_t).topk(10, dim=-1) for i in range(0, rows.shape[0], chunk)]

        def tight_floor():  # the same matmuls into one reused buffer, then top-k
            chunk = max(1, 64 * 2**20 // (4 * lens.vocab_size))
            buf = torch.empty(chunk, lens.vocab_size)
            with torch.no_grad():
                out = []
                for i in range(0, rows.shape[0], chunk):
                    x = rows[i:i + chunk]
                    out.append(torch.mm(x, w_t, out=buf[:x.shape[0]]).topk(10, dim=-1))
                return out

        ts = timed({"lens": lens_run, "floor": floor, "tight": tight_floor})
        mems = sorted(peak_mb(lens_run) for _ in range(3))
        runs[T] = lens_run
        m, f, tf = (statistics.median(ts[k]) for k in ("lens", "floor", "tight"))
        lines.append(f"| {T} | {m:.3f} | {f:.3f} | {m / f:.2f}x | {min(ts['lens']) / min(ts['floor']):.2f}x | {tf:.3f} | "
                     f"{m / tf:.2f}x / {min(ts['lens']) / min(ts['tight']):.2f}x | {mems[1]:.0f} (max {mems[-1]:.0f}) |")
    lines += value_search_lines(lens) + composition_lines(lens)
    prompt = tok.decode(text_ids[:64])
    base = lens.trace(prompt)
    tid = base.target_id
    cases = {
        "unpatched": lambda: lens.trace(prompt, target=tid),
        "HeadAblation(L20, 2 heads)": lambda: lens.trace(prompt, target=tid, patches=(lv.HeadAblation(20, [1, 2]),)),
        "NeuronPatch(L20, 2 neurons)": lambda: lens.trace(prompt, target=tid, patches=(lv.NeuronPatch(20, [5, 6]),)),
        "AttentionPatch(all layers, eta=-2, base given)": lambda: lens.trace(
            prompt, target=tid, patches=(lv.AttentionPatch(-2.0),), base=base),
        "TopKAttention(k=8)": lambda: lens.trace(prompt, target=tid, patches=(lv.TopKAttention(8),)),
    }
    ts = timed(cases, reps=10)
    ref, ref_min = statistics.median(ts["unpatched"]), min(ts["unpatched"])
    lines += ["", "Patched trace vs unpatched (forward + backward), T=64:", "",
              "| run | median s | min s | median-ratio | min-ratio |", "|---|---|---|---|---|"]
    for k, v in ts.items():
        lines.append(f"| {k} | {statistics.median(v):.3f} | {min(v):.3f} | {statistics.median(v) / ref:.2f}x | "
                     f"{min(v) / ref_min:.2f}x |")
    lines += working_set_lines(runs)
    lines.append(f"\nload at end {os.getloadavg()}")
    text = "\n".join(lines)
    print(text)
    out = os.path.join(os.path.dirname(__file__), "results", "lenses.md")
    with open(out, "w") as fh:
        fh.write(text + "\n")


if __name__ == "__main__":
    main()
