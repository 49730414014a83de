"""GPT-2: Conv1D weights ([in, out]), fused c_attn ([q | k | v]), LayerNorm with bias, learned positions.

`scale_attn_by_inverse_layer_idx` needs nothing here: HF folds it into the `scaling` it passes to the
attention function, which capture records per layer.
"""
from .base import Adapter


def d_mlp_n_inner(config) -> int:
    """F = n_inner, or 4 * d_model where it is unset (GPT-2, GPT-J)."""
    return int(config.n_inner or 4 * config.hidden_size)


# The module tree GPT-2 and GPT-J share: `transformer.{wte, h, ln_f}` and `lm_head`, `ln_1` + `attn` per block.
TRANSFORMER_TREE = dict(embed="transformer.wte", blocks="transformer.h", final_norm="transformer.ln_f",
                        unembed="lm_head", ln1="ln_1", attn="attn")


ADAPTER = Adapter(
    family="gpt2",
    model_types=("gpt2",),
    **TRANSFORMER_TREE,
    ln2="ln_2",
    mlp="mlp",
    o_proj="attn.c_proj",
    mlp_in="mlp.c_fc",
    mlp_out="mlp.c_proj",
    qkv="attn.c_attn",
    qkv_split="concat",
    weight_layout="conv1d",
    norm="layernorm",
    rotary=False,
    d_mlp=d_mlp_n_inner,
)
