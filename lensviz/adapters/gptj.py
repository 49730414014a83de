"""GPT-J: parallel attention + MLP reading one LayerNorm `ln_1`, rotary on the first `rotary_dim` dims of
each head with interleaved pairs (capture records q, k after it), separate q/k/v/out projections
without bias, GELU MLP `fc_in` -> `fc_out`, unembedding with a bias."""
from .base import Adapter
from .gpt2 import TRANSFORMER_TREE, d_mlp_n_inner


ADAPTER = Adapter(
    family="gptj",
    model_types=("gptj",),
    **TRANSFORMER_TREE,
    ln2="ln_1",
    mlp="mlp",
    o_proj="attn.out_proj",
    mlp_in="mlp.fc_in",
    mlp_out="mlp.fc_out",
    q_proj="attn.q_proj",
    k_proj="attn.k_proj",
    v_proj="attn.v_proj",
    norm="layernorm",
    parallel_residual=True,
    d_mlp=d_mlp_n_inner,
    notes="parallel block; partial interleaved rotary (rotary_dim)",
)
