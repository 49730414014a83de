"""Gemma (1): the Llama layout with RMSNorm gain (1 + w) computed in float32, the embedding multiplied
by sqrt(d_model) inside `embed_tokens` (so capture's embedding call includes it), GeGLU MLP, explicit
head_dim, tied unembedding."""
from dataclasses import replace

from .llama import ADAPTER as LLAMA

ADAPTER = replace(LLAMA, family="gemma", model_types=("gemma",), norm_gain_offset=1.0,
                  notes="(1 + w) RMSNorm; sqrt(d) embedding scale; GeGLU")
