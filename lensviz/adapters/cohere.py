"""Cohere (Command R): parallel attention + MLP reading one LayerNorm without bias (computed in float32),
interleaved RoPE, optional per-head q/k LayerNorms, and `logit_scale` multiplying the logits (in the
vocabulary projection too)."""
from dataclasses import replace

from .llama import ADAPTER as LLAMA

ADAPTER = replace(LLAMA, family="cohere", model_types=("cohere",), ln2="input_layernorm",
                  norm="layernorm", parallel_residual=True, logit_scale="logit_scale",
                  notes="parallel block; bias-free LayerNorm; interleaved RoPE; logit_scale")
