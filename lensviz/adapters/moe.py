"""Mixture-of-experts families: Mixtral, Qwen3-MoE and gpt-oss. The attention is Llama's (Qwen3-MoE adds
q/k RMSNorms; gpt-oss adds learned attention sinks, a per-head logit appended to every softmax row and
dropped after it, so A's rows sum to less than 1, and alternating sliding/full layers). The MLP is a
router choosing top-k experts per token; capture records the router's choice and weights per layer
(`Trace.router(layer)`). Expert e's neurons: a_e(x) = act(x W_gate,e) * (x W_up,e) (gpt-oss: its clamped
GLU (up + 1) * gate * sigmoid(alpha * gate) with biases), values = the rows of W_down,e; the MLP output
is sum over the token's k experts of w_e * (a_e W_down,e + b_e) (lensviz.lenses.experts), and
NeuronPatch(expert=e) edits one expert's neurons and ShiftEdit(expert=e) previews an edit of one expert's FF2.
Neuron views, sub-updates, value search and the Backward Lens take expert=e (a sub-update is router weight x
activation x value vector); VISIT's MLP nodes (the Explorer's flow graph) are the (expert, neuron) pairs of
the experts routed at the position. Expert parameters are read through `Lens.expert_weight` (which loads
offloaded weights), the maths below applied to them. Adapter data:
`expert_params` (the [E, ...] parameters of FF1 / FF2 and their biases), `expert_layout` (one slice's
layout: [out, in] "linear" for Mixtral / Qwen3-MoE, [in, out] "conv1d" for gpt-oss), `expert_gate_up`
(where gate and up sit in the fused FF1) and `expert_act` (FF1 outputs -> neuron activations).
Float64 models need `experts_implementation="eager"`."""
from dataclasses import replace

import torch

from .llama import ADAPTER as LLAMA


def _moe_d_mlp(config) -> int:
    return int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)


def _gated_act(experts, h: torch.Tensor) -> torch.Tensor:
    """Mixtral / Qwen3-MoE: h = x gate_up_proj[e]^T ([gate | up] rows of the [2F, D] slice), a = act(gate) * up."""
    gate, up = h.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def _oss_act(experts, h: torch.Tensor) -> torch.Tensor:
    """gpt-oss: h = x gate_up_proj[e] + bias ([D, 2F] slice, gate = even, up = odd columns), clamped GLU."""
    gate, up = h[..., ::2], h[..., 1::2]
    gate = gate.clamp(min=None, max=experts.limit)
    up = up.clamp(min=-experts.limit, max=experts.limit)
    return (up + 1) * (gate * torch.sigmoid(gate * experts.alpha))


_MOE = dict(mlp_in=None, mlp_gate=None, mlp_out=None, moe=True, router="mlp.gate", experts="mlp.experts",
            expert_params=("gate_up_proj", None, "down_proj", None), expert_layout="linear", expert_act=_gated_act,
            d_mlp=_moe_d_mlp)

MIXTRAL = replace(LLAMA, family="mixtral", model_types=("mixtral",), **_MOE,
                  notes="top-k expert MLP (router recorded); sliding window")
QWEN3_MOE = replace(LLAMA, family="qwen3_moe", model_types=("qwen3_moe",), **_MOE,
                    notes="top-k expert MLP (router recorded); q/k RMSNorm")
GPT_OSS = replace(LLAMA, family="gpt_oss", model_types=("gpt_oss",),
                  **{**_MOE, "router": "mlp.router", "expert_act": _oss_act, "expert_layout": "conv1d",
                     "expert_gate_up": "interleave",
                     "expert_params": ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")},
                  notes="attention sinks; sliding/full layers; top-k expert MLP with a clamped GLU (router recorded)")
