"""The core's modules import each other in one direction only: no import cycle, deferred imports included (a
deferred import that closes a cycle hides it instead of removing it). `TYPE_CHECKING` imports do not count."""

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "stts_adapter"


def module_name(path: Path) -> str:
    """`path`'s dotted name inside the package: "io", "cli.main", "cli" for `cli/__init__.py`."""
    parts = path.relative_to(CORE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """The core modules `path` imports when it runs (at its top or inside functions), subpackages included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_checking_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    name = module_name(path)
    package = name.split(".") if path.stem == "__init__" else name.split(".")[:-1]
    imported = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or id(node) in type_checking_only:
            continue
        if node.level:  # from .x import y, from ..x import y, from . import x
            base = package[: len(package) - (node.level - 1)]
        elif node.module and node.module.startswith("stts_adapter."):
            base = []
        else:
            continue
        module = [part for part in (node.module or "").split(".") if part and part != "stts_adapter"]
        targets = [[*base, *module]] if module else [[*base, alias.name] for alias in node.names]
        for target in targets:
            while target and ".".join(target) not in modules:
                target = target[:-1]  # `from .cli import main`: the module is cli (or cli.main if it exists)
            if target:
                imported.add(".".join(target))
    return imported & modules - {name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that starts and ends at the same module, or None."""
    for start in sorted(graph):
        stack = [[start]]
        while stack:
            path = stack.pop()
            for nxt in sorted(graph[path[-1]]):
                if nxt == start:
                    return [*path, start]
                if nxt not in path:
                    stack.append([*path, nxt])
    return None


def test_the_core_modules_import_each_other_without_a_cycle():
    files = {module_name(p): p for p in CORE.rglob("*.py") if p != CORE / "__init__.py"}
    assert {"cli.main", "cli", "testing.common", "visualization"} <= set(files)  # subpackages are in the graph
    graph = {name: runtime_imports(path, set(files)) for name, path in files.items()}
    assert graph["io"] and "model" not in graph["io"]  # io reads and writes files; it does not build models
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_it_is_shown():
    assert find_cycle({"io": {"model"}, "model": {"io", "scorer"}, "scorer": set()}) == ["io", "model", "io"]
    assert find_cycle({"io": {"scorer"}, "model": {"io", "scorer"}, "scorer": set()}) is None
