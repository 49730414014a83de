"""OLMo 2: no norm before the sublayers; RMSNorms after them (`post_attention_layernorm` on the attention
output, `post_feedforward_layernorm` on the MLP output) before the residual add, and RMSNorms on the full
q and k projections (before RoPE).

Per-head and per-neuron writes use the post-norm with its scale frozen at the run's value:
N(y) = g * y / rms(y) is diagonal given rms(y), so head h writes g * (O_h W_O,h) / rms(y) and the
heads sum to the real write (see `Adapter.frozen_norm_gain`)."""
from dataclasses import replace

from .llama import ADAPTER as LLAMA

ADAPTER = replace(LLAMA, family="olmo2", model_types=("olmo2",), ln1=None, ln2=None,
                  post_attn_norm="post_attention_layernorm", post_mlp_norm="post_feedforward_layernorm",
                  notes="post-sublayer RMSNorms (frozen-scale decomposition); q/k RMSNorm")
