"""lensviz: look inside transformer language models, forward and backward, from a notebook.

    import lensviz as lv
    lens = lv.load()                       # embedded SmolLM2-135M-Instruct, offline
    tr = lens.trace("I visited the city of", target=" Paris")
    tr.attention(3), tr.reversed_attention(3), tr.resid_grad(5)
"""
from .errors import LensvizError, UnsupportedModelError
from .export import export_html
from .lens import Lens
from .lenses.attribution import direct_logit_attribution
from .lenses.importance import head_importance, keep_top_heads, ra_head_ranking
from .loading import load
from .patches import (ActivationPatch, AttentionPatch, HeadAblation, HeadPatch, NeuronPatch, SegmentMask, ShiftEdit,
                      TopKAttention, compare)
from .trace import Trace
from .vocab import TopK

_LAZY_MODULES = {"plot": ".plot", "icl": ".studies.icl"}  # lv.plot (matplotlib), lv.icl (ICL vs GD study)


def __getattr__(name):  # the widget pulls in anywidget, plot matplotlib: import them only when asked for
    if name == "Explorer":
        from .views.explorer import Explorer

        return Explorer
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(_LAZY_MODULES[name], __name__)
    raise AttributeError(f"module 'lensviz' has no attribute {name!r}")


def load_ipython_extension(ipython):
    """`%load_ext lensviz` registers the %%lensviz cell magic."""
    from .views.magic import load_ipython_extension as load

    load(ipython)


__all__ = ["Explorer", "plot", "export_html", "direct_logit_attribution", "head_importance", "keep_top_heads",
           "ra_head_ranking", "ActivationPatch", "AttentionPatch", "HeadAblation", "HeadPatch", "Lens", "LensvizError", "NeuronPatch", "SegmentMask",
           "ShiftEdit", "TopK", "TopKAttention", "Trace", "UnsupportedModelError", "compare", "load"]
from .version import __version__  # noqa: E402  (the installed metadata; pyproject.toml is the source)
