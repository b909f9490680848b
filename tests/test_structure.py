"""The package's shape: imports point down the layers of docs/architecture.md with no cycles,
and no file or function grows past what a reader takes in at once."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Source folder -> package name (pyproject's package-dir).
FOLDERS = {"radixflow": "radixflow", "frontend": "radixflow.frontend", "runtime": "radixflow.runtime",
           "radix": "radixflow.radix", "kernels": "radixflow.kernels", "grammars": "radixflow.grammars"}
# Longest matching prefix decides a module's layer; imports may only go to the same or a lower one.
LAYERS = {
    "radixflow.radix": 0, "radixflow.grammars": 0, "radixflow.kernels": 0, "radixflow.paths": 0,
    "radixflow.runtime": 1,
    "radixflow.runtime.text": 2, "radixflow.runtime.loading": 2,
    "radixflow.runtime.model": 3,
    "radixflow.runtime.scheduler": 4,
    "radixflow.runtime.engine": 5,
    "radixflow.runtime.server": 6,
    "radixflow.runtime.router": 6,
    "radixflow.frontend": 7,
}
FACADE = "radixflow"  # the root package re-exports the public API from every layer
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for folder, pkg in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """Package modules that `name` imports (anywhere in the file, lazily or not), resolved to the
    module itself (`from a.b import c` is a.b.c when that is a module, else a.b)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def test_no_import_cycles():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w == FACADE:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index and v != FACADE:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_only_point_down_the_layers():
    upward = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
              for a, targets in GRAPH.items() if a != FACADE for b in targets
              if b != FACADE and _layer(b) > _layer(a)]
    assert not upward, "\n".join(upward)


def test_the_layer_table_knows_every_module():
    assert "radixflow.runtime.scheduler.scheduler" in MODULES and "radixflow.runtime.server.app" in MODULES
    for name in MODULES:
        assert name == FACADE or any(name == p or name.startswith(p + ".") for p in LAYERS), name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_files_and_functions_stay_small(name):
    path = MODULES[name]
    src = path.read_text()
    assert len(src.splitlines()) <= MAX_FILE_LINES, f"{path.relative_to(ROOT)}: {len(src.splitlines())} lines"
    long = [(node.end_lineno - node.lineno + 1, node.name) for node in ast.walk(ast.parse(src))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(ROOT)}: functions over {MAX_FUNCTION_LINES} lines: {long}"
