"""lensviz: look inside transformer language models, forward and backward, from a notebook.

    import lensviz as lv
    lens = lv.load()                       # embedded SmolLM2-135M-Instruct, offline
    tr = lens.trace("I visited the city of", target=" Paris")
    tr.attention(3), tr.reversed_attention(3), tr.resid_grad(5)
"""
from .errors import LensvizError, UnsupportedModelError
from .lens import Lens
from .loading import load
from .patches import (ActivationPatch, AttentionPatch, HeadAblation, HeadPatch, NeuronPatch, SegmentMask, ShiftEdit,
                      TopKAttention, compare)
from .trace import Trace
from .vocab import TopK

_LAZY_MODULES = {"plot": ".plot", "icl": ".studies.icl"}  # lv.plot (matplotlib), lv.icl (ICL vs GD study)
# names imported on first use (PEP 562), so that `import lensviz` + `lv.load()` import only what loading needs:
# the widget pulls in anywidget, the export every view's payload, the lenses their own modules
_LAZY_NAMES = {"Explorer": ".views.explorer", "export_html": ".export",
               "direct_logit_attribution": ".lenses.attribution", "head_importance": ".lenses.importance",
               "keep_top_heads": ".lenses.importance", "ra_head_ranking": ".lenses.importance"}


def __getattr__(name):
    import importlib

    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
        globals()[name] = value        # later look-ups are plain attribute reads
        return value
    if name in _LAZY_MODULES:
        return importlib.import_module(_LAZY_MODULES[name], __name__)
    raise AttributeError(f"module 'lensviz' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_NAMES) | set(_LAZY_MODULES))


def load_ipython_extension(ipython):
    """`%load_ext lensviz` registers the %%lensviz cell magic."""
    from .views.magic import load_ipython_extension as load

    load(ipython)


__all__ = ["Explorer", "plot", "export_html", "direct_logit_attribution", "head_importance", "keep_top_heads",
           "ra_head_ranking", "ActivationPatch", "AttentionPatch", "HeadAblation", "HeadPatch", "Lens", "LensvizError", "NeuronPatch", "SegmentMask",
           "ShiftEdit", "TopK", "TopKAttention", "Trace", "UnsupportedModelError", "compare", "load"]
from .version import __version__  # noqa: E402  (the installed metadata; pyproject.toml is the source)
