"""The Explorer: one anywidget with linked views over a trace, re-running the model when the prompt,
target or patch set changes. Small traitlets are the state; heavy arrays travel as binary buffers,
in the initial state only for the logit-lens grid and head norms, the rest on request per view.

The logit-lens grid: prompts of up to GRID_FULL_UPTO tokens get the whole [L, T] grid in the state.
Longer ones get only the first GRID_FIRST positions and the window of the selected position (where the
grid opens: the last position at first) and the browser asks for the rest window by
window (GRID_WINDOW positions, one batched projection each: request "grid") as it scrolls there. Every
re-run or site change starts a new grid generation ("gen"): cached windows of the old one are dropped.
The head norms (||A||_F and ||RA||_F of every head, [2, L, H]) ride in the state the same way: whole up to
GRID_FULL_UPTO tokens; for longer prompts `norms_meta` says "lazy" and the views ask for them (request
"norms", computed once per run) only when one shows them, since at T=2048 they cost more than the run.
"""
from __future__ import annotations

import json
import pathlib
import time
from threading import Thread

import anywidget
import traitlets

from .. import patches as P
from ..checks import SITES, check_index, check_int, check_number
from ..errors import LensvizError
from ..lens import Lens
from ..lenses.experts import check_expert
from ..trace import Trace
from . import pairs, payload, snapshot, stepping
from .stepthrough import TABS, StepThrough, check_keywords
from .worker import Worker, host_thread

STATIC = pathlib.Path(__file__).parent / "static"
VIEW_MODULES = ("util", "tokens", "logitlens", "attention", "neurons", "backward", "flow", "masks", "patches",
                "vgrid", "scales", "livefeel", "steps", "pairs", "patching")
GRADIENT_TABS = ("reversed", "backward", "flow")
GRID_FULL_UPTO = 256   # prompts up to this many tokens get the whole logit-lens grid in the first state
GRID_WINDOW = 32       # longer prompts: the grid comes in windows of this many positions, on request
GRID_FIRST = 64        # ... of which the first state carries the first GRID_FIRST positions and the selection's window


def view_sources() -> dict[str, str]:
    """The ES modules of the views, shipped in lensviz/views/static (loaded by explorer.js). A missing
    file (a broken install) raises LensvizError naming it, instead of an Explorer without that view."""
    files = [f"{name}.js" for name in VIEW_MODULES] + ["explorer.js", "style.css"]
    missing = [f for f in files if not (STATIC / f).is_file()]
    if missing:
        raise LensvizError(
            f"this lensviz install lacks its front-end files {', '.join(missing)} in {STATIC.name}/ "
            "(lensviz/views/static): reinstall lensviz (pip install --force-reinstall lensviz), or, from a "
            "source checkout, pip install . so the package data is copied")
    return {name: (STATIC / f"{name}.js").read_text(encoding="utf-8") for name in VIEW_MODULES}


def _int_list(value, what):
    if isinstance(value, bool) or not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise LensvizError(f"{what} must be a list of ints, got {value!r}")
    return list(value)


def patch_from_spec(spec, lens, base, pair=None) -> P.Patch:
    """A Patch from a widget message ({"type": ..., ...}); nonsense values raise LensvizError. pair: the
    Explorer's prompt pair (views/pairs.py), the source of "activation" and "head" patches."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise LensvizError(f"a patch must be an object with a 'type', got {spec!r}")
    kind = spec["type"]
    if kind in pairs.PAIR_PATCHES:
        return pairs.patch_from_spec(spec, lens, pair)
    num = lambda key, default=None: check_number(spec.get(key, default), key)  # noqa: E731
    if kind == "attention":
        layers = spec.get("layers")
        heads = spec.get("heads")
        return P.AttentionPatch(num("eta"), layers=None if layers is None else _int_list(layers, "layers"),
                                heads=None if heads is None else _int_list(heads, "heads"))
    if kind == "ablate":
        return P.HeadAblation(check_index(spec.get("layer"), lens.n_layers, "layer"), _int_list(spec.get("heads"), "heads"))
    if kind == "neuron":
        mode = spec.get("mode", "set")
        expert = spec.get("expert")          # mixture-of-experts: the neuron of one expert
        return P.NeuronPatch(check_index(spec.get("layer"), lens.n_layers, "layer"),
                             [check_index(spec.get("neuron"), lens.d_mlp, "neuron")], num("value", 0.0), mode=mode,
                             **({} if expert is None else {"expert": check_expert(lens, expert)}))
    if kind == "topk":
        return P.TopKAttention(check_int(spec.get("k"), "k", 1))
    if kind == "segments":
        return P.SegmentMask("auto" if spec.get("auto") else None)
    raise LensvizError(f"unknown patch type {kind!r}; allowed: attention, ablate, neuron, topk, segments, activation, head")


def patch_code(patches) -> str:
    """The Python call that reproduces a patch set ("copy as code")."""
    def fmt(p):
        fields = {k: v for k, v in p.__dict__.items() if v is not None}
        return f"lv.{type(p).__name__}(" + ", ".join(f"{k}={pairs.code_arg(v)}" for k, v in fields.items()) + ")"

    return "(" + ", ".join(fmt(p) for p in patches) + ("," if len(patches) == 1 else "") + ")"


def whole_grid(trace) -> bool:
    """Whether the Explorer sends this trace's whole logit-lens grid at once (up to GRID_FULL_UPTO tokens)."""
    return len(trace) <= GRID_FULL_UPTO


def window_positions(window: int, t: int) -> range:
    """The positions of grid window `window` of a T-token grid: [window * GRID_WINDOW, ...) cut at T."""
    return range(window * GRID_WINDOW, min(t, (window + 1) * GRID_WINDOW))


class Explorer(StepThrough, pairs.Pairs, anywidget.AnyWidget):
    """Linked views of one prompt: token strip, logit lens, attention / Reversed Attention, neurons,
    Backward Lens, flow graph and a patch panel that re-runs the model.

        ex = lv.Explorer(lens, "I like Italy and France. I visited the city of", target=" Florence")
        ex   # display it; ex.trace is the current Trace, ex.base the unpatched one

    A prompt pair, ``lv.Explorer(lens, clean, corrupt=..., target=..., distractor=None)``, shows both prompts,
    the metric of each and a patching heatmap; the views show the corrupt run and its patches (views/pairs.py).
    """

    _esm = STATIC / "explorer.js"
    _css = STATIC / "style.css"
    _modules = traitlets.Dict().tag(sync=True)
    model_name = traitlets.Unicode("").tag(sync=True)
    prompt = traitlets.Unicode("").tag(sync=True)
    target = traitlets.Unicode("").tag(sync=True)
    tokens = traitlets.List().tag(sync=True)
    summary = traitlets.Dict().tag(sync=True)
    base_summary = traitlets.Dict().tag(sync=True)
    diff = traitlets.Dict().tag(sync=True)
    selection = traitlets.Dict().tag(sync=True)
    site = traitlets.Unicode("post").tag(sync=True)
    tab = traitlets.Unicode("attention").tag(sync=True)
    grid_meta = traitlets.Dict().tag(sync=True)
    grid_ids = traitlets.Bytes(b"").tag(sync=True)
    grid_probs = traitlets.Bytes(b"").tag(sync=True)
    grid_ranks = traitlets.Bytes(b"").tag(sync=True)
    grid_changed = traitlets.Bytes(b"").tag(sync=True)   # long prompts: uint8 changed-by-the-patches flags
    norms_meta = traitlets.Dict().tag(sync=True)
    norms = traitlets.Bytes(b"").tag(sync=True)
    patches = traitlets.List().tag(sync=True)
    done_seq = traitlets.Int(0).tag(sync=True)
    status = traitlets.Unicode("").tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)
    code = traitlets.Unicode("").tag(sync=True)

    def __init__(self, lens, prompt, target=None, *, corrupt=None, distractor=None, trace=None, generate=None,
                 sample=False, seed=None, **kwargs):
        if not isinstance(lens, Lens):
            raise LensvizError(f"Explorer needs a lensviz Lens (lv.load() or lv.Lens(model, tokenizer)), got {type(lens).__name__}")
        if trace is not None and (not isinstance(trace, Trace) or trace.lens is not lens):
            raise LensvizError("trace must be a Trace made by this Lens")
        check_keywords(kwargs)
        if generate is not None:
            generate = stepping.check_generate(generate)
            if trace is not None:
                raise LensvizError("give either trace= (show an existing trace) or generate= (generate from the prompt)")
        if corrupt is not None and (trace is not None or generate is not None):
            raise LensvizError("corrupt= (a prompt pair) cannot be combined with trace= or generate=")
        if corrupt is None and kwargs.get("tab") == "patching":
            raise LensvizError("tab 'patching' needs a prompt pair: lv.Explorer(lens, clean, corrupt=..., target=...)")
        super().__init__(**kwargs)
        self._setup(lens)
        if trace is not None and distractor is None:
            distractor = trace.distractor_id           # re-runs from the widget keep the trace's metric
        pair_base = self._setup_pair(prompt, corrupt, target, distractor)
        if pair_base is not None:
            self.target = target if isinstance(target, str) else "".join(map(lens.decode, pair_base.target_ids))
            self._show(pair_base, pair_base, (), [], None, True, self.target)
        elif trace is None:
            self.run(prompt, target)
            if generate is not None:
                self.generate(generate, sample=sample, seed=seed)
        else:  # show an existing trace as it is (a patched one next to its unpatched base)
            base = trace if not trace.patches else lens.trace(trace.prompt, trace.target_ids,
                                                              distractor=trace.distractor_id)
            self._show(base, trace, trace.patches, [], None, True, trace.target)
        self._prefetch_head_measure()

    def __repr__(self) -> str:
        n = len(self.trace) if self.trace is not None else 0
        return f"Explorer({self.lens.arch}, {n} tokens, target={self.summary.get('target')!r}, patches={len(self.patches)})"

    def _repr_mimebundle_(self, **kwargs):
        """The widget view plus a static snapshot (``text/html``) for front ends without widget JS:
        nbconvert HTML, GitHub, documentation builds. Front ends with a widget manager show the widget."""
        bundle = super()._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle      # (data, metadata) or data
        if isinstance(data, dict) and self.trace is not None:
            data["text/html"] = snapshot.snapshot_html(self)
        return bundle

    # running ---------------------------------------------------------------------------------------
    @classmethod
    def from_trace(cls, trace, **kwargs) -> "Explorer":
        """An Explorer showing an existing (unpatched or patched) trace without re-running it."""
        return cls(trace.lens, trace.prompt, trace=trace, **kwargs)

    def _setup(self, lens):
        self.lens = lens
        self.base = None
        self.trace = None
        self._patch_objs = ()
        self._stepping = None
        self._step_cache = {}
        self._grid = (0, None, None, "post", False)     # (gen, trace, base, site, lazy) of the grid shown
        self._norms = (None, None)                       # (trace, (meta, buffers) once computed) of the norms
        self._grid_windows = {}                          # (gen, window) -> (meta, buffers), the answered ones
        thread = host_thread()
        self._worker = Worker(self._report_progress, background=thread is not None, thread_class=thread or Thread)
        self.model_name = lens.name   # hub id, folder name or "... (embedded)": never an absolute path
        self._modules = view_sources()
        self.on_msg(self._on_msg)

    def _same_prompt(self, prompt) -> bool:
        if self.base is None:
            return False
        old = self.base.prompt
        return prompt == old or (isinstance(prompt, str) and not isinstance(old, str)
                                 and all(isinstance(p, str) for p in old) and prompt == "".join(old))

    def run(self, prompt=None, target=None, patches=None) -> None:
        """Re-run on a new prompt / target / patch set (None keeps the current one). Errors raise."""
        prompt, target = self._stepped(prompt, target)
        if prompt is None or self._same_prompt(prompt):
            prompt = self.base.prompt if self.base is not None else prompt
        target = (self.target or None) if target is None else (target or None)
        if patches is not None and not isinstance(patches, (list, tuple)):
            raise LensvizError(f"patches must be a list of patch objects, got {type(patches).__name__}")
        specs = list(self.patches) if patches is None else list(patches)
        t0 = time.perf_counter()
        new_base = (self.base is None or not self._same_prompt(prompt) or
                    (target is not None and self.lens.token_ids(target) != list(self.base.target_ids)) or
                    (target is None and bool(self.target)))
        base = self._pair_base(prompt, target) if new_base else self.base
        objs = tuple(patch_from_spec(s, self.lens, base, self._pair) for s in specs)
        if objs:
            tr = self.lens.trace(prompt, base.target_ids, distractor=base.distractor_id, patches=objs, base=base,
                                 backward=self.tab in GRADIENT_TABS)
        else:
            tr = base
        self._show(base, tr, objs, specs, time.perf_counter() - t0, new_base, target)

    def _show(self, base, tr, objs, specs, elapsed, new_base, target=None) -> None:
        self.base, self.trace, self._patch_objs = base, tr, tuple(objs)
        with self.hold_sync():
            self.prompt = self._shown_prompt(base)
            self.target = "" if target is None else (target if isinstance(target, str) else self.lens.decode(target))
            self.patches = specs
            self.tokens = list(tr.tokens)
            self.summary = payload.summary(self.lens, tr, elapsed)
            self.base_summary = payload.summary(self.lens, base)
            self.diff = P.compare(base, tr, grid=whole_grid(tr)) if objs else {}
            self.code = patch_code(objs) if objs else ""
            sel = dict(self.selection or {})
            t = len(tr)
            if not isinstance(sel.get("position"), int) or not 0 <= sel["position"] < t or new_base:
                sel["position"] = t - 1
            sel.setdefault("layer", self.lens.n_layers - 1)
            sel.setdefault("head", 0)
            self.selection = sel
            self._send_grid()
            self._send_norms()
            self.pair = self.pair_state()
            self.error = ""
            self.status = f"{t} tokens" + (f" · ran in {elapsed:.2f} s" if elapsed is not None else "") + self._step_note()

    def _prefetch_head_measure(self) -> None:
        """The head grid's default measure (DLA) of the first run, computed with it, so the first render's
        request is answered from the cache instead of waiting behind the other views' first requests."""
        try:
            self.head_measure("dla")
        except LensvizError:
            pass                 # the grid's own request then shows the reason in the widget

    def _send_norms(self) -> None:
        """The head norms of the trace shown: in the state (short prompts), or announced as lazy (a new
        generation) and computed on the first "norms" request (`head_norms`)."""
        tr, gen = self.trace, self.norms_meta.get("gen", 0) + 1
        if self._norms[0] is tr:
            return                          # the same run shown again: its norms stand
        self._norms = (tr, None)
        if whole_grid(tr):
            meta, (buf,) = payload.head_norms(tr)
            if not self.norms_meta.get("lazy", True) and buf == self.norms and meta["has_reversed"] == self.norms_meta.get("has_reversed"):
                gen -= 1                    # the same numbers (a re-run): no new generation, the views keep theirs
            self._norms = (tr, ({**meta, "gen": gen, "lazy": False}, [buf]))
            self.norms_meta, self.norms = {**meta, "gen": gen, "lazy": False}, buf
        else:
            self.norms_meta = {"shape": [2, self.lens.n_layers, self.lens.n_heads], "has_reversed": tr.has_backward,
                               "gen": gen, "lazy": True}
            self.norms = b""

    def head_norms(self) -> tuple[dict, list[bytes]]:
        """||A||_F and ||RA||_F per head of the trace shown (`payload.head_norms`), computed once per run."""
        tr, done = self._norms              # one read: a re-run in the worker thread replaces it whole
        if tr is None:
            raise LensvizError("no trace yet")
        if done is None:
            meta, (buf,) = payload.head_norms(tr)
            done = ({**meta, "gen": self.norms_meta.get("gen", 0), "lazy": False}, [buf])
            if self._norms[0] is tr:
                self._norms = (tr, done)
        return done

    def _send_grid(self):
        """A new grid generation for the trace and site shown: the whole grid (short prompts) or its first
        windows (long ones, lazy: the rest on request, changed cells marked per window)."""
        tr, base, site = self.trace, self.base, self.site
        lazy = not whole_grid(tr)
        gen = self._grid[0] + 1
        self._grid_windows = {}
        self._grid = (gen, tr, base if tr is not base else None, site, lazy)
        positions = None
        if lazy:
            first = set(range(min(GRID_FIRST, len(tr))))
            first |= set(window_positions(self.selection.get("position", len(tr) - 1) // GRID_WINDOW, len(tr)))
            positions = sorted(first)
        meta, bufs = payload.logit_lens_grid(tr, site, positions, base=self._grid[2] if lazy else None)
        meta.update(gen=gen, lazy=lazy, window=GRID_WINDOW if lazy else len(tr))
        self.grid_meta, self.grid_ids, self.grid_probs, self.grid_ranks = meta, *bufs[:3]
        self.grid_changed = bufs[3] if len(bufs) > 3 else b""

    def grid_window(self, window) -> tuple[dict, list[bytes]]:
        """The logit-lens grid's positions [window * GRID_WINDOW, (window + 1) * GRID_WINDOW) of the trace and
        site shown, as `payload.logit_lens_grid` (meta also: gen, the grid generation it belongs to, and
        window); answered once per generation (cached). Raises LensvizError for a window out of range."""
        gen, tr, base, site, lazy = self._grid       # one read: a re-run in the worker thread replaces it whole
        if tr is None:
            raise LensvizError("no trace yet")
        n = -(-len(tr) // GRID_WINDOW)
        window = check_int(window, "window", 0, n - 1)
        hit = self._grid_windows.get((gen, window))
        if hit is None:
            meta, bufs = payload.logit_lens_grid(tr, site, window_positions(window, len(tr)), base=base)
            meta.update(gen=gen, lazy=lazy, window=GRID_WINDOW, index=window)
            hit = self._grid_windows[(gen, window)] = (meta, bufs)
        return hit

    def full_grid_state(self) -> dict:
        """The grid traits (and diff, head norms) with the whole [L, T] grid, as a short prompt has them: for
        exports (no kernel there to ask for windows). Computes what was not sent: the whole grid, the head
        norms, and for a patched long prompt the diff's changed cells (lv.compare, both runs' whole grids)."""
        gen, tr, base, site, _ = self._grid
        meta, (ids, probs, ranks) = payload.logit_lens_grid(tr, site)
        meta.update(gen=gen, lazy=False, window=len(tr))
        out = {"grid_meta": meta, "grid_ids": ids, "grid_probs": probs, "grid_ranks": ranks, "grid_changed": b""}
        if self.norms_meta.get("lazy"):
            norms_meta, (buf,) = self.head_norms()
            out.update(norms_meta=norms_meta, norms=buf)
        if self._patch_objs and "changed" not in (self.diff or {}):
            out["diff"] = P.compare(self.base, tr)
        return out

    @traitlets.observe("site")
    def _site_changed(self, change):
        if self.trace is None:
            return
        if change["new"] not in SITES:
            self.error = f"site must be one of {SITES}"
            self.site = change["old"]
            return
        self._send_grid()

    @traitlets.observe("tab")
    def _tab_changed(self, change):
        if change["new"] not in TABS:
            self.error = f"unknown tab {change['new']!r}"
            return
        tr = getattr(self, "trace", None)     # None while __init__ sets tab= (the first run follows)
        if tr is not None and change["new"] in GRADIENT_TABS and not tr.has_backward:
            self._guarded(lambda: self.run())

    # messages from the browser ---------------------------------------------------------------------
    def _guarded(self, fn):
        try:
            return fn()
        except LensvizError as e:
            self.error = str(e)
        except Exception as e:  # never let a widget message crash the kernel
            self.error = f"{type(e).__name__}: {e}"

    def _on_msg(self, widget, content, buffers):
        if not isinstance(content, dict):
            return
        kind = content.get("type")
        # Tell the browser at once that a kernel has the message (it says so itself when none answers).
        self.send({"type": "ack", "id": content.get("id"), "seq": content.get("seq")})
        if kind == "run":
            self._job(content, lambda: self.run(content.get("prompt"), content.get("target", ""),
                                                content.get("patches", [])))
        elif kind in ("generate", "step", "stop"):
            self._on_step_msg(kind, content)
        elif kind in ("sweep", "clean", "importance"):
            self._on_pair_msg(kind, content)
        elif kind == "get":
            rid = content.get("id")
            try:
                meta, bufs = self.answer(content)
                self.send({"type": "reply", "id": rid, "what": content.get("what"), "meta": meta}, bufs)
            except LensvizError as e:
                self.send({"type": "reply", "id": rid, "what": content.get("what"), "error": str(e)})
            except Exception as e:
                self.send({"type": "reply", "id": rid, "what": content.get("what"), "error": f"{type(e).__name__}: {e}"})

    def answer(self, req: dict) -> tuple[dict, list]:
        """Data for one on-demand request from a view: (meta, buffers). Raises LensvizError on bad input."""
        tr, lens = self.trace, self.lens
        what = req.get("what")
        layer = lambda: check_index(req.get("layer"), lens.n_layers, "layer")  # noqa: E731
        head = lambda: check_index(req.get("head"), lens.n_heads, "head")  # noqa: E731
        pos = lambda: check_index(req.get("position"), len(tr), "position")  # noqa: E731
        kind = req.get("kind", "forward")
        if kind not in ("forward", "reversed"):
            raise LensvizError(f"kind must be 'forward' or 'reversed', got {kind!r}")
        if what == "attention":
            scale = req.get("scale", "linear")
            if scale not in payload.MAP_SCALES:
                raise LensvizError(f"scale must be one of {payload.MAP_SCALES}, got {scale!r}")
            return payload.attention_map(tr, layer(), head(), kind, scale)
        if what == "attention_sum":
            axis = req.get("axis", "rows")
            if axis not in ("rows", "cols"):
                raise LensvizError(f"axis must be 'rows' or 'cols', got {axis!r}")
            positions = [check_index(p, len(tr), "position") for p in _int_list(req.get("positions"), "positions")]
            if not positions:
                raise LensvizError("positions must name at least one position")
            return payload.attention_sum(tr, layer(), head(), kind, positions, axis)
        if what == "bl_cell":
            part = req.get("part", "ff2")
            if part not in ("ff1", "ff2"):
                raise LensvizError(f"part must be 'ff1' or 'ff2', got {part!r}")
            return payload.backward_cell(tr, layer(), pos(), part), []
        if what == "thumbs":
            return payload.thumbnails(tr, layer(), kind)
        if what == "cell":
            site = req.get("site", self.site)
            if site not in SITES:
                raise LensvizError(f"site must be one of {SITES}")
            return payload.cell_topk(tr, layer(), pos(), site), []
        if what == "neurons":
            include = req.get("include") or []
            return payload.neurons(tr, layer(), pos(), include=[check_index(n, lens.d_mlp, "neuron")
                                                                for n in _int_list(include, "include")]), []
        if what == "backward":
            return payload.backward_table(tr)
        if what == "flow":
            layers = req.get("layers")
            return payload.flow_graph(tr, pos(), None if layers is None else _int_list(layers, "layers")), []
        if what == "grid":
            return self.grid_window(req.get("window"))
        if what == "norms":
            return self.head_norms()
        if what == "search":
            return payload.value_search(lens, req.get("token")), []
        if what == "masks":
            return payload.masks(tr), []
        if what == "sweep":
            return self.answer_sweep(req)
        if what == "importance":
            return self.answer_importance(req)
        raise LensvizError(f"unknown request {what!r}")

    def to_json(self) -> str:
        """The synced state as JSON (bytes as lists) — for debugging and tests."""
        state = self.get_state()
        return json.dumps({k: (list(v) if isinstance(v, (bytes, memoryview)) else v) for k, v in state.items()},
                          default=str)

