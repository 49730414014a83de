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


def run(model, input_ids, target_id, params_grad=False):
    """Forward + backward of L = -log softmax(logits[-1])[target] with the oracle attention.
    Returns dict with S, A, V (lists per layer, [1, H, T, T] / [1, H, T, d]), hidden states (retained
    grads), logits, loss. With params_grad, parameters keep .grad (caller zeroes them)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    prev = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    _state.clear()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(params_grad)
            p.grad = None
        emb = model.get_input_embeddings()(input_ids[None]).detach().requires_grad_(True)
        out = model(inputs_embeds=emb, output_hidden_states=True, use_cache=False)
        hs = out.hidden_states
        for h in hs:
            if h.requires_grad:
                h.retain_grad()
        loss = -torch.log_softmax(out.logits[0, -1], -1)[target_id]
        loss.backward()
        return dict(S=list(_state["S"]), A=list(_state["A"]), V=list(_state["V"]),
                    scaling=list(_state["scaling"]), hidden=hs, logits=out.logits[0].detach(),
                    loss=float(loss.detach()), emb=emb)
    finally:
        model.set_attn_implementation(prev)
        for p, f in flags:
            p.requires_grad_(f)
