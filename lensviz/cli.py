"""The `lensviz` command: `lensviz demo` (the demo and its Explorer page) and
`lensviz export PROMPT --target T [--model ID] -o page.html` (one offline Explorer page)."""
from __future__ import annotations

import argparse
import sys

from . import demo


def _export(args: argparse.Namespace) -> int:
    import lensviz as lv

    lens = lv.load(args.model, progress=not args.quiet)
    ex = lv.Explorer(lens, args.prompt, target=args.target)
    page = lv.export_html(ex, args.out, title=args.title)
    print(f"wrote {page.resolve()} ({lens.name}, {len(ex.trace)} tokens, target {ex.summary.get('target')!r})")
    return 0


def parser() -> argparse.ArgumentParser:
    from .version import __version__

    top = argparse.ArgumentParser(prog="lensviz", description="Look inside transformer language models, "
                                  "forward and backward: the demo, or an offline Explorer page for a prompt.")
    top.add_argument("--version", action="version", version=f"lensviz {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="{demo,export}")
    demo.add_arguments(sub.add_parser("demo", help="run the demo on the embedded model and write lensviz-demo.html"))
    ex = sub.add_parser("export", help="write one self-contained Explorer page for PROMPT")
    ex.add_argument("prompt", help="the prompt")
    ex.add_argument("--target", default=None, help="the target token, e.g. ' Paris' (default: the model's top-1)")
    ex.add_argument("--model", default=None, help="hub id or local folder (default: the embedded SmolLM2)")
    ex.add_argument("-o", "--out", default="lensviz.html", help="the page to write (default: lensviz.html)")
    ex.add_argument("--title", default=None, help="the page title")
    ex.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return top


def main(argv: list[str] | None = None) -> int:
    from .errors import LensvizError

    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return demo.run(args) if args.command == "demo" else _export(args)
    except LensvizError as e:
        print(f"lensviz: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
