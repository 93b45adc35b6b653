"""The package's modules import each other without cycles, counting imports made inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import textdistill

PACKAGE = Path(textdistill.__file__).parent


def import_graph(folder: Path, package: str = "textdistill") -> dict[str, set[str]]:
    """{module: modules of ``package`` it imports anywhere in its source}, for the modules directly in ``folder``.

    Reads ``from .x import``, ``from . import x``, ``from package.x import``, ``from package import x`` and
    ``import package.x``, at module level or nested in functions (a lazy import closes a cycle all the same)."""
    modules = {path.stem for path in folder.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted(folder.glob("*.py")):
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    parts = node.module.split(".") if node.module else []
                elif node.level == 0 and node.module and node.module.split(".")[0] == package:
                    parts = node.module.split(".")[1:]
                else:
                    continue
                imported |= {parts[0]} if parts else {alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[1] for alias in node.names
                             if alias.name.startswith(package + ".")}
        graph[path.stem] = imported & modules
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None when the graph is acyclic (depth-first search)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if target in path:
                return path[path.index(target):] + [target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_cycle_detector_finds_cycles_and_passes_acyclic_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_reads_lazy_relative_and_absolute_imports(tmp_path):
    (tmp_path / "first.py").write_text("def run():\n    from .second import helper\n    return helper()\n")
    (tmp_path / "second.py").write_text("import textdistill.third\n\n\ndef helper():\n    return 1\n")
    (tmp_path / "third.py").write_text("from textdistill import first\nfrom . import errors\nimport os\n")
    (tmp_path / "errors.py").write_text("")
    graph = import_graph(tmp_path)
    assert graph == {"first": {"second"}, "second": {"third"}, "third": {"first", "errors"}, "errors": set()}
    assert find_cycle(graph) == ["first", "second", "third", "first"]


def test_package_has_no_import_cycles():
    graph = import_graph(PACKAGE)
    assert {"experiment", "less", "training"} <= graph["cli"]      # cli imports lazily: those are read too
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"
