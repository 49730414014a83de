"""Architecture adapters, one module per family. `adapter_for(config)` picks the one for a model.

To add a family: write `adapters/<family>.py` defining `ADAPTER` and list it in `_FAMILIES` (and add
its tiny config to tests/test_conformance.py).
"""
from __future__ import annotations

from ..errors import UnsupportedModelError
from . import (cohere, gemma, gemma2, gpt2, gpt_neox, gptj, granite, llama, moe, olmo, olmo2, opt, phi, phi3,
               qwen2, qwen3, smollm3, stablelm, starcoder2)
from .base import Adapter, Dims, text_config

_FAMILIES = (gpt2.ADAPTER, llama.ADAPTER, qwen2.ADAPTER, gpt_neox.ADAPTER, qwen3.ADAPTER, smollm3.ADAPTER,
             starcoder2.ADAPTER, olmo.ADAPTER, olmo2.ADAPTER, gemma.ADAPTER, gemma2.ADAPTER, gemma2.GEMMA3, granite.ADAPTER,
             cohere.ADAPTER, phi.ADAPTER, phi3.ADAPTER, stablelm.ADAPTER, gptj.ADAPTER, opt.ADAPTER,
             moe.MIXTRAL, moe.QWEN3_MOE, moe.GPT_OSS)
_BY_MODEL_TYPE = {mt: a for a in _FAMILIES for mt in a.model_types}
_VARIANTS = (opt.POST_LN,)  # picked from the config by their family's `variant` (no model_type of their own)

# families whose attention does not go through transformers' attention interface: lensviz cannot see
# (or edit) their attention probabilities, so it refuses them instead of recording wrong numbers
_BYPASS = {
    "falcon": "Falcon computes attention in its own forward (with ALiBi or rotary inline)",
    "gpt_neo": "GPT-Neo computes its local/global attention in its own forward",
    "bloom": "BLOOM computes ALiBi attention in its own forward",
}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def families() -> tuple[Adapter, ...]:
    """Every adapter, in registry order (config variants such as post-LN OPT after their family's)."""
    return _FAMILIES + _VARIANTS


def adapter_for(config) -> Adapter:
    """The adapter for an HF config, or `UnsupportedModelError` naming the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type in _BYPASS:
        raise UnsupportedModelError(
            f"{model_type!r} is not supported: {_BYPASS[model_type]}, bypassing transformers' attention interface, "
            "so lensviz cannot record its attention or reversed attention. Use a model whose attention goes through "
            "the interface (e.g. llama, qwen2, gpt_neox, gpt2)")
    adapter = _BY_MODEL_TYPE.get(model_type)
    if adapter is None:
        raise UnsupportedModelError(
            f"lensviz has no adapter for model_type {model_type!r}. Supported model types: "
            f"{', '.join(supported_model_types())} (families: {', '.join(a.family for a in _FAMILIES)}). "
            "Adding one is a small file in lensviz/adapters/."
        )
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{model_type!r} is an encoder-decoder model; lensviz supports causal LMs.")
    if adapter.variant is not None:
        adapter = adapter.variant(text_config(config)) or adapter
    if adapter.check is not None:
        adapter.check(text_config(config))
    return adapter


__all__ = ["Adapter", "Dims", "adapter_for", "families", "supported_model_types"]
