"""The package's imports go one way: no module imports, even lazily inside a function,
a module that imports it back (directly or around a longer circle)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "xcflushd"


def _imports(path: Path) -> set:
    """The xcflushd modules one module imports, wherever the import statement stands."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level == 1:
                out.update(alias.name for alias in node.names)
            elif node.level == 0 and (node.module or "").startswith("xcflushd."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("xcflushd."))
    return out


def graph() -> dict:
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: sorted(_imports(path) & set(modules)) for name, path in modules.items()}


def circles(edges: dict) -> list:
    """Every import circle, found by a depth-first search (each reported once per entry point)."""
    found, done = [], set()

    def visit(node, path):
        if node in path:
            found.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in edges.get(node, ()):
            visit(nxt, path + [node])
        done.add(node)

    for start in sorted(edges):
        visit(start, [])
    return found


def test_the_search_finds_a_circle():
    assert circles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c", "a"]]


def test_the_package_has_no_import_circle():
    edges = graph()
    assert "storage" in edges["heartbeat"]  # the graph does see imports
    assert circles(edges) == []
