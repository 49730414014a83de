"""OPT: learned positions (added by the decoder, offset 2), pre-LayerNorm blocks whose MLP is the block's
own `fc1` -> activation -> `fc2` (no MLP module), which HF runs on tokens flattened to [T, D], and a
query pre-scaled by head_dim^-1/2 (the attention is called with scaling 1, so RA is dL/d of the scores
themselves; `Lens.attention_weights` folds the factor into W_Q).

OPT-350m-style configs are refused with UnsupportedModelError. Two properties block them:
- post-LayerNorm blocks (`do_layer_norm_before=False`): each block computes m = LN_1(r + attn(r)) and
  r' = LN_2(m + mlp(m)), so the norm acts on the residual itself, not on a sublayer's output. A sound
  decomposition exists (with the LayerNorm scale frozen at this run, LN(r + y) = g/s (P r) + g/s (P y) + b
  with P the centring, so the residual, every head and every neuron map through the same affine part),
  but it needs capture sites lensviz does not have today: "mid" would be the MLP's input LN_1(...)
  (the recorded pre-hook of `final_layer_norm` there sees m + mlp(m) instead) and `Trace.write_scale`
  would have to carry the residual term, so the recorded "mid" and head/neuron writes would be wrong;
- projected embeddings (`word_embed_proj_dim` != `hidden_size`): project_in / project_out sit between
  the residual stream and the (un)embedding and there is no final norm, so W_U reads project_out(h)
  and every embedding-space lens would need E = W_U project_out.
Pre-LayerNorm OPT (opt-125m, opt-1.3b and larger) is supported."""
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
