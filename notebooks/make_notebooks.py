"""Write the tutorial notebooks from the cell lists below, execute them on the embedded model and save
them with their outputs (widget state included), so they read well on GitHub.

    .venv/bin/python notebooks/make_notebooks.py            # all notebooks
    .venv/bin/python notebooks/make_notebooks.py 01 04      # only those whose name starts with 01 / 04
    .venv/bin/python notebooks/make_notebooks.py --markdown # only markdown changed: keep the saved outputs
    .venv/bin/python notebooks/make_notebooks.py --no-run   # write the cells only, no execution

The cell text lives in notebooks/_cells.py (one list per notebook); edit it there, then re-run this
script. Each notebook's wall time is printed (the teaching target is < 3 minutes on 2 CPU cores).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _cells import NOTEBOOKS  # noqa: E402

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
PROGRESS = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")  # a tqdm bar's text, e.g. "x:  0%|   | 0/272 [00:00<?, ?it/s]"
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = KERNEL
    nb.metadata["language_info"] = {"name": "python"}
    for kind, text in cells:
        text = text.strip("\n")
        cell = nbformat.v4.new_markdown_cell(text) if kind == "md" else nbformat.v4.new_code_cell(text)
        cell.id = f"{name[:2]}-{len(nb.cells):02d}"  # stable ids: small diffs on re-runs
        nb.cells.append(cell)
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 600) -> float:
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


def drop_progress_bars(nb: nbformat.NotebookNode) -> None:
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


def keep_outputs(nb: nbformat.NotebookNode, path: Path) -> bool:
    """Copy the outputs of the saved notebook at `path` into `nb` when its code cells are unchanged
    (only markdown was edited). Returns False when a code cell differs (then it must be re-run)."""
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
    run = "--no-run" not in argv
    markdown_only = "--markdown" in argv
    wanted = [a for a in argv if not a.startswith("--")]
    for name, cells in NOTEBOOKS.items():
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        nb = build(name, cells)
        if markdown_only:
            if not keep_outputs(nb, HERE / f"{name}.ipynb"):
                print(f"{name}: code cells changed, re-run it (without --markdown)")
                continue
            print(f"{name}: markdown updated, outputs kept")
        elif run:
            seconds = execute(nb)
            drop_progress_bars(nb)
            print(f"{name}: executed in {seconds:.0f} s", flush=True)
        nbformat.write(nb, HERE / f"{name}.ipynb")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
