"""The Explorer's generation step-through, background runs (progress, Stop), keyword and selection checks:
a traitlets mixin of `Explorer` (views/explorer.py), kept apart from the class body. A generation is made
once; step k shows the prompt plus k generated tokens with token k as the target, traced when shown.
"""
from __future__ import annotations

import traitlets

from ..capture import Cancelled
from ..checks import SITES, check_index_list
from ..errors import LensvizError
from . import stepping

TABS = ("attention", "reversed", "neurons", "backward", "flow", "masks", "patching")


_OWN_KEYWORDS = ("target", "corrupt", "distractor", "trace", "generate", "sample", "seed")
_WIDGET_KEYWORDS = ("tab", "site", "layout")


def check_keywords(kwargs: dict) -> None:
    """Explorer keywords beyond its own: only `tab`, `site` (checked) and the widget's `layout`."""
    unknown = sorted(k for k in kwargs if k not in _WIDGET_KEYWORDS)
    if unknown:
        raise LensvizError(f"lv.Explorer got unknown keyword(s) {', '.join(map(repr, unknown))}; allowed: lens, "
                           f"prompt, {', '.join(_OWN_KEYWORDS + _WIDGET_KEYWORDS)}")
    if "tab" in kwargs and kwargs["tab"] not in TABS:
        raise LensvizError(f"tab must be one of {TABS}, got {kwargs['tab']!r}")
    if "site" in kwargs and kwargs["site"] not in SITES:
        raise LensvizError(f"site must be one of {SITES}, got {kwargs['site']!r}")


def _seq(content) -> int:
    seq = content.get("seq", 0)
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else 0


def check_selection(sel, n_tokens: int, n_layers: int, n_heads: int) -> dict:
    """A selection from the browser: {position, layer, head, range?, positions?}, every index in range."""
    if not isinstance(sel, dict):
        raise LensvizError(f"selection must be an object, got {type(sel).__name__}")
    unknown = set(sel) - {"position", "layer", "head", "range", "positions"}
    if unknown:
        raise LensvizError(f"selection has unknown keys {sorted(unknown)}")
    out = dict(sel)
    for key, n in (("position", n_tokens), ("layer", n_layers), ("head", n_heads)):
        if key in sel:
            v = sel[key]
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
                raise LensvizError(f"selection {key} must be an int in 0..{n - 1}, got {v!r}")
    for key in ("range", "positions"):
        v = sel.get(key)
        if v is None:
            continue
        if not isinstance(v, list) or any(isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < n_tokens
                                          for p in v) or (key == "range" and len(v) != 2):
            raise LensvizError(f"selection {key} must be a list of {'two positions' if key == 'range' else 'positions'} "
                               f"in 0..{n_tokens - 1}, got {v!r}")
        out[key] = check_index_list(v, n_tokens, key, "position") if key == "positions" and v else v
    return out


class _Step(traitlets.TraitType):
    """The step traitlet: every value (None too) goes through the owner's validate_step (LensvizError)."""

    allow_none = False        # None then reaches validate too, and gets lensviz's message

    def validate(self, obj, value):
        return obj.validate_step(value)


class StepThrough(traitlets.HasTraits):
    """Generation step-through and background runs; the Explorer provides lens, base, trace, run(),
    _guarded(), _patch_objs, error, done_seq and send()."""

    # -1 = not generating; else the step shown (prompt + `step` generated tokens, target = token `step`)
    step = _Step(-1).tag(sync=True)
    generated = traitlets.List().tag(sync=True)
    generation = traitlets.Dict().tag(sync=True)
    runs = traitlets.Int(0).tag(sync=True)   # widget jobs (runs of the model) the kernel has carried out

    def generate(self, n: int = 20, *, sample: bool = False, seed: int | None = None) -> None:
        """Generate `n` tokens from the prompt (greedy, or sampled with `seed`) with the current patch set
        installed as in `Lens.generate`, then show step 0; `ex.step = k` shows step k."""
        n = stepping.check_generate(n)
        prompt = self._stepping.prompt if self._stepping is not None else self.base.prompt
        st = stepping.generate(self.lens, prompt, n, self._patch_objs, sample=sample, seed=seed)
        self._stepping, self._step_cache = st, {}
        self.generated = list(st.tokens)
        self.generation = {"n": len(st), "sample": sample, "seed": seed,
                           "prompt_tokens": len(self.lens.encode(prompt)[0])}
        if self.step == 0:
            self._show_step(0)
        else:
            self.step = 0

    def _show_step(self, k: int) -> None:
        st = self._stepping
        cached = self._step_cache.get(k)
        if cached is not None:
            self.base = cached
        self.run(st.prefix(k), st.target(k))
        self._step_cache[k] = self.base
        while len(self._step_cache) > 8:           # keep the last few steps' unpatched traces
            self._step_cache.pop(next(iter(self._step_cache)))

    def _stepped(self, prompt, target):
        """In a generation: the current step's prefix and target, unless a new prompt leaves it."""
        st = self._stepping
        if st is None or self.step < 0:
            return prompt, target
        if prompt is None or prompt == st.prefix(self.step) or prompt == self._shown_prompt(None) or prompt == st.prompt:
            return st.prefix(self.step), st.target(self.step)
        self._stepping, self._step_cache = None, {}
        self.generated, self.generation = [], {}
        self.step = -1
        return prompt, (target or None)

    def _shown_prompt(self, base) -> str:
        st = self._stepping
        prompt = st.prompt if st is not None else base.prompt
        return prompt if isinstance(prompt, str) else "".join(prompt)

    def _step_note(self) -> str:
        st = self._stepping
        if st is None or self.step < 0:
            return ""
        return f" · step {self.step} of {len(st)} (target = generated token {self.step})"

    def validate_step(self, k):
        if getattr(self, "_step_reverting", False):
            return k
        if getattr(self, "_stepping", None) is None:
            if k == -1:
                return k
            raise LensvizError("step needs a generation: lv.Explorer(lens, prompt, generate=20), ex.generate(20) "
                               "or the Generate button")
        return self._stepping.check_step(k)

    @traitlets.observe("step")
    def _step_changed(self, change):
        if change["new"] < 0 or self._stepping is None or getattr(self, "_step_reverting", False):
            return
        try:
            self._show_step(change["new"])
        except Exception:        # a failed or stopped step: the step shown stays the one on screen
            self._step_reverting = True
            try:
                self.step = change["old"]
            finally:
                self._step_reverting = False
            raise

    @traitlets.observe("selection")
    def _selection_changed(self, change):
        if self.trace is None:
            return
        try:
            check_selection(change["new"], len(self.trace), self.lens.n_layers, self.lens.n_heads)
        except LensvizError as e:
            self.error = str(e)
            self.selection = change["old"] if isinstance(change["old"], dict) else {}

    def _report_progress(self, done: int, stage: str, seconds: float) -> None:
        self.send({"type": "progress", "done": done, "stage": stage, "seconds": round(seconds, 2),
                   "n_layers": self.lens.n_layers})

    def _job(self, content, fn) -> None:
        seq = _seq(content)

        def go():
            self._guarded(lambda: self._stoppable(fn))
            self.runs += 1
            self.done_seq = seq
        self._worker.submit(go)

    def _stoppable(self, fn) -> None:
        """fn(); a run ended by Stop is no error: the status says so and the view shown stays."""
        try:
            fn()
        except Cancelled as e:
            self.error = ""
            self.status = f"{e}; showing the last finished run" + self._step_note()

    def _on_step_msg(self, kind, content) -> None:
        if kind == "stop":
            if not self._worker.stop():
                self.send({"type": "progress", "done": 0, "stage": "idle", "seconds": 0.0, "n_layers": self.lens.n_layers})
            return
        if kind == "step":
            k = content.get("step")
            self._job(content, lambda: setattr(self, "step", k))
            return
        n, sample, seed = content.get("n"), content.get("sample", False), content.get("seed")
        self._job(content, lambda: self.generate(n, sample=sample, seed=seed))

    @property
    def threaded(self) -> bool:
        """True when widget runs go to a background thread (in a notebook kernel), so Stop can reach them."""
        return self._worker.background

    def wait(self, timeout: float | None = None) -> None:
        """Until the widget's background run (if any) has finished."""
        self._worker.wait(timeout)
