"""The package's layering, read from its source: no import cycle between modules, and no module imports a higher
layer than its own. Lazy imports (inside functions) count too: a cycle that only closes at run time is still a
cycle a reader has to untangle.

    base (errors, fsutil, locks, paths, device, progress, shards, config, assets) < kernels < cache
        < models, data, arch, lora, xtok < tiny, tiny_families, train, engines, evaluate < slurm < cli, demo
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "grpo_kd"

LAYERS = {  # first part below grpo_kd -> layer
    "errors": 0, "fsutil": 0, "locks": 0, "paths": 0, "device": 0, "progress": 0, "shards": 0, "config": 0, "assets": 0,
    "kernels": 1,
    "cache": 2,
    "models": 3, "data": 3, "arch": 3, "lora": 3, "xtok": 3,
    "tiny": 4, "tiny_families": 4, "train": 4, "evaluate": 4, "engines": 4,
    "slurm": 5,
    "cli": 6, "demo": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports, anywhere in its source (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer(module: str) -> int:
    if module == "grpo_kd":
        return 0
    top = module.split(".")[1]
    assert top in LAYERS, f"{module}: a new top-level part of the package needs a layer in tests/test_layout.py"
    return LAYERS[top]


def test_no_import_reaches_a_higher_layer():
    bad = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
           for a, targets in import_graph().items() for b in sorted(targets) if layer(b) > layer(a)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    """Tarjan's strongly connected components of the module graph: every component must be one module.
    A package's __init__ importing its own submodules is not a cycle unless a submodule imports the package."""
    graph = import_graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_graph_reader_sees_lazy_and_relative_imports():
    """The checks above can only fail if the reader finds imports inside functions and relative ones."""
    graph = import_graph()
    assert "grpo_kd.train.phases" in graph["grpo_kd.slurm.local"]  # imported inside a function
    assert "grpo_kd.cache.spec" in graph["grpo_kd.cache.teacher"]
