"""Lens and patch figures on SmolLM2, interleaved in one process (medians and min-ratios):
logit lens over all layers x positions against the bare matmul + top-k floor (and its extra memory),
and patched traces against an unpatched trace at T=64.

    .venv/bin/python benchmarks/bench_lenses.py
"""
from __future__ import annotations

import gc
import os
import statistics
import threading
import time

import psutil
import torch

import lensviz as lv


def peak_mb(fn):
    gc.collect()
    proc, base, peak, stop = psutil.Process(), psutil.Process().memory_info().rss, [0], [False]

    def watch():
        while not stop[0]:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    t = threading.Thread(target=watch)
    t.start()
    out = fn()
    stop[0] = True
    t.join()
    del out
    return (peak[0] - base) / 2**20


def timed(cases, reps=6):
    ts = {k: [] for k in cases}
    for _ in range(reps + 1):
        for k, f in cases.items():
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    return {k: v[1:] for k, v in ts.items()}


def main():
    torch.set_num_threads(2)
    lens = lv.load(progress=False)
    tok = lens.tokenizer
    text_ids = tok("The quick brown fox jumps over the lazy dog. " * 60)["input_ids"]
    w_t = lens.unembed_module.weight.detach().T.contiguous()
    lines = [f"# Lens and patch figures (SmolLM2), load {os.getloadavg()}", ""]
    lines += ["| T | logit lens median s | floor median s | median-ratio | min-ratio | extra peak MB |", "|---|---|---|---|---|---|"]
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

        ts = timed({"lens": lens_run, "floor": floor})
        mem = peak_mb(lens_run)
        m, f = statistics.median(ts["lens"]), statistics.median(ts["floor"])
        lines.append(f"| {T} | {m:.3f} | {f:.3f} | {m / f:.2f}x | {min(ts['lens']) / min(ts['floor']):.2f}x | {mem:.0f} |")
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
    ts = timed(cases)
    ref, ref_min = statistics.median(ts["unpatched"]), min(ts["unpatched"])
    lines += ["", "Patched trace vs unpatched (forward + backward), T=64:", "",
              "| run | median s | min s | median-ratio | min-ratio |", "|---|---|---|---|---|"]
    for k, v in ts.items():
        lines.append(f"| {k} | {statistics.median(v):.3f} | {min(v):.3f} | {statistics.median(v) / ref:.2f}x | "
                     f"{min(v) / ref_min:.2f}x |")
    lines.append(f"\nload at end {os.getloadavg()}")
    text = "\n".join(lines)
    print(text)
    out = os.path.join(os.path.dirname(__file__), "results", "lenses.md")
    with open(out, "w") as fh:
        fh.write(text + "\n")


if __name__ == "__main__":
    main()
