"""Qwen 3 (dense): the Llama layout with per-head RMSNorms on q and k (`self_attn.q_norm` / `k_norm`,
applied before RoPE; capture records q and k after both), optional sliding-window layers
(`layer_types`), no q/k/v biases. Nothing to declare beyond the module names: the norms live inside
the attention module and HF's own masks carry the windows."""
from dataclasses import replace

from .llama import ADAPTER as LLAMA

ADAPTER = replace(LLAMA, family="qwen3", model_types=("qwen3",),
                  notes="q/k RMSNorm per head before RoPE; sliding-window layers from layer_types")
