"""Regenerate docs/images/*.png: one figure per lensviz.plot view, from the embedded SmolLM2-135M-Instruct
on the Reversed Attention paper's prompt. Run from the repository root: python docs/make_images.py
(about two minutes on 2 shared CPU cores, most of it the η sweep; offline)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import lensviz as lv
from lensviz import plot
from lensviz.lenses.composition import composition_scores
from lensviz.lenses.reversed import rank_heads

PROMPT = "I like Italy and France. I visited the city of"
TARGET = " Florence"
OUT = Path(__file__).resolve().parent / "images"
DPI = 110


START = time.time()


def save(fig, name: str) -> None:
    path = OUT / f"{name}.png"
    fig.savefig(path, dpi=DPI)
    print(f"  {path.relative_to(OUT.parent.parent)}  ({time.time() - START:.0f} s)", flush=True)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    lens = lv.load(progress=False)
    tr = lens.trace(PROMPT, target=TARGET)
    best = rank_heads(tr, top=1)[0]  # the head with the largest |RA|_F, as in the paper's Fig. 1
    print(f"{tr}; top RA head: layer {best.layer}, head {best.head}")
    save(plot.attention(tr, best.layer, best.head), "attention")
    save(plot.reversed_attention(tr, best.layer, best.head), "reversed_attention")
    save(plot.compare_maps(tr, best.layer, best.head), "compare_maps")
    save(plot.head_norms(tr, "reversed"), "head_norms_reversed")
    save(plot.head_norms(tr, "forward"), "head_norms_forward")
    save(plot.logit_lens(tr), "logit_lens")
    save(plot.logit_lens(tr, colour="rank"), "logit_lens_rank")
    save(plot.backward_lens(tr), "backward_lens")
    save(plot.target_rank_by_layer(tr, sign=-1), "target_rank_by_layer")
    save(plot.flow_graph(tr, position=-1, layers=[lens.n_layers - 2, lens.n_layers - 1]), "flow_graph")

    # attention patching sweep (Reversed Attention, Katz & Wolf): self-patching with RA vs the forward-map control
    etas = [-40, -20, -10, -5, -2, -1, -0.5, 0, 0.5, 1, 2]
    forward_maps = {layer: tr.attention(layer) for layer in range(lens.n_layers)}
    nll = {"P = RA (self-patching)": [], "P = A (control)": []}
    for eta in etas:
        for label, patch in (("P = RA (self-patching)", lv.AttentionPatch(eta)),
                             ("P = A (control)", lv.AttentionPatch(eta, maps=forward_maps))):
            nll[label].append(lens.trace(PROMPT, target=TARGET, patches=[patch], backward=False).loss)
    save(plot.patch_sweep(etas, nll, ylabel=f"NLL of '{TARGET}'",
                          title="Attention patching A' = A + η·P on all layers and heads", xscale="symlog"),
         "patch_sweep")

    save(plot.composition(composition_scores(lens, "q"), mode="q"), "composition")
    print(f"done in {time.time() - START:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
