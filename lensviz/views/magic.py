"""The %%lensviz cell magic: `%load_ext lensviz`, then a cell starting with %%lensviz runs the
Explorer on the cell's text. Options: --model NAME (default: the embedded SmolLM2), --target TOKEN,
--segments SEP (split the text into segments at SEP, e.g. "|||").
"""
from __future__ import annotations

import argparse
import shlex

from ..errors import LensvizError

_LENSES: dict = {}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="%%lensviz", add_help=False)
    p.add_argument("--model", default=None)
    p.add_argument("--target", default=None)
    p.add_argument("--segments", default=None)
    return p


def parse_line(line: str) -> argparse.Namespace:
    try:
        args, extra = _parser().parse_known_args(shlex.split(line))
    except (SystemExit, ValueError) as e:
        raise LensvizError(f"could not read the %%lensviz options {line!r}: {e}") from None
    if extra:
        raise LensvizError(f"unknown %%lensviz options {extra}; allowed: --model, --target, --segments")
    return args


def lens_for(model: str | None):
    """One Lens per model name for the session (loading is the slow part)."""
    from ..loading import load

    if model not in _LENSES:
        _LENSES[model] = load(model)
    return _LENSES[model]


def lensviz_magic(line: str, cell: str):
    from .explorer import Explorer

    args = parse_line(line)
    text = cell.rstrip("\n")
    prompt = [s for s in text.split(args.segments) if s] if args.segments else text
    return Explorer(lens_for(args.model), prompt, target=args.target)


def load_ipython_extension(ipython) -> None:
    ipython.register_magic_function(lensviz_magic, magic_kind="cell", magic_name="lensviz")
