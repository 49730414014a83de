"""Mixture-of-experts families: Mixtral, Qwen3-MoE and gpt-oss. The attention is Llama's (Qwen3-MoE adds
q/k RMSNorms; gpt-oss adds learned attention sinks, a per-head logit appended to every softmax row and
dropped after it, so A's rows sum to less than 1, and alternating sliding/full layers). The MLP is a
router choosing top-k experts per token; capture records the router's choice and weights per layer
(`Trace.router(layer)`). Expert e's neurons: a_e(x) = act(x W_gate,e) * (x W_up,e) (gpt-oss: its clamped
GLU (up + 1) * gate * sigmoid(alpha * gate) with biases), values = the rows of W_down,e; the MLP output
is sum over the token's k experts of w_e * (a_e W_down,e + b_e) (lensviz.lenses.experts), and
NeuronPatch(expert=e) edits one expert's neurons. The dense neuron views, value search and the
Backward Lens FF matrices raise LensvizError. Float64 models need `experts_implementation="eager"`."""
from dataclasses import replace

import torch

from .llama import ADAPTER as LLAMA


def _moe_d_mlp(config) -> int:
    return int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)


def _gated_activation(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Mixtral / Qwen3-MoE expert e: gate_up_proj [E, 2F, D] ([gate | up] rows), act(gate) * up: [n, F]."""
    gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def _gated_values(experts, e: int):
    """Values [F, D] (down_proj [E, D, F] columns) and no bias."""
    return experts.down_proj[e].T, None


def _oss_activation(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """gpt-oss expert e: gate_up [n, 2F] interleaved (gate = even, up = odd columns), clamped GLU."""
    gate_up = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=experts.limit)
    up = up.clamp(min=-experts.limit, max=experts.limit)
    return (up + 1) * (gate * torch.sigmoid(gate * experts.alpha))


def _oss_values(experts, e: int):
    """Values [F, D] (down_proj [E, F, D] rows) and the expert's output bias [D]."""
    return experts.down_proj[e], experts.down_proj_bias[e]


_MOE = dict(mlp_in=None, mlp_gate=None, mlp_out=None, moe=True, router="mlp.gate", experts="mlp.experts",
            expert_activation=_gated_activation, expert_values=_gated_values, d_mlp=_moe_d_mlp)

MIXTRAL = replace(LLAMA, family="mixtral", model_types=("mixtral",), **_MOE,
                  notes="top-k expert MLP (router recorded); sliding window")
QWEN3_MOE = replace(LLAMA, family="qwen3_moe", model_types=("qwen3_moe",), **_MOE,
                    notes="top-k expert MLP (router recorded); q/k RMSNorm")
GPT_OSS = replace(LLAMA, family="gpt_oss", model_types=("gpt_oss",),
                  **{**_MOE, "router": "mlp.router", "expert_activation": _oss_activation,
                     "expert_values": _oss_values},
                  notes="attention sinks; sliding/full layers; top-k expert MLP with a clamped GLU (router recorded)")
