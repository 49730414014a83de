"""OPT: learned positions (added by the decoder, offset 2), pre-LayerNorm blocks whose MLP is the block's
own `fc1` -> activation -> `fc2` (no MLP module), which HF runs on tokens flattened to [T, D], and a
query pre-scaled by head_dim^-1/2 (the attention is called with scaling 1, so RA is dL/d of the scores
themselves; `Lens.attention_weights` folds the factor into W_Q).
OPT-350m is refused with UnsupportedModelError: its blocks are post-LayerNorm (`do_layer_norm_before=False`),
renormalising the residual inside every block so that head and neuron writes do not add up to it, and
its embeddings are projected (`word_embed_proj_dim` 512 -> 1024 -> 512), so W_U does not read the
residual stream."""
from ..errors import UnsupportedModelError
from .base import Adapter


def _check(config) -> None:
    if not getattr(config, "do_layer_norm_before", True):
        raise UnsupportedModelError(
            "OPT with do_layer_norm_before=False (post-LayerNorm, e.g. facebook/opt-350m) is not supported: each "
            "block renormalises the residual stream, so head and neuron writes do not add up to it. Use a "
            "pre-LayerNorm OPT (opt-125m, opt-1.3b and larger)")
    if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
        raise UnsupportedModelError(
            f"OPT with word_embed_proj_dim={config.word_embed_proj_dim} != hidden_size={config.hidden_size} is not "
            "supported: project_in / project_out sit between the residual stream and the (un)embedding. Use "
            "opt-125m, opt-1.3b or larger")


ADAPTER = Adapter(
    family="opt",
    model_types=("opt",),
    embed="model.decoder.embed_tokens",
    blocks="model.decoder.layers",
    final_norm="model.decoder.final_layer_norm",
    unembed="lm_head",
    ln1="self_attn_layer_norm",
    attn="self_attn",
    ln2="final_layer_norm",
    mlp=None,
    mlp_seq=("fc1", "activation_fn", "fc2"),
    o_proj="self_attn.out_proj",
    mlp_in="fc1",
    mlp_out="fc2",
    q_proj="self_attn.q_proj",
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
    norm="layernorm",
    rotary=False,
    d_mlp=lambda config: int(config.ffn_dim),
    query_scale=lambda config: (config.hidden_size // config.num_attention_heads) ** -0.5,
    check=_check,
    notes="learned positions; block-level MLP (flattened tokens); pre-LN only",
)
