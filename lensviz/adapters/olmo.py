"""OLMo (1): the Llama layout with a LayerNorm without affine parameters everywhere (`OlmoLayerNorm`)
and optional clipping of q/k/v (`clip_qkv`, inside the attention module, before capture sees them)."""
from dataclasses import replace

from .llama import ADAPTER as LLAMA

ADAPTER = replace(LLAMA, family="olmo", model_types=("olmo",), norm="layernorm",
                  notes="non-parametric LayerNorm; clip_qkv")
