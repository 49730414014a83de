"""Build the tutorial notebooks from their sources: notebooks/src/NN_name.py (percent format, real
Python) -> notebooks/NN_name.ipynb, executed on the embedded model and saved with its outputs (widget
state included), so it reads well on GitHub.

    .venv/bin/python notebooks/build.py                 # every notebook: write and execute
    .venv/bin/python notebooks/build.py 01 04           # only those whose name starts with 01 / 04
    .venv/bin/python notebooks/build.py --keep-outputs  # code unchanged (prose edits): keep the saved outputs
    .venv/bin/python notebooks/build.py --no-run        # write the cells only, no execution

Source format: `# %%` starts a code cell, `# %% [markdown]` a markdown cell whose lines are comments
(`# text`); lines before the first marker are the file's header. IPython magics are written commented
out so the file stays Python: a line `# %matplotlib inline` in a code cell is the magic
`%matplotlib inline`, and a code cell whose first line is a cell magic (`# %%lensviz ...`) has every
line commented. Each notebook's wall time is printed (the teaching target: < 3 minutes on 2 CPU cores).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
PROGRESS = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")  # a tqdm bar's text, e.g. "x:  0%|   | 0/272 [00:00<?, ?it/s]"
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}
MARKER = re.compile(r"^# %%( \[markdown\])?$")
LINE_MAGIC = re.compile(r"^# (%\w.*)$")
CELL_MAGIC = re.compile(r"^# %%\w")


def sources() -> dict[str, Path]:
    """{notebook name: its source file}, in name order."""
    return {p.stem: p for p in sorted(SRC.glob("[0-9][0-9]_*.py"))}


def _uncomment(line: str) -> str:
    return "" if line == "#" else line[2:] if line.startswith("# ") else line


def parse(text: str) -> list[tuple[str, str]]:
    """The cells of a percent-format source: [("md" | "code", cell text)], magics restored."""
    cells, kind, lines = [], None, []

    def close():
        if kind is None:
            return
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        if kind == "md":
            body = [_uncomment(line) for line in lines]
        elif lines and CELL_MAGIC.match(lines[0]):
            body = [_uncomment(line) for line in lines]
        else:
            body = [LINE_MAGIC.sub(r"\1", line) for line in lines]
        cells.append((kind, "\n".join(body)))

    for line in text.splitlines():
        m = MARKER.match(line)
        if m:
            close()
            kind, lines = ("md" if m.group(1) else "code"), []
        elif kind is not None:
            lines.append(line)
    close()
    return cells


def to_source(cells: list[tuple[str, str]], header: str) -> str:
    """The percent-format text of `cells` (the inverse of `parse`)."""
    out = [header.rstrip("\n"), ""]
    for kind, text in cells:
        lines = text.split("\n")
        if kind == "md":
            out += ["# %% [markdown]"] + [f"# {line}" if line else "#" for line in lines]
        elif lines and lines[0].startswith("%%"):
            out += ["# %%"] + [f"# {line}" if line else "#" for line in lines]
        else:
            out += ["# %%"] + [f"# {line}" if line.startswith("%") else line for line in lines]
        out.append("")
    return "\n".join(out)


def build(name: str, cells: list[tuple[str, str]]):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = KERNEL
    nb.metadata["language_info"] = {"name": "python"}
    for kind, text in cells:
        cell = nbformat.v4.new_markdown_cell(text) if kind == "md" else nbformat.v4.new_code_cell(text)
        cell.id = f"{name[:2]}-{len(nb.cells):02d}"  # stable ids: small diffs on re-runs
        nb.cells.append(cell)
    return nb


def execute(nb, timeout: int = 600) -> float:
    from nbclient import NotebookClient

    env_before = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                                resources={"metadata": {"path": str(HERE)}})
        t0 = time.perf_counter()
        client.execute()
        return time.perf_counter() - t0
    finally:
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def drop_progress_bars(nb) -> None:
    """Remove progress-bar outputs (model loading) and the widget models only they used: they are
    transient, and saved they show as a half-drawn bar. (tqdm's notebook bar ignores TQDM_DISABLE.)"""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (
                o.output_type == "display_data" and PROGRESS.search(o.get("data", {}).get("text/plain", "")))]
    widgets = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json")
    if not widgets:
        return
    state = widgets["state"]
    used = {o["data"]["application/vnd.jupyter.widget-view+json"]["model_id"] for c in nb.cells
            if c.cell_type == "code" for o in c.outputs
            if "application/vnd.jupyter.widget-view+json" in o.get("data", {})}
    todo = list(used)
    while todo:  # models reachable from a displayed one (layouts, styles, children)
        for ref in re.findall(r"IPY_MODEL_([0-9a-f]{32})", json.dumps(state.get(todo.pop(), {}))):
            if ref not in used:
                used.add(ref)
                todo.append(ref)
    widgets["state"] = {k: v for k, v in state.items() if k in used}
    if not widgets["state"]:
        del nb.metadata["widgets"]


def keep_outputs(nb, path: Path) -> bool:
    """Copy the outputs of the saved notebook at `path` into `nb` when its code cells are unchanged
    (only markdown was edited). Returns False when a code cell differs (then it must be re-run)."""
    import nbformat

    if not path.exists():
        return False
    old = nbformat.read(path, as_version=4)
    new_code = [c for c in nb.cells if c.cell_type == "code"]
    old_code = [c for c in old.cells if c.cell_type == "code"]
    if [c.source for c in new_code] != [c.source for c in old_code]:
        return False
    for n, o in zip(new_code, old_code):
        n.outputs, n.execution_count = o.outputs, o.execution_count
    if "widgets" in old.metadata:
        nb.metadata["widgets"] = old.metadata["widgets"]
    return True


def main(argv: list[str]) -> int:
    import nbformat

    run = "--no-run" not in argv
    keep = "--keep-outputs" in argv
    wanted = [a for a in argv if not a.startswith("--")]
    for name, path in sources().items():
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        nb = build(name, parse(path.read_text(encoding="utf-8")))
        if keep:
            if not keep_outputs(nb, HERE / f"{name}.ipynb"):
                print(f"{name}: code cells changed, run it (without --keep-outputs)")
                continue
            print(f"{name}: written, outputs kept")
        elif run:
            seconds = execute(nb)
            drop_progress_bars(nb)
            print(f"{name}: executed in {seconds:.0f} s", flush=True)
        nbformat.write(nb, HERE / f"{name}.ipynb")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
