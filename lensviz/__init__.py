"""lensviz: look inside transformer language models, forward and backward, from a notebook.

    import lensviz as lv
    lens = lv.load()                       # embedded SmolLM2-135M-Instruct, offline
    tr = lens.trace("I visited the city of", target=" Paris")
    tr.attention(3), tr.reversed_attention(3), tr.resid_grad(5)
"""
from .errors import LensvizError, UnsupportedModelError
from .lens import Lens
from .loading import load
from .patches import (ActivationPatch, AttentionPatch, HeadAblation, NeuronPatch, SegmentMask, ShiftEdit,
                      TopKAttention, compare)
from .trace import Trace

__all__ = ["ActivationPatch", "AttentionPatch", "HeadAblation", "Lens", "LensvizError", "NeuronPatch", "SegmentMask",
           "ShiftEdit", "TopKAttention", "Trace", "UnsupportedModelError", "compare", "load"]
__version__ = "0.1.0"
