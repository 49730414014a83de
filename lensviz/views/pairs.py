"""The Explorer's prompt pairs (a traitlets mixin of `Explorer`, kept apart from its class body):
``lv.Explorer(lens, clean, corrupt=..., target=..., distractor=...)``.

The views show the corrupt run, the one patches go into; the clean run is the source of activation
patches. The patching tab's heatmap is a `lens.patching_sweep` of the pair: the attribution map at
once (from the corrupt run's captured backward pass), the exact one on demand as a background job with
progress and Stop. A cell is one patch: `ActivationPatch(clean, layer, site, positions=[p])` for the
residual sites, `HeadPatch(clean, layer, [h])` for site "head". The head grid's measures come from
`lv.head_importance` (plus "norm", ||A||_F per head).
"""
from __future__ import annotations

import time

import traitlets

from ..capture import Cancelled
from ..checks import SITES, check_choice, check_index
from ..errors import LensvizError
from ..lenses.importance import MEASURES
from ..patches import ActivationPatch, HeadPatch
from ..sweeps import METHODS, SWEEP_SITES
from ..trace import Trace
from . import payload

PAIR_PATCHES = ("activation", "head")
HEAD_MEASURES = MEASURES + ("norm",)
PROGRESS_EVERY = 0.1   # seconds between an exact sweep's progress messages


class Pair:
    """The clean trace (patch source) and the cached sweeps {(site, method): PatchingSweep} of one pair."""

    def __init__(self, clean, sweeps=None):
        self.clean = clean
        self.sweeps = dict(sweeps or {})


def make_pair(lens, clean, corrupt, target, distractor):
    """(Pair, unpatched corrupt Trace with its backward pass). Prompts of different token lengths raise the
    sweep's LensvizError, which says how to align them."""
    if corrupt is None or isinstance(corrupt, bool) or not isinstance(corrupt, (str, list, tuple)):
        raise LensvizError(f"corrupt must be a prompt (str or a list of segments), got {type(corrupt).__name__}")
    sw = lens.patching_sweep(clean, corrupt, target=target, distractor=distractor, site="post", method="attribution")
    return Pair(sw.clean, {("post", "attribution"): sw}), sw.corrupt


def patch_from_spec(spec, lens, pair) -> object:
    """A pair patch from a widget message: {"type": "activation", "layer", "site", "position"} or
    {"type": "head", "layer", "heads"}; the clean run is the source."""
    if pair is None:
        raise LensvizError(f"a {spec['type']!r} patch copies the clean run's activations: it needs a prompt pair, "
                           "lv.Explorer(lens, clean, corrupt=..., target=...)")
    layer = check_index(spec.get("layer"), lens.n_layers, "layer")
    if spec["type"] == "activation":
        site = spec.get("site", "post")
        if site not in SITES:
            raise LensvizError(f"site must be one of {SITES}, got {site!r}")
        position = check_index(spec.get("position"), len(pair.clean), "position")
        return ActivationPatch(pair.clean, layer, site, positions=[position])
    heads = spec.get("heads")
    if isinstance(heads, bool) or not isinstance(heads, list) or not heads:
        raise LensvizError(f"heads must be a non-empty list of head indices, got {heads!r}")
    return HeadPatch(pair.clean, layer, [check_index(h, lens.n_heads, "head") for h in heads])


def code_arg(value) -> str:
    """How a patch field reads in "copy as code": a source trace is the pair's clean trace."""
    return "clean" if isinstance(value, Trace) else repr(value)


class Pairs(traitlets.HasTraits):
    """Prompt-pair state and messages; the Explorer provides lens, base, trace, _job, _guarded, send."""

    # {kind, target, distractor, metric (shown run), appended, and with a pair: clean_prompt, clean_tokens,
    #  metric_clean, metric_corrupt, differ}; see pair_state
    pair = traitlets.Dict().tag(sync=True)

    _pair = None
    _distractor = None

    def _setup_pair(self, clean, corrupt, target, distractor):
        self._distractor = distractor
        self._importance = []      # (run, measure, (meta, buffers)) for the runs shown
        if corrupt is None:
            return None
        self._pair, base = make_pair(self.lens, clean, corrupt, target, distractor)
        return base

    def _pair_base(self, prompt, target):
        """A new unpatched base run for `prompt` and `target` (in a pair: a new pair with the same clean prompt)."""
        if self._pair is None:
            return self.lens.trace(prompt, target, distractor=self._distractor)
        pair, base = make_pair(self.lens, self._pair.clean.prompt, prompt, target, self._distractor)
        self._pair = pair
        return base

    def set_clean(self, clean) -> None:
        """Replace the clean prompt of the pair (same token length as the corrupt one) and re-run."""
        if self._pair is None:
            raise LensvizError("this Explorer has no prompt pair: lv.Explorer(lens, clean, corrupt=..., target=...)")
        if not isinstance(clean, str) or not clean:
            raise LensvizError(f"clean must be a non-empty prompt string, got {clean!r}")
        target = self.target or None
        self._pair, base = make_pair(self.lens, clean, self.base.prompt, target, self._distractor)
        self.base = base
        self.run(patches=[s for s in self.patches if s.get("type") not in PAIR_PATCHES])

    def pair_state(self) -> dict:
        tr, base = self.trace, self.base
        out = {"kind": "logit_diff" if tr.distractor_id is not None else "logprob", "target": tr.target,
               "distractor": tr.distractor, "metric": float(tr.metric), "metric_base": float(base.metric),
               "appended": tr.appended, "explained": tr.explained_positions}
        if self._pair is not None:
            clean = self._pair.clean
            prompt = clean.prompt if isinstance(clean.prompt, str) else "".join(clean.prompt)
            out.update(clean_prompt=prompt, clean_tokens=list(clean.tokens), metric_clean=float(clean.metric),
                       metric_corrupt=float(base.metric),
                       differ=[i for i, (a, b) in enumerate(zip(clean.input_ids.tolist(), base.input_ids.tolist()))
                               if a != b])
        return out

    # requests and jobs ------------------------------------------------------------------------------
    def sweep(self, site: str = "post", method: str = "attribution", *, progress=None):
        """The pair's PatchingSweep at `site` by `method` (cached per pair)."""
        if self._pair is None:
            raise LensvizError("the patching heatmap needs a prompt pair: lv.Explorer(lens, clean, corrupt=..., target=...)")
        check_choice(site, SWEEP_SITES, "site")
        check_choice(method, METHODS, "method")
        key = (site, method)
        if key not in self._pair.sweeps:
            self._pair.sweeps[key] = self.lens.patching_sweep(self._pair.clean, self.base, site=site, method=method,
                                                              progress=progress)
        return self._pair.sweeps[key]

    def answer_sweep(self, req: dict):
        site, method = req.get("site", "post"), req.get("method", "attribution")
        check_choice(site, SWEEP_SITES, "site")
        check_choice(method, METHODS, "method")
        if method == "exact" and self._pair is not None and (site, method) not in self._pair.sweeps:
            return {"site": site, "method": method, "missing": True}, []
        return payload.sweep_effect(self.sweep(site, method))

    def _measured(self, measure):
        """The run a head measure is taken of: the shown one, or the unpatched one where the measure needs it."""
        tr = self.trace
        if tr.patches and (measure == "ablation" or (measure == "ra" and not tr.has_backward)):
            tr = self.base      # ablation needs an unpatched run (its blocks are reused)
        return tr

    def head_measure(self, measure: str = "dla", *, progress=None):
        """(meta, buffers) of a head measure (HEAD_MEASURES) of the run shown, computed once per run."""
        check_choice(measure, HEAD_MEASURES, "measure")
        tr = self._measured(measure)
        self._importance = [e for e in self._importance if e[0] is self.trace or e[0] is self.base]
        for run, m, result in self._importance:
            if run is tr and m == measure:
                return result
        meta, bufs = payload.head_importance(tr, measure, progress=progress)
        result = ({**meta, "of": "unpatched" if tr is not self.trace else "shown"}, bufs)
        self._importance.append((tr, measure, result))
        return result

    def answer_importance(self, req: dict):
        """A head measure; the exact ablation (one batched run per layer) is a job: until it ran, "missing"."""
        measure = req.get("measure", "dla")
        check_choice(measure, HEAD_MEASURES, "measure")
        tr = self._measured(measure)
        if measure == "ablation" and not any(run is tr and m == measure for run, m, _ in self._importance):
            return {"measure": measure, "missing": True}, []
        return self.head_measure(measure)

    def _job_progress(self, kind, what, **extra):
        started, last = time.perf_counter(), [0.0]

        def progress(done, total):
            if self._worker.stop_requested:
                raise Cancelled(f"{what} stopped by the user after {done} of {total}")
            now = time.perf_counter()
            if now - last[0] >= PROGRESS_EVERY or done == total:
                last[0] = now
                self.send({"type": kind, **extra, "done": done, "total": total, "seconds": round(now - started, 2)})

        return progress

    def _importance_job(self, measure) -> None:
        check_choice(measure, HEAD_MEASURES, "measure")
        self.head_measure(measure, progress=self._job_progress("importance_progress", f"{measure} of every head",
                                                             measure=measure))
        self.send({"type": "importance_done", "measure": measure})

    def _exact_sweep(self, site) -> None:
        started = time.perf_counter()
        self.sweep(site, "exact", progress=self._job_progress("sweep_progress", "exact sweep", site=site))
        self.send({"type": "sweep_done", "site": site, "method": "exact",
                   "seconds": round(time.perf_counter() - started, 2)})

    def _on_pair_msg(self, kind, content) -> None:
        if kind == "sweep":
            site = content.get("site", "post")
            self._job(content, lambda: (check_choice(site, SWEEP_SITES, "site"), self._exact_sweep(site)))
        elif kind == "importance":
            self._job(content, lambda: self._importance_job(content.get("measure")))
        else:  # "clean": a new clean prompt
            self._job(content, lambda: self.set_clean(content.get("clean")))
