"""The main job: load the embedded model, trace one prompt, print a summary and write the offline
Explorer page (lensviz-demo.html, as lv.export_html) to open in a browser.

    python -m lensviz.demo ["prompt"] [" target"] [-o lensviz-demo.html]      (or: lensviz demo ...)
"""
from __future__ import annotations

import argparse
import sys
import time

PROMPT = "I like Italy and France. I visited the city of"
TARGET = " Florence"
PAGE = "lensviz-demo.html"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("prompt", nargs="?", default=PROMPT, help=f"the prompt (default: {PROMPT!r})")
    parser.add_argument("target", nargs="?", default=TARGET, help=f"the target token (default: {TARGET!r})")
    parser.add_argument("-o", "--out", default=PAGE, help=f"where to write the Explorer page (default: {PAGE})")
    parser.add_argument("--model", default=None, help="a hub id or local folder instead of the embedded model")
    return parser


def run(args: argparse.Namespace) -> int:
    import lensviz as lv

    t0 = time.perf_counter()
    lens = lv.load(args.model)
    t1 = time.perf_counter()
    tr = lens.trace(args.prompt, target=args.target)
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
    page = lv.export_html(tr, args.out, title=f"lensviz demo · {lens.name}")
    print(f"wrote the Explorer page {page.resolve()} (offline, one file): open it in a browser")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .errors import LensvizError

    parser = add_arguments(argparse.ArgumentParser(prog="python -m lensviz.demo", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except LensvizError as e:
        print(f"lensviz: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
