"""Phi-3: the Llama block with fused projections: `qkv_proj` is [q (H*d) | k (H_kv*d) | v (H_kv*d)]
along its output features, `gate_up_proj` is [gate (F) | up (F)]; the Backward Lens treats the fused
FF1 as one matrix (its gradient is x^T delta over 2F outputs). Optional sliding window."""
from dataclasses import replace

from .llama import ADAPTER as LLAMA

ADAPTER = replace(LLAMA, family="phi3", model_types=("phi3",), q_proj=None, k_proj=None, v_proj=None,
                  qkv="self_attn.qkv_proj", qkv_split="concat", mlp_in="mlp.gate_up_proj", mlp_gate=None,
                  gate_up=True, notes="fused qkv_proj and gate_up_proj")
