"""The main job for now: load the embedded model, trace one prompt, print a summary.

    python -m lensviz.demo ["prompt"] [" target"]
"""
from __future__ import annotations

import sys
import time


def main(argv: list[str] | None = None) -> int:
    import lensviz as lv

    argv = sys.argv[1:] if argv is None else argv
    prompt = argv[0] if argv else "I like Italy and France. I visited the city of"
    target = argv[1] if len(argv) > 1 else " Florence"
    t0 = time.perf_counter()
    lens = lv.load()
    t1 = time.perf_counter()
    tr = lens.trace(prompt, target=target)
    t2 = time.perf_counter()
    print(lens)
    print(f"loaded in {t1 - t0:.1f} s, traced (forward + backward) in {t2 - t1:.2f} s")
    print(tr)
    print("tokens:", " | ".join(repr(t) for t in tr.tokens))
    top = tr.logits[-1].softmax(-1).topk(5)
    print("next token:", ", ".join(f"{lens.decode(int(i))!r} {float(p):.3f}" for p, i in zip(top.values, top.indices)))
    norms = [(float(tr.reversed_attention(layer)[h].norm()), layer, h)
             for layer in range(lens.n_layers) for h in range(lens.n_heads)]
    norms.sort(reverse=True)
    print("heads with the largest Reversed Attention norm:",
          ", ".join(f"L{layer}H{h} {n:.4f}" for n, layer, h in norms[:5]))
    g = [float(tr.resid_grad(layer, "pre")[-1].norm()) for layer in range(lens.n_layers)]
    print("|dL/d resid_pre| at the last token, per layer:", " ".join(f"{x:.3f}" for x in g))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
