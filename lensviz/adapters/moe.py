"""Mixture-of-experts families: Mixtral, Qwen3-MoE and gpt-oss. The attention is Llama's (Qwen3-MoE adds
q/k RMSNorms; gpt-oss adds learned attention sinks, a per-head logit appended to every softmax row and
dropped after it, so A's rows sum to less than 1, and alternating sliding/full layers). The MLP is a
router choosing top-k experts per token; capture records the router's output per layer
(`Trace.router(layer)`). Per-expert neurons are not single matrices, so neuron views, value search,
the Backward Lens and NeuronPatch raise LensvizError on these families. Float64 models need
`experts_implementation="eager"`."""
from dataclasses import replace

from .llama import ADAPTER as LLAMA

_MOE = dict(mlp_in=None, mlp_gate=None, mlp_out=None, moe=True, router="mlp.gate")


def _moe_d_mlp(config) -> int:
    return int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)


MIXTRAL = replace(LLAMA, family="mixtral", model_types=("mixtral",), d_mlp=_moe_d_mlp, **_MOE,
                  notes="top-k expert MLP (router recorded); sliding window")
QWEN3_MOE = replace(LLAMA, family="qwen3_moe", model_types=("qwen3_moe",), d_mlp=_moe_d_mlp, **_MOE,
                    notes="top-k expert MLP (router recorded); q/k RMSNorm")
GPT_OSS = replace(LLAMA, family="gpt_oss", model_types=("gpt_oss",), d_mlp=_moe_d_mlp,
                  **{**_MOE, "router": "mlp.router"},
                  notes="attention sinks; sliding/full layers; top-k expert MLP (router recorded)")
