"""Llama family (Llama 2/3, SmolLM2, Mistral): RMSNorm, RoPE, grouped-query attention, SwiGLU MLP."""
from .base import Adapter

ADAPTER = Adapter(
    family="llama",
    model_types=("llama", "mistral"),
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
)
