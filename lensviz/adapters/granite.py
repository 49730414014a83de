"""Granite: the Llama layout with multipliers: `embedding_multiplier` (applied by the model to the input
embeddings), `attention_multiplier` (the attention scaling, recorded per layer), `residual_multiplier`
m (residual += m * sublayer output: a head writes m * O_h W_O,h) and `logits_scaling` (logits are
divided by it, in the vocabulary projection too)."""
from dataclasses import replace

from .llama import ADAPTER as LLAMA

ADAPTER = replace(LLAMA, family="granite", model_types=("granite",), residual_multiplier="residual_multiplier",
                  logit_divisor="logits_scaling", notes="embedding / attention / residual / logit multipliers")
