"""The core's modules import each other in one direction only: no import cycle, deferred imports included (a
deferred import that closes a cycle hides it instead of removing it). `TYPE_CHECKING` imports do not count."""

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "stts_adapter"


def runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """The core modules `path` imports when it runs (at its top or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_checking_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    imported = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or id(node) in type_checking_only:
            continue
        if node.level == 1 and node.module:  # from .x import y
            imported.add(node.module.split(".")[0])
        elif node.level == 1:  # from . import x, y
            imported.update(alias.name for alias in node.names)
        elif node.module and node.module.startswith("stts_adapter."):
            imported.add(node.module.split(".")[1])
    return imported & modules


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
    files = {p.stem: p for p in CORE.glob("*.py") if p.stem != "__init__"}
    graph = {name: runtime_imports(path, set(files)) for name, path in files.items()}
    assert graph["io"] and "model" not in graph["io"]  # io reads and writes files; it does not build models
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_it_is_shown():
    assert find_cycle({"io": {"model"}, "model": {"io", "scorer"}, "scorer": set()}) == ["io", "model", "io"]
    assert find_cycle({"io": {"scorer"}, "model": {"io", "scorer"}, "scorer": set()}) is None
