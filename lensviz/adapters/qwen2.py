"""Qwen2 / Qwen2.5: the Llama layout with biases on q/k/v (RMSNorm, RoPE, GQA, SwiGLU).

The module tree is Llama's, part for part; the biases need no field (they are read from the modules).
"""
from dataclasses import replace

from .llama import ADAPTER as LLAMA

ADAPTER = replace(LLAMA, family="qwen2", model_types=("qwen2",), notes="q/k/v projections carry a bias")
