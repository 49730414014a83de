"""Lens: a user's model + tokenizer + the adapter for its family. Entry point for tracing.

A Lens wraps the model; it never copies or rewrites it. Everything a run installs is removed when
the run ends (see capture.py).
"""
from __future__ import annotations

import operator
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import capture
from .adapters import adapter_for, text_config
from .checks import check_index, check_token_ids
from .errors import LensvizError, UnsupportedModelError
from .hf import frozen_eval, input_device, materialized, module_device
from .patches.base import Patch
from .trace import Trace
from .vocab import TopK, project

GRADIENT_MODES = ("standard", "layer_causal")
TARGET_MODES = ("all", "first")
# generate() arguments Lens.generate sets itself (it returns one sequence, with its per-step logits)
_GENERATE_OWN = ("input_ids", "inputs", "inputs_embeds", "attention_mask", "max_length", "return_dict_in_generate",
                 "output_logits", "output_scores")


@dataclass(frozen=True)
class Generation:
    """What `Lens.generate` returns. prompt_ids [P]; ids [n] the new tokens (n <= max_new_tokens: it stops
    at an end-of-sequence token); tokens: each new token decoded; text: the new tokens decoded together;
    logits [n, V]: the logits each new token was chosen from (the model's float dtype, CPU)."""

    prompt_ids: torch.Tensor
    ids: torch.Tensor
    tokens: list
    text: str
    logits: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)


def display_name(source) -> str:
    """How a model is named on screen: a hub id as it is, a local path by its last part (never the
    absolute path of the user's machine); "" for no source."""
    text = str(source or "").strip().rstrip("/\\")
    if not text:
        return ""
    if os.path.isabs(text) or text.startswith((".", "~")) or "\\" in text or os.path.isdir(text):
        full = os.path.abspath(os.path.expanduser(text)) if text.startswith((".", "~")) else text
        return full.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or text
    return text


class Lens:
    """A causal LM ready to be traced.

    Attributes: `model`, `tokenizer`, `adapter`, `arch` (family name), `n_layers`, `n_heads`,
    `n_kv_heads`, `d_model`, `d_head`, `d_mlp`, `vocab_size`, `max_tokens` (longest prompt accepted),
    `name` (shown in the Explorer, exports, plots and repr: the `name` argument, else the hub id or the
    folder name the model was loaded from, never an absolute path).
    """

    def __init__(self, model, tokenizer, *, max_tokens: int | None = None, name: str | None = None):
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise LensvizError(f"Lens needs a Hugging Face model (torch.nn.Module with a .config), got {type(model).__name__}")
        if tokenizer is None or isinstance(tokenizer, type) or not (callable(tokenizer) and hasattr(tokenizer, "decode")):
            what = f"the class {tokenizer.__name__}" if isinstance(tokenizer, type) else type(tokenizer).__name__
            raise LensvizError(f"Lens needs the model's tokenizer (a transformers tokenizer instance), got {what}")
        if getattr(tokenizer, "vocab_size", None) == 0:
            raise LensvizError(
                "the tokenizer has an empty vocabulary (was it loaded from a folder without tokenizer files?): "
                "pass the tokenizer that belongs to the model")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
            raise LensvizError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise LensvizError(f"name must be a non-empty str or None, got {name!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or display_name(getattr(model.config, "_name_or_path", "")) or type(model).__name__
        self.adapter = adapter_for(model.config)
        ad = self.adapter
        for path in (ad.embed, ad.blocks, ad.final_norm, ad.unembed, ad.embed_proj, ad.unembed_proj):
            if path is None:
                continue
            try:
                model.get_submodule(path)
            except AttributeError:
                raise UnsupportedModelError(
                    f"{type(model).__name__} has no '{path}'. lensviz needs the causal-LM class with its LM head "
                    f"(e.g. AutoModelForCausalLM), not the bare {self.adapter.family} backbone."
                ) from None
        self.dims = self.adapter.dims(model.config)
        self._token_strings = None
        limit = getattr(text_config(model.config), "max_position_embeddings", None)
        self.max_tokens = int(max_tokens or limit or 4096)

    # sizes -----------------------------------------------------------------------------------------
    arch = property(lambda self: self.adapter.family)
    n_layers = property(lambda self: self.dims.n_layers)
    n_heads = property(lambda self: self.dims.n_heads)
    n_kv_heads = property(lambda self: self.dims.n_kv_heads)
    d_model = property(lambda self: self.dims.d_model)
    d_head = property(lambda self: self.dims.d_head)
    d_mlp = property(lambda self: self.dims.d_mlp)
    vocab_size = property(lambda self: self.dims.vocab_size)

    def __repr__(self) -> str:
        d = self.dims
        return (f"Lens({self.name!r}, {type(self.model).__name__}, arch={self.arch!r}, layers={d.n_layers}, heads={d.n_heads}"
                f"/{d.n_kv_heads} kv, d_model={d.d_model}, vocab={d.vocab_size})")

    # unembedding -----------------------------------------------------------------------------------
    @property
    def final_norm_module(self):
        """The final norm, or None where the family has none (post-LN OPT)."""
        path = self.adapter.final_norm
        return None if path is None else self.model.get_submodule(path)

    @property
    def final_input_module(self):
        """The module whose hidden-states input is the last block's output (`Adapter.final_input`)."""
        return self.model.get_submodule(self.adapter.final_input)

    @property
    def unembed_module(self):
        return self.model.get_submodule(self.adapter.unembed)

    @property
    def unembed_device(self) -> torch.device:
        return module_device(self.unembed_module)

    @property
    def model_dtype(self) -> torch.dtype:
        return self.unembed_module.weight.dtype if self.unembed_module.weight.dtype.is_floating_point else torch.float32

    @property
    def token_strings(self) -> list[str]:
        """Every vocabulary id decoded to its text (cached; token text is untrusted: escape it to display)."""
        if self._token_strings is None:
            ids = [[i] for i in range(self.vocab_size)]
            self._token_strings = self.tokenizer.batch_decode(ids)
        return self._token_strings

    def project(self, vectors, k: int = 10, *, target=None, normalize: bool = False, bottom: bool = False) -> TopK:
        """Vocabulary projection proj(v) = softmax(W_U . N_f(v)) of vectors [..., D] (final norm with its
        affine parameters, then the unembedding). Returns `TopK` with leading dims [...]: ids/probs
        [..., k], tokens, and target_rank [...] when `target` (str or id) is given. normalize=True projects
        v / |v| (use it for gradients on LayerNorm models); bottom=True gives the k least probable tokens."""
        return project(self, vectors, k, target=target, normalize=normalize, bottom=bottom)

    # weights -----------------------------------------------------------------------------------------
    def weight(self, layer: int, part: str, name: str = "weight") -> torch.Tensor:
        """A block part's parameter (e.g. part="o_proj"), detached on CPU; loads offloaded weights."""
        layer = check_index(layer, self.n_layers, "layer")
        parts = [f for f in ("ln1", "attn", "ln2", "mlp", "o_proj", "mlp_in", "mlp_out", "mlp_gate", "q_proj",
                             "k_proj", "v_proj", "qkv") if getattr(self.adapter, f) is not None]
        if part in ("mlp_in", "mlp_gate", "mlp_out"):
            self.adapter.require_dense_mlp(f"the MLP matrix {part!r}")
        if part not in parts:
            raise LensvizError(f"part must be one of {tuple(parts)} for {self.arch}, got {part!r}")
        path = f"{self.adapter.blocks}.{layer}.{getattr(self.adapter, part)}"
        module = self.model.get_submodule(path)
        if not isinstance(name, str) or not isinstance(getattr(module, name, None), torch.Tensor):
            names = tuple(n for n, _ in module.named_parameters(recurse=False))
            raise LensvizError(f"{part} of layer {layer} has no parameter {name!r}; it has {names}")
        with materialized(self.model, path):
            return getattr(self.model.get_submodule(path), name).detach().to("cpu", copy=True)

    def expert_weight(self, layer: int, expert: int, part: str, name: str = "weight", *,
                      device="cpu", copy: bool = True) -> torch.Tensor | None:
        """One expert's slice of a mixture-of-experts parameter, detached, copied to `device` (default
        CPU); loads offloaded weights (every per-expert lens and patch reads expert weights through here).
        part "mlp_in": expert `expert`'s fused gate/up FF1, "mlp_out": its FF2; name "weight" (the slice
        in the adapter's `expert_layout`: Mixtral / Qwen3-MoE [out, in], gpt-oss [in, out]) or "bias"
        (None where the family's experts have no biases). copy=False: no copy where the slice already
        lives on `device` (a read-only view of the parameter, for computing with it). LensvizError on
        dense families."""
        ad = self.adapter
        if not ad.moe:
            raise LensvizError(f"{ad.family} has a dense MLP: there are no experts (use Lens.weight)")
        layer = check_index(layer, self.n_layers, "layer")
        if isinstance(expert, bool) or not isinstance(expert, int):
            raise LensvizError(f"expert must be an int expert index, got {expert!r}")
        expert = check_index(expert, ad.n_experts(self.model.config), "expert")
        if name not in ("weight", "bias"):
            raise LensvizError(f"name must be 'weight' or 'bias', got {name!r}")
        path = f"{ad.blocks}.{layer}.{ad.experts}"
        with materialized(self.model, path):
            w, b = ad.expert_matrix(self.model.get_submodule(path), expert, part)
            t = w if name == "weight" else b
            return None if t is None else t.detach().to(device, copy=copy)

    def param(self, layer: int, part: str, name: str = "weight") -> torch.Tensor | None:
        """Like `weight` but None where the part or parameter does not exist (e.g. a missing bias)."""
        if getattr(self.adapter, part, None) is None:
            return None
        path = f"{self.adapter.blocks}.{layer}.{getattr(self.adapter, part)}"
        if getattr(self.model.get_submodule(path), name, None) is None:
            return None
        return self.weight(layer, part, name)

    def norm_gain(self, layer: int | None, part: str = "ln1") -> torch.Tensor | None:
        """The elementwise gain gamma [D] of a norm (block part "ln1" / "ln2", or the final norm with
        layer=None), detached on CPU: its weight, plus 1 in Gemma's (1 + w) RMSNorm; None where the norm
        has no affine weight or the family has no such norm."""
        if layer is None:
            w = getattr(self.final_norm_module, "weight", None)  # None without a final norm
            w = None if w is None else w.detach().to("cpu")
        else:
            w = self.param(layer, part, "weight")
        return None if w is None else w + self.adapter.norm_gain_offset

    def attention_weights(self, layer: int) -> dict:
        """Per-head attention parameters of a layer, [in, out] oriented, on CPU:
        q [H, D, d], k/v [H_kv, D, d], bq [H, d], bk/bv [H_kv, d] (or None), o [H, d, D], bo [D] or None.
        Head h's pre-RoPE query, as the attention function receives it (OPT's pre-scaling folded in), is
        x @ q[h] + bq[h] (before the q norm in families with one, see `Adapter.qk_normed`); its raw output
        is O_h @ o[h] (`Trace.write_scale` maps it to the residual)."""
        layer = check_index(layer, self.n_layers, "layer")
        out = self.adapter.qkv_by_head(lambda part, name: self.param(layer, part, name), self.dims)
        if self.adapter.query_scale is not None:  # the query the attention sees is pre-scaled (OPT)
            c = float(self.adapter.query_scale(self.model.config))
            out["q"] = out["q"] * c
            out["bq"] = None if out["bq"] is None else out["bq"] * c
        out["o"] = self.adapter.o_by_head(self.weight(layer, "o_proj"), self.n_heads, self.d_head)
        out["bo"] = self.param(layer, "o_proj", "bias")
        return out

    # tokens ------------------------------------------------------------------------------------------
    def encode(self, prompt) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Token ids [T] of a prompt (str, or list of str segments) and the segments' [start, end) spans.
        Segments are tokenised one by one, so their boundaries fall between tokens."""
        if isinstance(prompt, str):
            parts = [prompt]
        elif isinstance(prompt, (list, tuple)) and prompt:
            for i, p in enumerate(prompt):
                if not isinstance(p, str) and not _is_id_list(p):
                    raise LensvizError(f"prompt segment {i} must be a str, got {type(p).__name__} ({p!r:.40}); "
                                       "a segment may also be a list of token ids")
            parts = list(prompt)
        else:
            raise LensvizError(
                f"prompt must be a non-empty str or a non-empty list of str segments, got {type(prompt).__name__}"
                + (" (empty)" if isinstance(prompt, (list, tuple)) else ""))
        if not any(parts):
            raise LensvizError("prompt is empty: give some text to run the model on")
        ids, spans = [], []
        for i, part in enumerate(parts):
            if not part:
                raise LensvizError(f"prompt segment {i} is empty")
            # a segment given as token ids (e.g. generated tokens) is taken as it is, not re-tokenised
            enc = list(part) if not isinstance(part, str) else self.tokenizer(part, add_special_tokens=(i == 0))["input_ids"]
            spans.append((len(ids), len(ids) + len(enc)))
            ids.extend(enc)
        if not ids:
            raise LensvizError("prompt produced no tokens")
        if len(ids) > self.max_tokens:
            raise LensvizError(
                f"prompt is {len(ids)} tokens long; this model accepts at most {self.max_tokens}. Shorten it.")
        check_token_ids(ids, self.vocab_size, "the prompt")
        return torch.tensor(ids, dtype=torch.long), spans

    def token_id(self, target) -> int:
        """The id of a target: str -> its first token (leading space matters), int -> checked id."""
        return self.token_ids(target)[0]

    def token_ids(self, target) -> list[int]:
        """Every token id of a target: str -> its tokens (leading space matters), int -> [checked id],
        a list / tuple of ints -> those ids, checked."""
        if isinstance(target, bool):
            raise LensvizError(f"target must be a str, an int token id or None, got {target!r}")
        if isinstance(target, (list, tuple)) and target and all(not isinstance(t, (str, bool)) for t in target):
            return [self.token_ids(t)[0] for t in target]
        if not isinstance(target, (int, str)) and hasattr(target, "__index__"):  # numpy ints, 0-d int tensors
            try:
                target = operator.index(target)
            except TypeError:
                raise LensvizError(f"target must be a str, an int token id or None, got {target!r}") from None
        if isinstance(target, int):
            if not 0 <= target < self.vocab_size:
                raise LensvizError(f"target id {target} is outside the vocabulary [0, {self.vocab_size - 1}]")
            return [target]
        if isinstance(target, str):
            if not target:
                raise LensvizError("target is an empty string: give the token to explain, e.g. ' Paris'")
            ids = self.tokenizer(target, add_special_tokens=False)["input_ids"]
            if not ids:
                raise LensvizError(f"target {target!r} encodes to no token")
            check_token_ids(ids, self.vocab_size, f"the target {target!r}")
            return [int(i) for i in ids]
        raise LensvizError(f"target must be a str, an int token id or None, got {type(target).__name__}")

    def run_spec(self, prompt, target=None, *, distractor=None, target_mode: str = "all"):
        """What a run of `prompt` explains: (run ids [T], prompt segments, target ids or None, distractor id
        or None). A multi-token target (target_mode="all") appends its tokens but the last to the prompt
        (teacher forcing); target_mode="first" keeps its first token only. With a distractor the metric
        compares single tokens at the last prompt position: a multi-token target or distractor needs
        target_mode="first"."""
        if target_mode not in TARGET_MODES:
            raise LensvizError(f"target_mode must be one of {TARGET_MODES}, got {target_mode!r}")
        ids, segments = self.encode(prompt)
        targets = None if target is None else self.token_ids(target)
        d = None
        if distractor is not None:
            if target is None:
                raise LensvizError("a distractor needs a target: give target=' Mary', distractor=' John'")
            d_ids = self.token_ids(distractor)
            if target_mode == "all" and (len(d_ids) > 1 or len(targets) > 1):
                long = target if len(targets) > 1 else distractor
                raise LensvizError(f"{long!r} is {max(len(targets), len(d_ids))} tokens; the logit difference "
                                   "compares single tokens at the last position: pass target_mode='first' (first "
                                   "tokens), or choose one-token target and distractor")
            d = d_ids[0]
            if d == targets[0]:
                raise LensvizError(f"the distractor {distractor!r} and the target {target!r} are the same token: "
                                   "their logit difference is 0")
        if targets is not None and target_mode == "first":
            targets = targets[:1]
        if targets is not None and len(targets) > 1:
            if len(ids) + len(targets) - 1 > self.max_tokens:
                raise LensvizError(f"prompt ({len(ids)} tokens) + target ({len(targets)} tokens) is longer than the "
                                   f"{self.max_tokens} tokens this model accepts")
            ids = torch.cat([ids, torch.tensor(targets[:-1], dtype=torch.long)])
            if segments:  # the appended target tokens continue the last segment
                segments = [*segments[:-1], (segments[-1][0], len(ids))]
        return ids, segments, targets, d

    def decode(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)])

    # tracing -----------------------------------------------------------------------------------------
    @contextmanager
    def patched(self, *patches, base: Trace | None = None):
        """Inside the block every call of `self.model` (forward, generate, ...) runs with `patches`;
        on leaving, also by an exception, no hook remains and the attention implementation is restored.
        Patches that need an unpatched run (self-patching AttentionPatch, NeuronPatch mode "on",
        ShiftEdit) need `base`, a trace of the prompt they refer to. SegmentMask needs `base` too: it masks
        the prefill forward over base's prompt (calls must start with base's ids) and leaves cached
        one-token decoding steps causal, so the new tokens read the prompt as the mask encoded it."""
        for p in patches:
            if not isinstance(p, Patch):
                raise LensvizError(f"patched() takes lensviz patches, got {type(p).__name__}")
            if p.needs_base and base is None:
                raise LensvizError(f"{type(p).__name__} needs base=<a trace of the prompt it refers to>")
            p.validate(self, len(base) if base is not None else None)
        with capture.patched(self, patches, base=base):
            yield self

    def generate(self, prompt, max_new_tokens: int = 20, *, patches=(), **generate_kwargs) -> Generation:
        """Continue `prompt` (str or list of str segments, as in `trace`) by up to `max_new_tokens` tokens with
        `self.model.generate` (greedy unless generate_kwargs say otherwise, KV cache on) inside
        `self.patched(*patches)`. Patches that need a base trace get `self.trace(prompt, backward=False)`;
        with `SegmentMask` the prompt is encoded with the segment mask in one prefill forward and the new tokens
        are decoded causally over that cache. generate_kwargs go to `model.generate`
        (not the inputs, lengths or output flags, which this sets; one sequence: no num_beams /
        num_return_sequences > 1). Returns a `Generation` (new ids, their text, per-step logits [n, V])."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise LensvizError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        _check_patches(patches, "lv.SegmentMask")
        for p in patches:
            if not p.applies_while_decoding:
                raise LensvizError(f"{type(p).__name__} acts on one prompt's [T]-sized positions or [T, T] maps and "
                                   "cannot apply to generate's decoding steps: use lens.trace(prompt, patches=...)")
        own = [k for k in _GENERATE_OWN if k in generate_kwargs]
        if own:
            raise LensvizError(f"Lens.generate sets {own} itself: give the prompt and max_new_tokens, or call "
                               "self.model.generate inside `with lens.patched(...)` for full control")
        for name in ("num_beams", "num_return_sequences"):
            if generate_kwargs.get(name, 1) != 1:
                raise LensvizError(f"Lens.generate returns one sequence ({name} must be 1): for beam search call "
                                   "lens.model.generate inside `with lens.patched(...)`")
        ids, _ = self.encode(prompt)
        if len(ids) + max_new_tokens > self.max_tokens:
            raise LensvizError(f"the prompt is {len(ids)} tokens and max_new_tokens {max_new_tokens}: together more "
                               f"than the {self.max_tokens} tokens this model accepts")
        for p in patches:
            p.validate(self, len(ids))
        base = None
        if any(p.needs_base or p.needs_prompt for p in patches):
            base = self.trace(prompt, backward=False)
        kwargs = {"do_sample": False, **generate_kwargs}
        if "pad_token_id" not in kwargs and getattr(self.model.generation_config, "pad_token_id", None) is None:
            pad = self.tokenizer.pad_token_id
            pad = self.tokenizer.eos_token_id if pad is None else pad
            if pad is not None:
                kwargs["pad_token_id"] = pad
        steps = []

        def keep(mod, args, out):
            if out.shape[0] != 1:
                raise LensvizError("Lens.generate returns one sequence; the generation config asks for a batch of "
                                   f"{out.shape[0]} (num_beams / num_return_sequences)")
            last = out[0, -1].detach()  # the model's logits: the family's logit transform applied
            steps.append(self.adapter.finish_logits(self.model.config, last).to("cpu", copy=True))

        input_ids = ids[None].to(input_device(self.model, self.adapter))
        handle = self.unembed_module.register_forward_hook(keep)
        try:
            with frozen_eval(self.model), self.patched(*patches, base=base), torch.no_grad():
                out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                          max_new_tokens=max_new_tokens, **kwargs)
        finally:
            handle.remove()
        seq = out.sequences if hasattr(out, "sequences") else out
        new = seq[0, len(ids):].detach().to("cpu")
        if len(steps) < len(new):  # pragma: no cover - one unembedding call per generated token
            raise LensvizError(f"generate made {len(new)} tokens from {len(steps)} forward passes")
        logits = torch.stack(steps[:len(new)]) if len(new) else torch.zeros(0, self.vocab_size)
        return Generation(prompt_ids=ids, ids=new, tokens=[self.decode(i) for i in new.tolist()],
                          text=self.tokenizer.decode(new.tolist()), logits=logits)

    def trace(self, prompt, target=None, *, patches=(), backward: bool = True, gradient: str = "standard",
              base: Trace | None = None, distractor=None, target_mode: str = "all") -> Trace:
        """Run one forward (and backward) pass on `prompt` and record it.

        prompt: str or list of segments (str, or a list of token ids taken as they are). target: None (the
        model's own top-1 at the last position), str or int id. A target of several tokens (" Eiffel Tower") is teacher-forced: the run reads
        prompt + its tokens but the last, and the loss is the sum of its tokens' NLLs,
        L = -sum_k log softmax(logits[P-1+k])[t_k] (`Trace.target_ids`, `Trace.n_prompt`);
        target_mode="first" explains its first token only. distractor: a token (str / id); the metric
        (`Trace.metric`) is then logit(target) - logit(distractor) at the last position and the backward
        pass explains -metric (`Trace.loss` stays the NLL). Without a distractor the metric is -L.
        patches: interventions for this run only (lensviz.patches); they compose in the given order.
        gradient: "standard", or "layer_causal" (each layer's gradient from its own logit-lens loss, with
        its input detached; `Trace.layer_losses` holds those losses).
        base: an unpatched trace of the same prompt and target, reused by patches that need one
        (self-patching, neuron "on", shift edits) and, with backward=False, to skip recomputing the
        blocks before the first patched layer.
        Returns a `Trace`; its tensors are on CPU.
        """
        if not isinstance(backward, bool):
            raise LensvizError(f"backward must be True or False, got {backward!r}")
        if gradient not in GRADIENT_MODES:
            raise LensvizError(f"gradient must be one of {GRADIENT_MODES}, got {gradient!r}")
        _check_patches(patches, "lv.HeadAblation")
        if backward and torch.is_inference_mode_enabled():
            raise LensvizError("lens.trace(backward=True) cannot run inside torch.inference_mode(): gradients need "
                               "autograd. Leave the inference_mode block, or pass backward=False")
        ids, segments, fixed, distractor_id = self.run_spec(prompt, target, distractor=distractor,
                                                            target_mode=target_mode)
        n_prompt = len(ids) - (len(fixed) - 1 if fixed else 0)
        for p in patches:
            p.validate(self, len(ids))
        if base is not None:
            if not isinstance(base, Trace) or base.lens is not self:
                raise LensvizError("base must be a Trace made by this Lens")
            if not torch.equal(base.input_ids, ids) or (fixed is not None and list(base.target_ids) != fixed):
                raise LensvizError("base must be a trace of the same prompt and target")
            if base.patches:
                raise LensvizError("base must be an unpatched trace")
        elif any(p.needs_base for p in patches):
            base = self.trace(prompt, target, distractor=distractor, target_mode=target_mode)
        if fixed is None and base is not None:
            fixed = list(base.target_ids)  # a patched run explains the same token as its base
        reuse = min((p.first_layer(self) for p in patches), default=0) if patches else 0
        recording = capture.run(self, ids, target=fixed, backward=backward, gradient=gradient, patches=tuple(patches),
                                segments=segments if not isinstance(prompt, str) else None, base=base,
                                reuse_upto=reuse, distractor=distractor_id)
        return Trace(
            tokens=[self.decode(i) for i in ids.tolist()],
            input_ids=ids,
            target=self.tokenizer.decode(list(recording.target_ids)),
            segments=segments,
            has_backward=backward,
            recording=recording,
            lens=self,
            gradient=gradient,
            patches=tuple(patches),
            prompt=prompt if isinstance(prompt, str) else list(prompt),
            n_prompt=n_prompt,
        )


    def patching_sweep(self, clean, corrupt, target=None, distractor=None, site: str = "post",
                       method: str = "exact", **kwargs):
        """Activation patching clean -> corrupt over every layer x position (site "pre" / "mid" / "post")
        or layer x head (site "head"); method "exact" or "attribution". See `lensviz.sweeps.patching_sweep`."""
        from .sweeps import patching_sweep

        return patching_sweep(self, clean, corrupt, target=target, distractor=distractor, site=site, method=method,
                              **kwargs)


def _is_id_list(p) -> bool:
    return isinstance(p, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in p)


def _check_patches(patches, example: str) -> None:
    """A tuple or list of lensviz patches, else LensvizError (naming `example` as one)."""
    if not isinstance(patches, (tuple, list)):
        raise LensvizError(f"patches must be a tuple or list of patches, got {type(patches).__name__}")
    for p in patches:
        if not isinstance(p, Patch):
            raise LensvizError(f"patches must be lensviz patches (e.g. {example}), got {type(p).__name__}")
