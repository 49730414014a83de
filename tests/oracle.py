"""An independent reference: a plain eager attention function that keeps the raw scores S = Q K^T
(retain_grad) and the probabilities A, so autograd gives dL/dS and dL/dA to compare lensviz with.
It shares no code with lensviz."""
from __future__ import annotations

import torch

NAME = "lensviz_test_oracle"
_state: dict = {}


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    n_rep = query.shape[1] // key.shape[1]
    k = torch.repeat_interleave(key, n_rep, dim=1)
    v = torch.repeat_interleave(value, n_rep, dim=1)
    s = query @ k.transpose(-1, -2)
    s.retain_grad()
    t = query.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool, device=query.device).tril()
    scores = (s * scaling).masked_fill(~causal, float("-inf"))
    a = torch.softmax(scores, dim=-1)
    a.retain_grad()
    _state.setdefault("S", []).append(s)
    _state.setdefault("A", []).append(a)
    _state.setdefault("V", []).append(v)
    _state.setdefault("scaling", []).append(scaling)
    return (a @ v).transpose(1, 2), a


def run_with(model, input_ids, target_id, name: str, attention, state: dict, params_grad=False) -> dict:
    """Forward + backward of L = -log softmax(logits[-1])[target] with `attention` registered under `name`
    (HF's eager masks) and `state` (what the attention records) cleared first. Returns the recorded lists
    of `state` plus the hidden states (retained grads), logits, loss and the input embeddings (a leaf
    with its grad). With params_grad, parameters keep .grad (caller zeroes them)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, eager_mask)
    prev = model.config._attn_implementation
    model.set_attn_implementation(name)
    state.clear()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(params_grad)
            p.grad = None
        emb = model.get_input_embeddings()(input_ids[None]).detach().requires_grad_(True)
        out = model(inputs_embeds=emb, output_hidden_states=True, use_cache=False)
        for h in out.hidden_states:
            if h.requires_grad:
                h.retain_grad()
        loss = -torch.log_softmax(out.logits[0, -1], -1)[target_id]
        loss.backward()
        return {**{k: list(v) for k, v in state.items()}, "hidden": out.hidden_states,
                "logits": out.logits[0].detach(), "loss": float(loss.detach()), "emb": emb}
    finally:
        model.set_attn_implementation(prev)
        for p, f in flags:
            p.requires_grad_(f)


def run(model, input_ids, target_id, params_grad=False):
    """`run_with` the oracle attention: S, A, V (lists per layer, [1, H, T, T] / [1, H, T, d]), scaling,
    hidden states (retained grads), logits, loss, emb."""
    return run_with(model, input_ids, target_id, NAME, _attention, _state, params_grad)
