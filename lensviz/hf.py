"""transformers / torch / accelerate plumbing shared by capture, patches and studies: a block call's
hidden-states argument, where modules compute, offloaded weights made real, frozen eval mode, the
KV-cache length of a call and the keyword arguments of a plain forward.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch


def args_hidden(args, kwargs):
    """The hidden-states input of a module call (first positional argument or `hidden_states=`)."""
    if args:
        return args[0]
    return kwargs.get("hidden_states")


def replace_hidden(args, kwargs, new):
    """(args, kwargs) of a module call with its hidden-states input replaced by `new`."""
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def module_device(module) -> torch.device:
    """Where a module computes: accelerate's execution device if dispatched, else its weight's device."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    w = next(module.parameters(), None)
    return w.device if w is not None and w.device.type != "meta" else torch.device("cpu")


def input_device(model, adapter) -> torch.device:
    """Where token ids must live: the embedding's execution device (accelerate-aware)."""
    return module_device(model.get_submodule(adapter.embed))


def plain_linear(module):
    """(weight [V, D], bias [V] | None) of an nn.Linear whose weight is a real tensor, else (None, None)
    (accelerate-dispatched or custom modules are to be called as modules)."""
    weight = getattr(module, "weight", None)
    if (type(module) is not torch.nn.Linear or getattr(module, "_hf_hook", None) is not None
            or not isinstance(weight, torch.Tensor) or weight.device.type == "meta" or weight.dim() != 2):
        return None, None
    return weight, module.bias


def has_offloaded(model) -> bool:
    """True when accelerate offloaded some of the model's weights (to CPU or disk)."""
    from accelerate.utils import has_offloaded_params

    return any(has_offloaded_params(m) for m in model.modules())


@contextmanager
def materialized(model, path: str):
    """Inside: the parameters under `path` are real tensors, also where accelerate offloaded them
    (to CPU or disk): the nearest enclosing module with an offloading hook loads them."""
    from accelerate.utils import align_module_device, has_offloaded_params

    parts = path.split(".")
    for n in range(len(parts), -1, -1):
        module = model.get_submodule(".".join(parts[:n]))
        if has_offloaded_params(module):
            with align_module_device(module):
                yield
            return
    yield


@contextmanager
def frozen_eval(model):
    """Parameters do not require grad and every module is in eval mode; both restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = [m for m in model.modules() if m.training]
    try:
        for p, _ in flags:
            if p.requires_grad:
                p.requires_grad_(False)
        for m in training:
            m.training = False
        yield
    finally:
        for p, flag in flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        for m in training:
            m.training = True


def cache_length(kwargs) -> int:
    """Tokens already in the KV cache passed to a backbone call (0 without a cache)."""
    for name in ("cache", "past_key_values"):  # transformers renamed past_key_values -> cache in 5.x
        cache = kwargs.get(name)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


def forward_kwargs(model, keep: int) -> dict:
    """Model-call kwargs: no cache, and logits only for the last `keep` positions where the model's forward
    takes `logits_to_keep` (the unembedding of every position is most of a small model's cost)."""
    kwargs = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = keep
    return kwargs
