"""OPT: learned positions (added by the decoder, offset 2), blocks whose MLP is the block's own
`fc1` -> activation -> `fc2` (no MLP module), which HF runs on tokens flattened to [T, D], and a query
pre-scaled by head_dim^-1/2 (the attention is called with scaling 1, so RA is dL/d of the scores
themselves; `Lens.attention_weights` folds the factor into W_Q).

Two layouts, picked from the config (`variant`):

- pre-LayerNorm (opt-125m, opt-1.3b and larger: `do_layer_norm_before=True`, `word_embed_proj_dim ==
  hidden_size`): r_mid = r + attn(LN_1(r)), r' = r_mid + mlp(LN_2(r_mid)), a final LayerNorm;
- post-LayerNorm with projected embeddings (opt-350m: `do_layer_norm_before=False`, `word_embed_proj_dim`
  D_e != hidden_size D). The decoder computes h_0 = project_in(W_E[t]) + pos, then per block
      m  = LN_1(r + attn(r))          (resid "mid": the MLP's input, also the residual it is added to)
      r' = LN_2(m + mlp(m))           (resid "post": the next block's input)
  and logits = W_U project_out(r_L) with no final norm. With each LayerNorm's scale frozen at this run,
      LN(r + y) = (g / s) P r + (g / s) P y + b,   P u = u - mean(u),  s = sqrt(var(r + y) + eps),
  an affine map of the position: the residual is carried as (g / s) P r + b (`Trace.carried`) and each
  part of y (a head's O_h W_O,h, a neuron's a_n value_n, a bias) writes (g / s) P part (`Trace.write`,
  `Adapter.frozen_norm_gain` with the norm's input r + y). Embedding-space lenses read W_U in residual
  space as W_U W_out (`Adapter.unembedding_matrix`) and W_E as W_E W_in^T (`Adapter.embedding_matrix`).

Other combinations (post-LN without the projections: no module would read the last block's output;
pre-LN with them: a final norm followed by project_out) are refused with UnsupportedModelError."""
from dataclasses import replace

from ..errors import UnsupportedModelError
from .base import Adapter


def _variant(config):
    post_ln = not getattr(config, "do_layer_norm_before", True)
    projected = getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size
    if post_ln and projected:
        return POST_LN
    if post_ln or projected:
        what = ("do_layer_norm_before=False with word_embed_proj_dim == hidden_size" if post_ln else
                f"word_embed_proj_dim={config.word_embed_proj_dim} != hidden_size={config.hidden_size} with "
                "do_layer_norm_before=True")
        raise UnsupportedModelError(
            f"OPT with {what} is not supported: lensviz handles pre-LayerNorm OPT (opt-125m, opt-1.3b and larger) "
            "and post-LayerNorm OPT with projected embeddings (opt-350m)")
    return None


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
    variant=_variant,
    notes="learned positions; block-level MLP (flattened tokens); pre-LN (opt-125m, opt-1.3b+)",
)

# opt-350m: post-LayerNorm blocks (the sublayers read the residual itself; the norms after the residual
# adds renormalise it) and project_in / project_out around the residual stream, no final norm
POST_LN = replace(ADAPTER, family="opt_post_ln", model_types=(), final_norm=None, ln1=None, ln2=None,
                  post_attn_norm="self_attn_layer_norm", post_mlp_norm="final_layer_norm", post_ln=True,
                  embed_proj="model.decoder.project_in", unembed_proj="model.decoder.project_out",
                  notes="post-LN blocks (frozen-scale LayerNorm decomposition, residual carried); project_in / "
                        "project_out, no final norm (opt-350m)")
