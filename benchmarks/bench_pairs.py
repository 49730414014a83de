#!/usr/bin/env python
"""Benchmark: prompt-pair patching on SmolLM2 (lensviz.load(), float32, CPU), clean and corrupt prompts of
equal token length T (the corrupt prompt = the clean ids with 2 tokens replaced), metric = the clean
run's top-1 token's log-probability at the last position.

(a) exact residual sweep, every layer x position at resid pre:
    lensviz      lens.patching_sweep(clean, corrupt, site="pre") (both prompts' runs included);
    tl           TransformerLens 4.x TransformerBridge (own model copy, booted offline from the embedded
                 model's folder as bench_trace.py does): run_with_cache(clean) +
                 transformer_lens.patching.get_act_patch_resid_pre(bridge, corrupt, cache, metric), one full
                 forward per cell;
    nnsight      a plain loop: one NNsight trace saving the clean block inputs, then one trace per cell
                 setting block l's input at position p to the clean one.
    --sample-cells K times tl and nnsight on K cells spread over the layers and positions and scales
    their time to all L*T cells: x (L*T + 2) / (K + 2), the 2 being the clean and corrupt runs (each of
    their cells is one full forward of the same size, so the per-cell time does not depend on the
    cell); 0 = every cell.
(b) attribution sweep: lens.patching_sweep(..., method="attribution") vs one lens.trace of each prompt
    (forward + backward each).
(c) exact ablation of every head: lv.head_importance(tr, "ablation"), per head, vs one plain HF forward.

Before timing, every method's effects are compared on sampled cells (max abs difference reported).
Timing: one process, torch.set_num_threads(--threads), --reps timed repetitions after a warm-up (for (a)
the agreement pass, which runs every method once), methods round-robin (the starting one rotating).
Writes benchmarks/results/pairs.md and pairs.json.

    .venv/bin/python benchmarks/bench_pairs.py --reps 3 --lengths 16,64
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from helpers import loadavg, log, machine, prompt_of_length, stats, versions  # noqa: E402

HERE = Path(__file__).resolve().parent
VERSIONED = ("torch", "transformers", "transformer-lens", "nnsight", "lensviz")
TARGETS = {"exact_vs_tl": 0.5, "attribution_vs_traces": 1.3}


def frozen_copy(model):
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def corrupt_of(lens, ids):
    """A prompt of the same token length: the clean ids with two tokens replaced (re-encoded to check)."""
    t = len(ids)
    for a, b in ((" the", " a"), (" city", " river"), (" of", " in")):
        new = ids.clone()
        new[t // 3], new[(2 * t) // 3] = lens.token_id(a), lens.token_id(b)
        text = lens.tokenizer.decode(new.tolist())
        got, _ = lens.encode(text)
        if len(got) == t and not torch.equal(got, ids):
            return text, got
    raise RuntimeError("no corrupt prompt of the same length")


def sample_cells(n_layers, t, k):
    if k <= 0 or k >= n_layers * t:
        return [(la, p) for la in range(n_layers) for p in range(t)]
    step = n_layers * t / k
    return [divmod(int(i * step), t) for i in range(k)]


class Pair:
    def __init__(self, lens, t, sample):
        self.lens, self.t = lens, t
        self.clean, self.c_ids = prompt_of_length(lens, t)
        self.corrupt, self.x_ids = corrupt_of(lens, self.c_ids)
        with torch.no_grad():
            self.tid = int(lens.model(self.c_ids[None], use_cache=False).logits[0, -1].argmax())
        self.cells = sample_cells(lens.n_layers, t, sample)
        self.bare = lens.model  # forward-only baselines need no copy (no hooks of ours stay installed)

    # (a) exact residual sweep ------------------------------------------------------------------------
    def lensviz_exact(self):
        return self.lens.patching_sweep(self.clean, self.corrupt, target=self.tid, site="pre").effect

    def setup_tl(self, tl_name):
        import pandas as pd
        from transformer_lens import patching
        from transformer_lens.model_bridge import TransformerBridge

        warnings.filterwarnings("ignore", message=".*hook_scale/hook_normalized.*")
        bridge = TransformerBridge.boot_transformers(tl_name, hf_model=copy.deepcopy(self.lens.model),
                                                     tokenizer=self.lens.tokenizer)
        bridge.eval()
        for p in bridge.parameters():
            p.requires_grad_(False)
        tid = self.tid

        def metric(logits):
            return torch.log_softmax(logits[0, -1].float(), -1)[tid]

        index = pd.DataFrame(self.cells, columns=["layer", "pos"])
        all_cells = len(self.cells) == self.lens.n_layers * self.t

        def run():
            with torch.no_grad():
                _, cache = bridge.run_with_cache(self.c_ids[None])
                base = float(metric(bridge(self.x_ids[None])))
                if all_cells:
                    out = patching.get_act_patch_resid_pre(bridge, self.x_ids[None], cache, metric)
                    return out - base
                out = patching.get_act_patch_resid_pre(bridge, self.x_ids[None], cache, metric, index_axis_names=None,
                                                         index_df=index)
                grid = torch.full((self.lens.n_layers, self.t), float("nan"))
                for (la, p), v in zip(self.cells, out):
                    grid[la, p] = float(v) - base
                return grid

        self.tl_run = run

    def setup_nnsight(self):
        import nnsight
        from nnsight import NNsight

        nm = NNsight(frozen_copy(self.lens.model))
        ad, n = self.lens.adapter, self.lens.n_layers
        root = nm
        for part in ad.blocks.split("."):
            root = getattr(root, part)
        blocks = [root[i] for i in range(n)]
        tid = self.tid

        def run():
            grid = torch.full((n, self.t), float("nan"))
            with torch.no_grad():
                with nm.trace(self.c_ids[None], use_cache=False):
                    clean = nnsight.save([blocks[i].input.clone() for i in range(n)])
                with nm.trace(self.x_ids[None], use_cache=False):
                    base = torch.log_softmax(nm.output.logits[0, -1].float(), -1)[tid].save()
                for la, p in self.cells:
                    with nm.trace(self.x_ids[None], use_cache=False):
                        h = blocks[la].input.clone()
                        h[:, p] = clean[la][:, p]
                        blocks[la].input = h
                        m = torch.log_softmax(nm.output.logits[0, -1].float(), -1)[tid].save()
                    grid[la, p] = float(m) - float(base)
            return grid

        self.nn_run = run

    # (b) attribution ------------------------------------------------------------------------------------
    def lensviz_attribution(self):
        return self.lens.patching_sweep(self.clean, self.corrupt, target=self.tid, site="pre",
                                        method="attribution").effect

    def two_traces(self):
        return self.lens.trace(self.clean, target=self.tid), self.lens.trace(self.corrupt, target=self.tid)

    # (c) ablation ---------------------------------------------------------------------------------------
    def ablation(self, tr):
        import lensviz as lv

        return lv.head_importance(tr, "ablation")

    def forward(self):
        with torch.no_grad():
            return self.bare(self.c_ids[None], use_cache=False).logits


def hand_ablation(lens, ids, tid, layer, head):
    """metric with head (layer, head) zeroed by a hook on its output projection, minus the plain metric."""
    d = lens.d_head

    def zero(mod, args):
        x = args[0].clone()
        x[..., head * d:(head + 1) * d] = 0
        return (x,)

    with torch.no_grad():
        base = torch.log_softmax(lens.model(ids[None], use_cache=False).logits[0, -1].double(), -1)[tid]
        h = lens.adapter.part(lens.model, layer, "o_proj").register_forward_pre_hook(zero)
        try:
            m = torch.log_softmax(lens.model(ids[None], use_cache=False).logits[0, -1].double(), -1)[tid]
        finally:
            h.remove()
    return float(m - base)


def timed(fns: dict, reps: int, warmup: bool) -> dict:
    names = list(fns)
    times = {n: [] for n in names}
    for rep in range(0 if warmup else 1, reps + 1):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for n in order:
            t0 = time.perf_counter()
            out = fns[n]()
            dt = time.perf_counter() - t0
            del out
            if rep:
                times[n].append(dt)
    return {n: stats(v) for n, v in times.items()}


def ratio(a, b, key):
    return a[key] / b[key]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--lengths", default="16,64")
    ap.add_argument("--sample-cells", default="0,96",
                    help="per length: tl / nnsight cells timed (0 = all; else scaled to all L*T cells)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    samples = [int(x) for x in args.sample_cells.split(",")]
    samples += [samples[-1]] * (len(lengths) - len(samples))

    import lensviz as lv
    from lensviz.loading import embedded_model_file

    wall0 = time.perf_counter()
    lens = lv.load(progress=False, dtype=torch.float32)
    folder, _ = embedded_model_file()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "versions": versions(VERSIONED), "loadavg_start": loadavg(),
            "reps": args.reps, "model": f"SmolLM2-135M (L={lens.n_layers}, H={lens.n_heads})"}
    log(json.dumps(meta))
    results = {}
    for t, k in zip(lengths, samples):
        pair = Pair(lens, t, k)
        pair.setup_tl(str(folder))
        pair.setup_nnsight()
        n_cells, n_timed = lens.n_layers * t, len(pair.cells)
        # agreement before timing
        ours = pair.lensviz_exact()
        tl, nn = pair.tl_run(), pair.nn_run()
        cells = pair.cells[:: max(1, len(pair.cells) // 24)]
        pick = torch.tensor([la for la, _ in cells]), torch.tensor([p for _, p in cells])
        attr = pair.lensviz_attribution()
        tr = lens.trace(pair.clean, target=pair.tid, backward=False)
        abl = pair.ablation(tr)
        hand = [(la, h, hand_ablation(lens, pair.c_ids, pair.tid, la, h)) for la, h in ((0, 0), (7, 3), (29, 8))]
        agree = {"lensviz_vs_tl_maxabs": float((ours[pick] - tl[pick]).abs().max()),
                 "lensviz_vs_nnsight_maxabs": float((ours[pick] - nn[pick]).abs().max()),
                 "cells_compared": len(cells), "effect_maxabs": float(ours.abs().max()),
                 "attribution_vs_exact_corr": float(torch.corrcoef(torch.stack([attr.flatten(),
                                                                                ours.flatten()]))[0, 1]),
                 "ablation_vs_hand_maxabs": max(abs(float(abl[la, h]) - v) for la, h, v in hand)}
        log(f"T={t} agreement {agree}")
        la0 = loadavg()
        # the agreement pass above was the warm-up of (a)
        a = timed({"lensviz": pair.lensviz_exact, "tl": pair.tl_run, "nnsight": pair.nn_run}, args.reps, False)
        scale = (n_cells + 2) / (n_timed + 2)  # each: 2 unpatched runs + one run per cell
        for name in ("tl", "nnsight"):  # timed on n_timed cells: scaled to all cells
            if scale != 1:
                a[name + "_timed"] = dict(a[name])
                a[name] = {s: (v * scale if s != "n" else v) for s, v in a[name].items()}
        b = timed({"attribution": pair.lensviz_attribution, "two_traces": pair.two_traces}, args.reps, True)
        c = timed({"ablation": lambda: pair.ablation(tr), "forward": pair.forward}, args.reps, True)
        r = {"T": t, "cells": n_cells, "tl_nnsight_cells_timed": n_timed, "agreement": agree, "exact": a,
             "attribution": b, "ablation": c, "loadavg": [la0, loadavg()],
             "ratios": {
                 "exact_vs_tl": {s: ratio(a["lensviz"], a["tl"], s) for s in ("median", "min")},
                 "exact_vs_nnsight": {s: ratio(a["lensviz"], a["nnsight"], s) for s in ("median", "min")},
                 "attribution_vs_traces": {s: ratio(b["attribution"], b["two_traces"], s) for s in ("median", "min")},
                 "ablation_per_head_vs_forward": {
                     s: c["ablation"][s] / (lens.n_layers * lens.n_heads) / c["forward"][s] for s in ("median", "min")},
             }}
        log(f"T={t} " + json.dumps(r["ratios"]))
        results[t] = r
    meta["wall_s"] = time.perf_counter() - wall0
    meta["loadavg_end"] = loadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pairs.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / "pairs.md").write_text(report(meta, results) + "\n")
    log(report(meta, results))


def report(meta, results) -> str:
    f = lambda st: f"{st['median']:.2f} (min {st['min']:.2f})"  # noqa: E731
    lines = [f"# Prompt pairs on {meta['model']}, {meta['date']}", "",
             f"{meta['machine']['cpu']}, torch threads {meta['machine']['torch_threads']}, load average "
             f"{meta['loadavg_start']} at start, {meta['loadavg_end']} at end (shared machine); "
             f"{meta['reps']} timed reps after 1 warm-up; lensviz {meta['versions'].get('lensviz_git')}", "",
             "| T | exact sweep: lensviz s | TL s | nnsight s | lensviz / TL | lensviz / nnsight | attribution s "
             "| 2 traces s | attr / traces | ablation s (all heads) | forward s | per head / forward |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t, r in results.items():
        a, b, c, q = r["exact"], r["attribution"], r["ablation"], r["ratios"]
        rr = lambda k: f"{q[k]['median']:.3f} (min {q[k]['min']:.3f})"  # noqa: E731
        lines.append(f"| {t} | {f(a['lensviz'])} | {f(a['tl'])} | {f(a['nnsight'])} | {rr('exact_vs_tl')} | "
                     f"{rr('exact_vs_nnsight')} | {f(b['attribution'])} | {f(b['two_traces'])} | "
                     f"{rr('attribution_vs_traces')} | {f(c['ablation'])} | {f(c['forward'])} | "
                     f"{rr('ablation_per_head_vs_forward')} |")
    lines.append("")
    for t, r in results.items():
        lines.append(f"- T={t}: {r['cells']} cells; TL and nnsight timed on {r['tl_nnsight_cells_timed']} of them "
                     f"(scaled to all); agreement {r['agreement']}; load average {r['loadavg']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
