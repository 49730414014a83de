"""Phi (Phi-1/1.5/2): parallel attention + MLP reading one LayerNorm, partial rotary
(`partial_rotary_factor`), optional q/k LayerNorms (`qk_layernorm`), output projection `dense`, GELU MLP
`fc1` -> `fc2`, final LayerNorm `final_layernorm`, unembedding with a bias."""
from .base import Adapter

ADAPTER = Adapter(
    family="phi",
    model_types=("phi",),
    embed="model.embed_tokens",
    blocks="model.layers",
    final_norm="model.final_layernorm",
    unembed="lm_head",
    ln1="input_layernorm",
    attn="self_attn",
    ln2="input_layernorm",
    mlp="mlp",
    o_proj="self_attn.dense",
    mlp_in="mlp.fc1",
    mlp_out="mlp.fc2",
    q_proj="self_attn.q_proj",
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
    norm="layernorm",
    parallel_residual=True,
    notes="parallel block; partial rotary; qk_layernorm",
)
