"""In-context learning vs gradient descent (Deutch, Magar, Bar Natan & Dar, NAACL 2024, "In-context
Learning and Gradient Descent Revisited").

Three settings on the same queries: ZS (the model, no demonstrations), ICL (the demonstrations in context
before the query) and FT (the model after one epoch of plain SGD, batch 1, over the demonstrations, with
no demonstrations in context). FT is vanilla GD ("standard": the end-to-end label loss) or layer-causal
GD ("layer_causal": h_l = Block_l(sg(h_{l-1})), loss = sum over layers of each layer's logit-lens label
loss, so the gradient of layer l's parameters is that of its own loss alone). Only the attention key and
value projections are trained (`Adapter.proj_slices`: whole k_proj / v_proj, or the K and V output
features of a fused qkv).

Metrics, per layer l at the query's last token, averaged over queries:
  SimAOU_l = cos(n(a_ICL) - n(a_ZS), n(a_FT) - n(a_ZS)), a = attention output after the output projection
             (before the residual add), n = L2 normalisation;
  SimAM_l  = mean over heads of cos(s_ICL - s_ZS, s_FT - s_ZS), s = the pre-softmax scores (scaled q.k,
             after RoPE, GQA-correct) of the last token to the query's own tokens (never the demonstrations).

The wrapped model is never written to: fine-tuned tensors are kept aside and the model is run on them
through `torch.func.functional_call`; every hook and flag is restored on exit, also when a run raises.
"""
from __future__ import annotations

import math
import numbers
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from .. import capture
from ..attention import repeat_kv
from ..checks import check_int, check_token_ids
from ..errors import LensvizError
from ..hf import args_hidden, forward_kwargs, frozen_eval, has_offloaded, input_device, module_device, replace_hidden
from ..lens import Lens
from ..vocab import nll

MODES = ("standard", "layer_causal")
PARAM_SETS = ("kv", "k", "v", "q", "qk", "qv", "qkv")
SETTINGS = ("zs", "icl") + MODES  # keys of ICLComparison.attn_out / .scores


# validation and encoding -------------------------------------------------------------------------------
def _check_lens(lens) -> None:
    if not isinstance(lens, Lens):
        raise LensvizError(f"the first argument must be a lensviz Lens, got {type(lens).__name__}")


def _check_lr(lr) -> float:
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(float(lr)) or float(lr) <= 0:
        raise LensvizError(f"lr must be a finite positive number (the SGD learning rate), got {lr!r}")
    return float(lr)


def _check_modes(mode) -> tuple[str, ...]:
    modes = (mode,) if isinstance(mode, str) else mode
    if not isinstance(modes, (tuple, list)) or not modes:
        raise LensvizError(f"mode must be one of {MODES} or a non-empty tuple of them, got {mode!r}")
    for m in modes:
        if m not in MODES:
            raise LensvizError(f"mode must be one of {MODES} (or a tuple of them), got {m!r}")
    if len(set(modes)) != len(modes):
        raise LensvizError(f"mode lists a mode twice: {tuple(modes)!r}")
    return tuple(modes)


def _check_params(params) -> str:
    if params not in PARAM_SETS:
        raise LensvizError(f"params must be one of {PARAM_SETS} (which attention projections SGD trains; the "
                           f"method trains 'kv'), got {params!r}")
    return params


def _check_ids(lens, ids, what: str) -> None:
    check_token_ids(ids, lens.vocab_size, what)


def _plain_ids(lens, text: str) -> list[int]:
    return list(lens.tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_prefix(lens, text: str) -> list[int]:
    """The special tokens the tokenizer puts before `text` (e.g. a BOS), as lens.encode adds them to the
    first segment of a prompt. Special tokens after the text (an EOS) are not used."""
    with_special = list(lens.tokenizer(text, add_special_tokens=True)["input_ids"])
    plain = _plain_ids(lens, text)
    for k in range(len(with_special) - len(plain) + 1):
        if with_special[k:k + len(plain)] == plain:
            return with_special[:k]
    return []


@dataclass(frozen=True)
class Demonstration:
    """One encoded demonstration: `text_ids` then `label_ids` (token ids, no special tokens)."""

    text_ids: tuple[int, ...]
    label_ids: tuple[int, ...]


def _demonstrations(lens, demonstrations) -> list[Demonstration]:
    if isinstance(demonstrations, (str, bytes)) or not isinstance(demonstrations, (list, tuple)) or not demonstrations:
        raise LensvizError("demonstrations must be a non-empty list of (text, label) pairs or of str (the last "
                           f"token is the label), got {type(demonstrations).__name__}"
                           + (" (empty)" if isinstance(demonstrations, (list, tuple)) else ""))
    out = []
    for i, d in enumerate(demonstrations):
        if isinstance(d, str):
            if not d:
                raise LensvizError(f"demonstration {i} is an empty string")
            ids = _plain_ids(lens, d)
            if len(ids) < 2:
                raise LensvizError(f"demonstration {i} ({d!r:.40}) is {len(ids)} token(s): a str demonstration needs "
                                   "at least two, the text and its last token (the label); or pass (text, label)")
            out.append(Demonstration(tuple(ids[:-1]), tuple(ids[-1:])))
            continue
        if not (isinstance(d, (tuple, list)) and len(d) == 2 and all(isinstance(x, str) for x in d)):
            raise LensvizError(f"demonstration {i} must be a str or a (text, label) pair of str, got {d!r:.60}")
        text, label = d
        if not text:
            raise LensvizError(f"demonstration {i} has an empty text")
        text_ids, label_ids = _plain_ids(lens, text), _plain_ids(lens, label) if label else []
        if not text_ids:
            raise LensvizError(f"the text of demonstration {i} ({text!r:.40}) encodes to no token")
        if not label_ids:
            raise LensvizError(f"the label of demonstration {i} ({label!r}) encodes to no token: give a label "
                               "text, e.g. ' positive' (leading space matters)")
        out.append(Demonstration(tuple(text_ids), tuple(label_ids)))
    for d in out:
        _check_ids(lens, list(d.text_ids) + list(d.label_ids), "a demonstration")
    return out


def _queries(lens, queries) -> list[list[int]]:
    if isinstance(queries, (str, bytes)) or not isinstance(queries, (list, tuple)) or not queries:
        raise LensvizError("queries must be a non-empty list of str (each the text before the label), got "
                           f"{type(queries).__name__}" + (" (empty)" if isinstance(queries, (list, tuple)) else ""))
    out = []
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise LensvizError(f"query {i} must be a str (the text before the label), got {type(q).__name__}")
        ids = _plain_ids(lens, q) if q else []
        if not ids:
            raise LensvizError(f"query {i} ({q!r}) encodes to no token")
        _check_ids(lens, ids, f"query {i}")
        out.append(ids)
    return out


def _check_length(lens, n: int, what: str) -> None:
    if n > lens.max_tokens:
        raise LensvizError(f"{what} is {n} tokens long; this model accepts at most {lens.max_tokens}. Use fewer or "
                           "shorter demonstrations.")


def _training_example(prefix, demo: Demonstration) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T] = prefix + text + label, and the label positions [n] (token t is predicted at t - 1)."""
    ids = list(prefix) + list(demo.text_ids) + list(demo.label_ids)
    start = len(ids) - len(demo.label_ids)
    return torch.tensor(ids, dtype=torch.long), torch.arange(start, len(ids))


def _check_runnable(lens) -> None:
    if torch.is_inference_mode_enabled():
        raise LensvizError("ICL-vs-GD fine-tunes with autograd and cannot run inside torch.inference_mode(); "
                           "leave the inference_mode block")
    if has_offloaded(lens.model):
        raise LensvizError("ICL-vs-GD runs the model on fine-tuned copies of its key/value weights, which accelerate's "
                           "offloading would overwrite: load the model without offloading (everything on one "
                           "device map without 'disk' or 'cpu' offload)")


# the trainable slices ---------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Slot:
    name: str  # full parameter name
    layer: int
    role: str
    dim: int
    index: torch.Tensor | None  # on the parameter's device


class _Trainable:
    """The `params` slices of every block, their current values (`leaves`) and the full tensors built from
    them (the original parameter with those slices replaced, out of place)."""

    def __init__(self, lens, params: str):
        model = lens.model
        named = dict(model.named_parameters(remove_duplicate=False))
        self.n_layers = lens.n_layers
        self.slots: list[_Slot] = []
        for layer in range(lens.n_layers):
            for s in lens.adapter.proj_slices(lens.dims, params):
                name = f"{lens.adapter.blocks}.{layer}.{s.path}.{s.name}"
                if name not in named:  # e.g. no bias in this family
                    continue
                index = None if s.index is None else s.index.to(named[name].device)
                self.slots.append(_Slot(name, layer, s.role, s.dim, index))
        self.base = {s.name: named[s.name] for s in self.slots}
        self.names = list(dict.fromkeys(s.name for s in self.slots))

    def initial(self) -> list[torch.Tensor]:
        out = []
        for s in self.slots:
            p = self.base[s.name].detach()
            out.append((p if s.index is None else p.index_select(s.dim, s.index)).clone())
        return out

    def full(self, leaves) -> dict[str, torch.Tensor]:
        """{parameter name: tensor} with the slices set to `leaves` (differentiable in the leaves)."""
        out = {}
        for s, leaf in zip(self.slots, leaves):
            if s.index is None:
                out[s.name] = leaf
            else:
                cur = out.get(s.name, self.base[s.name].detach())
                out[s.name] = cur.index_copy(s.dim, s.index, leaf)
        return out

    def layer_norms(self, grads) -> torch.Tensor:
        sq = torch.zeros(self.n_layers, dtype=torch.float64)
        for s, g in zip(self.slots, grads):
            sq[s.layer] += float(g.double().pow(2).sum())
        return sq.sqrt()


def _losses(lens, trainable: _Trainable, leaves, ids, label_pos, mode: str):
    """(the loss to minimise, each layer's logit-lens label CE [L] as floats) of one training example.
    layer_causal: every block's input is detached; the loss is the sum of all layers' CE."""
    model, adapter = lens.model, lens.adapter
    device = input_device(model, adapter)
    outs = {}
    with ExitStack() as stack:
        for layer, block in enumerate(adapter.blocks_of(model)):
            if mode == "layer_causal":
                def pre(mod, args, kwargs):
                    return replace_hidden(args, kwargs, args_hidden(args, kwargs).detach())

                stack.callback(block.register_forward_pre_hook(pre, with_kwargs=True).remove)

            def post(mod, args, output, layer=layer):
                outs[layer] = output[0] if isinstance(output, tuple) else output

            stack.callback(block.register_forward_hook(post).remove)
        n = len(label_pos)  # label_pos are the last n positions: logits are needed at T-n-1 .. T-2
        logits = functional_call(model, trainable.full(leaves), (ids.to(device)[None],),
                                 forward_kwargs(model, n + 1), strict=False).logits[0]
    rows = (label_pos - 1).to(logits.device)
    targets = ids[label_pos].to(logits.device)
    final = nll(logits[-(n + 1):-1], targets).sum()  # the summed next-token CE of the label rows
    early = torch.zeros(0, dtype=final.dtype, device=final.device)
    if lens.n_layers > 1:  # the logit lens of blocks 0 .. L-2 at the label rows, in one unembedding
        dev = module_device(model.get_submodule(adapter.final_input))
        with torch.set_grad_enabled(mode == "layer_causal"):
            h = torch.stack([outs[layer][0, rows.to(outs[layer].device)].to(dev) for layer in range(lens.n_layers - 1)])
            lg = adapter.vocab_logits(model, h)  # [L-1, n, V], with the family's logit transform
            early = nll(lg, targets.to(lg.device).expand(lens.n_layers - 1, n)).sum(-1).to(final.device)
    per_layer = torch.cat([early.detach(), final.detach()[None]]).to("cpu", torch.float64)
    loss = final if mode == "standard" else final + early.sum()
    return loss, per_layer


def _grads(lens, trainable, leaves, ids, label_pos, mode):
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(True) for x in leaves]
        loss, per_layer = _losses(lens, trainable, leaves, ids, label_pos, mode)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return float(loss.detach()), per_layer, grads


# fine-tuning ------------------------------------------------------------------------------------------
@dataclass(eq=False)
class FineTune:
    """One epoch of plain SGD (batch 1, in the given order) over the demonstrations, on `params` only.

    updated: {parameter name: tensor}, the new value of every parameter holding a trained slice (full shape,
      on CPU; untouched features bit-identical to the model's); every other parameter is the model's own.
    train_losses [N]: the loss minimised at each step, before that step's update (standard: the summed
      label CE at the last layer; layer_causal: the sum over layers of each layer's logit-lens label CE).
    layer_losses [N, L]: each layer's logit-lens label CE at each step (last column: the model's own CE).
    grad_norms [N, L]: the L2 norm of each layer's gradient (over its trained slices) at each step."""

    mode: str
    params: str
    lr: float
    updated: dict
    train_losses: torch.Tensor
    layer_losses: torch.Tensor
    grad_norms: torch.Tensor


def _leaves_from(trainable: _Trainable, updated: dict | None) -> list[torch.Tensor]:
    if updated is None:
        return trainable.initial()
    out = []
    for s in trainable.slots:
        if s.name not in updated:
            raise LensvizError(f"start has no tensor for {s.name}: pass FineTune.updated of the same params")
        t = updated[s.name].to(device=trainable.base[s.name].device, dtype=trainable.base[s.name].dtype)
        if t.shape != trainable.base[s.name].shape:
            raise LensvizError(f"start[{s.name!r}] has shape {tuple(t.shape)}, the parameter "
                               f"{tuple(trainable.base[s.name].shape)}")
        out.append((t if s.index is None else t.index_select(s.dim, s.index)).clone())
    return out


def _finetune(lens, demos, prefix, lr, mode, params) -> FineTune:
    trainable = _Trainable(lens, params)
    leaves = trainable.initial()
    losses, layer_losses, norms = [], [], []
    with frozen_eval(lens.model):
        for demo in demos:
            ids, pos = _training_example(prefix, demo)
            loss, per_layer, grads = _grads(lens, trainable, leaves, ids, pos, mode)
            leaves = [x - lr * g for x, g in zip(leaves, grads)]
            losses.append(loss)
            layer_losses.append(per_layer)
            norms.append(trainable.layer_norms(grads))
    updated = {k: v.detach() for k, v in trainable.full(leaves).items()}
    return FineTune(mode, params, lr, updated, torch.tensor(losses, dtype=torch.float64), torch.stack(layer_losses),
                    torch.stack(norms))


def finetune(lens, demonstrations, *, lr: float, mode: str = "standard", params: str = "kv") -> FineTune:
    """Fine-tune `params` (default the attention keys and values) with one epoch of SGD, batch 1, over the
    demonstrations ((text, label) pairs, or str whose last token is the label; loss = summed CE on the label
    tokens), in vanilla ("standard") or layer-causal ("layer_causal") mode. The model is not changed:
    the result holds the updated tensors (`FineTune.updated`)."""
    _check_lens(lens)
    lr, params, mode = _check_lr(lr), _check_params(params), _check_modes(mode)
    if len(mode) != 1:
        raise LensvizError("finetune takes one mode; compare_icl_gd runs several")
    demos = _demonstrations(lens, demonstrations)
    _check_runnable(lens)
    prefix = _special_prefix(lens, _decode_demo(lens, demos[0]))
    for i, d in enumerate(demos):
        _check_length(lens, len(prefix) + len(d.text_ids) + len(d.label_ids), f"demonstration {i}")
    return _to_cpu(_finetune(lens, demos, prefix, lr, mode[0], params))


def _to_cpu(ft: FineTune) -> FineTune:
    ft.updated = {k: v.to("cpu") for k, v in ft.updated.items()}
    return ft


def _decode_demo(lens, demo: Demonstration) -> str:
    return lens.tokenizer.decode(list(demo.text_ids) + list(demo.label_ids))


def kv_gradients(lens, demonstration, *, mode: str = "standard", params: str = "kv", start: dict | None = None) -> dict:
    """The gradient of one training step's loss for one demonstration ((text, label) or str), at the model's
    weights or at `start` (a `FineTune.updated`): {parameter name: Tensor of the parameter's shape}, zero
    outside the trained slices. layer_causal: layer l's entries are the gradient of layer l's own
    logit-lens label CE (its input detached). Tensors are detached, on CPU."""
    _check_lens(lens)
    params, modes = _check_params(params), _check_modes(mode)
    if len(modes) != 1:
        raise LensvizError("kv_gradients takes one mode")
    demo = _demonstrations(lens, [demonstration])[0]
    _check_runnable(lens)
    prefix = _special_prefix(lens, _decode_demo(lens, demo))
    ids, pos = _training_example(prefix, demo)
    _check_length(lens, len(ids), "the demonstration")
    trainable = _Trainable(lens, params)
    leaves = _leaves_from(trainable, start)
    with frozen_eval(lens.model):
        _, _, grads = _grads(lens, trainable, leaves, ids, pos, modes[0])
    out = {}
    for s, g in zip(trainable.slots, grads):
        cur = out.get(s.name, torch.zeros_like(trainable.base[s.name], device="cpu"))
        g = g.detach().to("cpu")
        out[s.name] = g if s.index is None else cur.index_copy(s.dim, s.index.to("cpu"), g)
    return out


# recording ZS / ICL / FT -------------------------------------------------------------------------------
@dataclass(eq=False)
class LastToken:
    """What one run records at its last position, per layer: attn_out [L, D], the attention sub-layer
    output (after the output projection, before the residual add) and scores [L, H, n], the pre-softmax
    scores (scaling * q.k after RoPE; query head h reads kv head h // (H / H_kv)) to the last n keys."""

    attn_out: torch.Tensor
    scores: torch.Tensor


def last_token(lens, input_ids, n_keys: int, updated: dict | None = None) -> LastToken:
    """Run the model on input_ids [T] (with `updated` tensors in place of its own parameters, e.g.
    `FineTune.updated`) and record `LastToken` for the last position against the last `n_keys` keys.
    Capture goes through lensviz's attention function, as in `lens.trace`."""
    _check_lens(lens)
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
    n_keys = check_int(n_keys, "n_keys", 1)
    if n_keys > len(ids):
        raise LensvizError(f"n_keys is {n_keys} but the prompt has {len(ids)} tokens")
    _check_length(lens, len(ids), "the prompt")
    _check_ids(lens, ids.tolist(), "input_ids")
    return _last_token(lens, ids, n_keys, updated or {})


def _last_token(lens, ids, n_keys, updated: dict) -> LastToken:
    model, adapter, dims = lens.model, lens.adapter, lens.dims
    if updated:
        named = dict(model.named_parameters(remove_duplicate=False))
        unknown = [n for n in updated if n not in named]
        if unknown:
            raise LensvizError(f"updated names {unknown[0]!r}, which is not a parameter of this model")
        updated = {n: t.to(device=named[n].device, dtype=named[n].dtype) for n, t in updated.items()}
    rec = capture.Recorder(dims.n_layers, adapter.is_parallel(model.config), False)
    outs = [None] * dims.n_layers
    with ExitStack() as stack:
        stack.enter_context(frozen_eval(model))
        stack.enter_context(capture.installed(model, adapter, rec))
        stack.enter_context(torch.no_grad())
        for layer in range(dims.n_layers):
            def hook(mod, args, output, layer=layer):
                out = output[0] if isinstance(output, tuple) else output
                outs[layer] = out[0, -1].detach()

            stack.callback(adapter.part(model, layer, "o_proj").register_forward_hook(hook).remove)
        device = input_device(model, adapter)
        functional_call(model, updated, (ids.to(device)[None],), forward_kwargs(model, 1), strict=False)
    scores = []
    rep = dims.n_heads // dims.n_kv_heads
    for layer in range(dims.n_layers):
        q, k = rec.sites["q"][layer], rec.sites["k"][layer]  # [H, T, d], [H_kv, T, d]
        keys = repeat_kv(k[:, -n_keys:], rep)  # [H, n, d]
        s = torch.einsum("hd,hnd->hn", q[:, -1], keys) * rec.sites["scaling"][layer]
        scores.append(s.to("cpu"))
    return LastToken(torch.stack([o.to("cpu") for o in outs]), torch.stack(scores))


# metrics -----------------------------------------------------------------------------------------------
def _cos(x: torch.Tensor, y: torch.Tensor, tol_x, tol_y) -> torch.Tensor:
    """cos over the last dim in float64; NaN where either vector's norm is <= its tolerance."""
    x, y = x.double(), y.double()
    nx, ny = x.norm(dim=-1), y.norm(dim=-1)
    c = (x * y).sum(-1) / (nx * ny)
    return torch.where((nx <= tol_x) | (ny <= tol_y), torch.full_like(c, float("nan")), c.clamp(-1, 1))


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True)


def sim_aou(zs: torch.Tensor, icl: torch.Tensor, ft: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
    """cos(n(icl) - n(zs), n(ft) - n(zs)) over the last dim (any leading dims); NaN where an update's norm
    is <= tol (the unit vectors did not move)."""
    u, w = _unit(icl) - _unit(zs), _unit(ft) - _unit(zs)
    return _cos(u, w, tol, tol)


def sim_am(zs: torch.Tensor, icl: torch.Tensor, ft: torch.Tensor, rtol: float = 0.0) -> torch.Tensor:
    """cos(icl - zs, ft - zs) over the last dim (score vectors [..., n]); NaN where a shift's norm is
    <= rtol * |zs|."""
    scale = rtol * zs.double().norm(dim=-1)
    return _cos(icl - zs, ft - zs, scale, scale)


def random_sim_aou(zs: torch.Tensor, icl: torch.Tensor, n: int, generator: torch.Generator, tol: float = 0.0):
    """The random-update baseline: cos(n(icl) - n(zs), r) for n draws of r ~ Uniform[-1, 1]^D (i.i.d.
    coordinates, zero mean; r and -r are equally likely, so the expectation is exactly 0).
    zs, icl [Q, L, D] -> (sum [L], sum of squares [L], draws per layer: Q * n)."""
    u = _unit(icl) - _unit(zs)  # [Q, L, D]
    q_n, n_layers, d = u.shape
    total, total_sq = torch.zeros(n_layers, dtype=torch.float64), torch.zeros(n_layers, dtype=torch.float64)
    for qi in range(q_n):
        for layer in range(n_layers):
            r = torch.rand(n, d, generator=generator, dtype=torch.float64) * 2 - 1
            c = _cos(r, u[qi, layer].expand(n, d), 0.0, tol)
            total[layer] += c.sum()
            total_sq[layer] += c.pow(2).sum()
    return total, total_sq, q_n * n


@dataclass(eq=False)
class ICLComparison:
    """Result of `compare_icl_gd`. Q queries, L layers, H heads, D d_model, N demonstrations.

    sim_aou[mode]: Tensor[L], SimAOU per layer, mean over queries (NaN-aware);
    sim_aou_per_query[mode]: Tensor[Q, L];
    sim_am[mode]: Tensor[L], SimAM_delta per layer (mean over heads, then over queries; NaN-aware);
    sim_am_per_query[mode]: Tensor[Q, L]; sim_am_per_head[mode]: Tensor[Q, L, H].
      A value is NaN where it is undefined: ICL or FT left the vector unmoved up to rounding (norm of the
      shift <= sqrt(eps) of the model dtype, at least float32's 3.5e-4, relative to |s_ZS| for scores).
      Layer 0 of a RoPE model is the usual case for SimAM: its scores to the query tokens depend only on relative positions, so the
      demonstrations in front do not change them.
    random_sim_aou: Tensor[L], the SimAOU with the FT update replaced by r ~ Uniform[-1, 1]^D (i.i.d.,
      zero mean), mean over Q * n_random draws; random_sim_aou_std [L]: std of one draw (about 1/sqrt(D));
      random_sim_aou_sem [L]: the standard error of the mean (std / sqrt(Q * n_random)).
    finetunes[mode]: the `FineTune` (updated tensors, train_losses [N], layer_losses [N, L], grad_norms [N, L]);
      train_losses[mode] / layer_losses[mode] / grad_norms[mode] are shortcuts.
    attn_out[setting]: Tensor[Q, L, D] and scores[setting]: list of Q Tensor[L, H, n_q], for setting in
      "zs", "icl" and each mode (FT); n_q = len(query_tokens[i]).
    prompt_ids["zs" | "icl"]: list of Q LongTensor[T] (the FT setting runs the ZS prompts);
    query_tokens: list of Q lists of str; context_length: int, the tokens before the query in ICL prompts."""

    modes: tuple
    params: str
    lr: float
    seed: int
    n_random: int
    sim_aou: dict
    sim_aou_per_query: dict
    sim_am: dict
    sim_am_per_query: dict
    sim_am_per_head: dict
    random_sim_aou: torch.Tensor
    random_sim_aou_std: torch.Tensor
    random_sim_aou_sem: torch.Tensor
    finetunes: dict
    attn_out: dict
    scores: dict
    prompt_ids: dict
    query_tokens: list
    context_length: int
    n_layers: int = field(default=0)

    @property
    def train_losses(self) -> dict:
        return {m: f.train_losses for m, f in self.finetunes.items()}

    @property
    def layer_losses(self) -> dict:
        return {m: f.layer_losses for m, f in self.finetunes.items()}

    @property
    def grad_norms(self) -> dict:
        return {m: f.grad_norms for m, f in self.finetunes.items()}

    def __repr__(self) -> str:
        parts = [f"{m}: SimAOU {float(torch.nanmean(self.sim_aou[m])):+.3f}, "
                 f"SimAM {float(torch.nanmean(self.sim_am[m])):+.3f}" for m in self.modes]
        return (f"ICLComparison({len(self.query_tokens)} queries, {self.n_layers} layers; " + "; ".join(parts)
                + f"; random SimAOU {float(torch.nanmean(self.random_sim_aou)):+.4f})")


def _nanmean(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.nanmean(x, dim=dim)


def compare_icl_gd(lens, demonstrations, queries, *, lr: float, mode=MODES, params: str = "kv", seed: int = 0,
                   separator: str = "\n", n_random: int = 1024) -> ICLComparison:
    """Compare in-context learning with GD fine-tuning (Deutch et al. 2024), per layer, on the same queries.

    demonstrations: list of (text, label) pairs, or of str whose last token is the label. Texts and labels
      are tokenised separately (as prompt segments are), without special tokens; the tokenizer's leading
      special tokens (a BOS), if any, start every prompt.
    queries: list of str, each the text before its label; the metrics are read at its last token.
    ICL prompt: [BOS] text_1 label_1 separator ... text_N label_N separator query.
    FT: `finetune` (1 epoch of SGD, batch 1, demonstrations in order, loss = summed label-token CE,
      dropout off) for each of `mode` ("standard" = vanilla GD, "layer_causal" = LCGD), each from the
      model's own weights, then the ZS prompt [BOS] query on the updated weights.
    lr: the SGD learning rate (the paper's runs: 5e-4 SST-2 ... 0.2 AGNews on a 1.3B model).
    params: which projections are trained: "kv" (the method), or "k", "v", "q", "qk", "qv", "qkv".
    seed: seeds the random-update baseline (training is deterministic). n_random: random draws per query.
    Returns `ICLComparison`; the model's weights, flags and hooks are as before, also if this raises."""
    _check_lens(lens)
    lr, modes, params = _check_lr(lr), _check_modes(mode), _check_params(params)
    seed, n_random = check_int(seed, "seed", 0), check_int(n_random, "n_random", 1)
    if not isinstance(separator, str):
        raise LensvizError(f"separator must be a str (put between demonstrations), got {type(separator).__name__}")
    demos = _demonstrations(lens, demonstrations)
    qs = _queries(lens, queries)
    _check_runnable(lens)
    prefix = _special_prefix(lens, lens.tokenizer.decode(qs[0]))
    sep = _plain_ids(lens, separator) if separator else []
    _check_ids(lens, sep, "the separator")
    context = list(prefix)
    for i, d in enumerate(demos):
        _check_length(lens, len(prefix) + len(d.text_ids) + len(d.label_ids), f"demonstration {i}")
        context += list(d.text_ids) + list(d.label_ids) + sep
    longest = max(len(q) for q in qs)
    _check_length(lens, len(context) + longest, "the ICL prompt (all demonstrations and the longest query)")

    zs_ids = [torch.tensor(prefix + q, dtype=torch.long) for q in qs]
    icl_ids = [torch.tensor(context + q, dtype=torch.long) for q in qs]
    finetunes = {m: _finetune(lens, demos, prefix, lr, m, params) for m in modes}
    runs = {"zs": [_last_token(lens, ids, len(q), {}) for ids, q in zip(zs_ids, qs)],
            "icl": [_last_token(lens, ids, len(q), {}) for ids, q in zip(icl_ids, qs)]}
    for m in modes:
        runs[m] = [_last_token(lens, ids, len(q), finetunes[m].updated) for ids, q in zip(zs_ids, qs)]
    attn_out = {k: torch.stack([r.attn_out for r in v]) for k, v in runs.items()}
    scores = {k: [r.scores for r in v] for k, v in runs.items()}
    for ft in finetunes.values():
        _to_cpu(ft)

    # below this a shift has no measurable direction: HF builds the rotary tables in float32, so even a
    # float64 model's scores carry float32 rounding
    tol = math.sqrt(max(torch.finfo(lens.model_dtype).eps, torch.finfo(torch.float32).eps))
    aou_q, am_h = {}, {}
    for m in modes:
        aou_q[m] = sim_aou(attn_out["zs"], attn_out["icl"], attn_out[m], tol)  # [Q, L]
        am_h[m] = torch.stack([sim_am(z, i, f, tol) for z, i, f in zip(scores["zs"], scores["icl"], scores[m])])
    am_q = {m: _nanmean(v, -1) for m, v in am_h.items()}

    gen = torch.Generator().manual_seed(seed)
    total, total_sq, n = random_sim_aou(attn_out["zs"], attn_out["icl"], n_random, gen, tol)
    mean = total / n
    std = (total_sq / n - mean.pow(2)).clamp_min(0).mul(n / max(n - 1, 1)).sqrt()
    return ICLComparison(
        modes=modes, params=params, lr=lr, seed=seed, n_random=n_random,
        sim_aou={m: _nanmean(v, 0) for m, v in aou_q.items()}, sim_aou_per_query=aou_q,
        sim_am={m: _nanmean(v, 0) for m, v in am_q.items()}, sim_am_per_query=am_q, sim_am_per_head=am_h,
        random_sim_aou=mean, random_sim_aou_std=std, random_sim_aou_sem=std / math.sqrt(n),
        finetunes=finetunes, attn_out=attn_out, scores=scores,
        prompt_ids={"zs": zs_ids, "icl": icl_ids}, query_tokens=[[lens.decode(i) for i in q] for q in qs],
        context_length=len(context), n_layers=lens.n_layers)
