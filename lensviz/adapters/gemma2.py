"""Gemma 2 and Gemma 3 (text): Gemma's (1 + w) RMSNorm and sqrt(d) embedding, plus
- attention-logit soft-capping (Gemma 2 `attn_logit_softcapping`): scores = c * tanh(s * q.k / c) before
  the mask; capture runs it on the explicit path and RA stays dL/d(q.k) through the tanh;
- final-logit soft-capping (`final_logit_softcapping`), part of the vocabulary projection;
- sliding-window and global layers (`layer_types`), carried by HF's per-layer masks;
- post-attention and post-feed-forward RMSNorms (the MLP input norm is `pre_feedforward_layernorm`),
  decomposed per head / per neuron with the norm's scale frozen (`Adapter.frozen_norm_gain`);
- Gemma 3: q/k RMSNorms, query_pre_attn_scalar scaling, a local RoPE base on sliding layers.
"""
from dataclasses import replace

from .llama import ADAPTER as LLAMA

ADAPTER = replace(LLAMA, family="gemma2", model_types=("gemma2", "gemma3_text"), norm_gain_offset=1.0,
                  ln2="pre_feedforward_layernorm", post_attn_norm="post_attention_layernorm",
                  post_mlp_norm="post_feedforward_layernorm", logit_softcap="final_logit_softcapping",
                  notes="attention and final-logit soft-capping; sliding/global layers; post-norms; (1 + w) RMSNorm")

# Gemma 3 checkpoints load (AutoModelForCausalLM) as Gemma3ForConditionalGeneration: the text model lives
# under model.language_model; its forward does not soft-cap the final logits (Gemma3ForCausalLM does)
GEMMA3 = replace(ADAPTER, family="gemma3", model_types=("gemma3",), embed="model.language_model.embed_tokens",
                 blocks="model.language_model.layers", final_norm="model.language_model.norm", logit_softcap=None,
                 notes="the text model of a Gemma 3 (vision + text) checkpoint; text prompts only")
