"""StableLM (StableLM 2, StableLM-3B-4E1T): the Llama layout with LayerNorm (bias), partial rotary,
optional q/k/v biases (`use_qkv_bias`) and per-head q/k LayerNorms (`qk_layernorm`). The parallel
variant (`use_parallel_residual`, StableLM-2-12B) has no second norm module and is not supported."""
from dataclasses import replace

from ..errors import UnsupportedModelError
from .llama import ADAPTER as LLAMA


def _check(config) -> None:
    if getattr(config, "use_parallel_residual", False):
        raise UnsupportedModelError("stablelm with use_parallel_residual=True is not supported: its MLP reads the "
                                    "first LayerNorm and the block has no post_attention_layernorm")


ADAPTER = replace(LLAMA, family="stablelm", model_types=("stablelm",), norm="layernorm", check=_check,
                  notes="LayerNorm; partial rotary; qk_layernorm per head")
