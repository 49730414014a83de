"""Patches: interventions applied to one run only (frozen dataclasses; see base.Patch)."""
from .ablation import HeadAblation, NeuronPatch
from .activation import ActivationPatch, activation_patching_sweep
from .attention import AttentionPatch, TopKAttention, topk_fidelity
from .base import Patch
from .compare import compare
from .head import HeadPatch
from .segments import SegmentMask, chat_segments, segment_mask
from .shift import ShiftEdit

__all__ = ["ActivationPatch", "AttentionPatch", "HeadAblation", "HeadPatch", "NeuronPatch", "Patch", "SegmentMask", "ShiftEdit",
           "TopKAttention", "activation_patching_sweep", "chat_segments", "compare", "segment_mask", "topk_fidelity"]
