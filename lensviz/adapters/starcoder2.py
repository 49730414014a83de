"""StarCoder 2: Llama-style attention (GQA, RoPE, biases, sliding window) with LayerNorm (bias) and a
plain GELU MLP `c_fc` -> `c_proj`."""
from dataclasses import replace

from .llama import ADAPTER as LLAMA

ADAPTER = replace(LLAMA, family="starcoder2", model_types=("starcoder2",), norm="layernorm", mlp_in="mlp.c_fc",
                  mlp_gate=None, mlp_out="mlp.c_proj", notes="LayerNorm with bias; ungated MLP; sliding window")
