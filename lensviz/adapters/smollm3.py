"""SmolLM3: the Llama layout where some layers have no RoPE (`no_rope_layers`); q, k are recorded as the
attention saw them, so RoPE-free layers need nothing."""
from dataclasses import replace

from .llama import ADAPTER as LLAMA

ADAPTER = replace(LLAMA, family="smollm3", model_types=("smollm3",), notes="RoPE skipped on no_rope_layers")
