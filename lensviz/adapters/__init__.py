"""Architecture adapters, one module per family. `adapter_for(config)` picks the one for a model.

To add a family: write `adapters/<family>.py` defining `ADAPTER` and list it in `_FAMILIES`.
"""
from __future__ import annotations

from ..errors import UnsupportedModelError
from . import gpt2, gpt_neox, llama, qwen2
from .base import Adapter, Dims

_FAMILIES = (gpt2.ADAPTER, llama.ADAPTER, qwen2.ADAPTER, gpt_neox.ADAPTER)
_BY_MODEL_TYPE = {mt: a for a in _FAMILIES for mt in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def adapter_for(config) -> Adapter:
    """The adapter for an HF config, or `UnsupportedModelError` naming the supported families."""
    model_type = getattr(config, "model_type", None)
    adapter = _BY_MODEL_TYPE.get(model_type)
    if adapter is None:
        raise UnsupportedModelError(
            f"lensviz has no adapter for model_type {model_type!r}. Supported model types: "
            f"{', '.join(supported_model_types())} (families: {', '.join(a.family for a in _FAMILIES)}). "
            "Adding one is a small file in lensviz/adapters/."
        )
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{model_type!r} is an encoder-decoder model; lensviz supports causal LMs.")
    return adapter


__all__ = ["Adapter", "Dims", "adapter_for", "supported_model_types"]
