"""The package's shape (docs/architecture.md): no import cycles among lensviz modules, also through
imports inside functions (a thin delegate whose body is only the import and a return is allowed), and
no module importing another module's _private names."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lensviz"


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for f in root.rglob("*.py"):
        rel = f.relative_to(root.parent).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return out


def _imports(name: str, path: Path, modules) -> tuple[set[str], list[str]]:
    """(lensviz modules `name` imports outside thin delegates, private names it imports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    delegates = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = [b for b in fn.body if not (isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant))]
            if len(body) == 2 and isinstance(body[0], (ast.Import, ast.ImportFrom)) and isinstance(body[1], ast.Return):
                delegates.add(id(body[0]))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges, private = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                if target in modules and target != name:
                    if id(node) not in delegates:
                        edges.add(target)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and target == base:
                        private.append(f"{name} imports {base}.{alias.name}")
        elif isinstance(node, ast.Import):
            edges |= {a.name for a in node.names if a.name in modules and a.name != name and id(node) not in delegates}
    return edges, private


def test_no_import_cycles_and_no_private_imports():
    modules = _modules()
    graph, private = {}, []
    for name, path in modules.items():
        graph[name], bad = _imports(name, path, modules)
        private += bad
    assert not private, private
    # a package's __init__ handing on its submodules is its face, not a cycle: drop edges into an __init__
    # from its own submodules
    for name in graph:
        graph[name] = {t for t in graph[name] if not (modules[t].name == "__init__.py" and name.startswith(t + "."))}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_cycle_through_a_late_import(tmp_path):
    pkg = tmp_path / "lensviz"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n    y = x\n    return y\n")
    modules = _modules(pkg)
    assert _imports("lensviz.b", pkg / "b.py", modules)[0] == {"lensviz.a"}  # not a thin delegate: counts
    (pkg / "b.py").write_text("def f():\n    from .a import x\n    return x\n")
    assert _imports("lensviz.b", pkg / "b.py", modules)[0] == set()  # a thin delegate does not
