"""Qwen2 / Qwen2.5: the Llama layout with biases on q/k/v (RMSNorm, RoPE, GQA, SwiGLU)."""
from .base import Adapter

ADAPTER = Adapter(
    family="qwen2",
    model_types=("qwen2",),
    embed="model.embed_tokens",
    blocks="model.layers",
    final_norm="model.norm",
    unembed="lm_head",
    ln1="input_layernorm",
    attn="self_attn",
    ln2="post_attention_layernorm",
    mlp="mlp",
    o_proj="self_attn.o_proj",
    mlp_in="mlp.up_proj",
    mlp_gate="mlp.gate_proj",
    mlp_out="mlp.down_proj",
    q_proj="self_attn.q_proj",
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
    notes="q/k/v projections carry a bias",
)
