"""GPT-NeoX (Pythia): fused query_key_value laid out per head ([q k v] for each head), partial
rotary embeddings, LayerNorm with bias, and a parallel residual when `use_parallel_residual` is set.
"""
from .base import Adapter

ADAPTER = Adapter(
    family="gpt_neox",
    model_types=("gpt_neox",),
    embed="gpt_neox.embed_in",
    blocks="gpt_neox.layers",
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head",
    ln1="input_layernorm",
    attn="attention",
    ln2="post_attention_layernorm",
    mlp="mlp",
    o_proj="attention.dense",
    mlp_in="mlp.dense_h_to_4h",
    mlp_out="mlp.dense_4h_to_h",
    qkv="attention.query_key_value",
    qkv_split="per_head",
    norm="layernorm",
    parallel_residual="use_parallel_residual",
)
