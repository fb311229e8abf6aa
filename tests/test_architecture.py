"""docs/ARCHITECTURE.md's layering, from the code's own imports (scripts/import_graph.py):
no import cycle inside vmckpt/ (imports inside functions count), no import against the layers,
no module over 1,000 lines and no function over 120."""

from __future__ import annotations

import ast
from pathlib import Path

from scripts.import_graph import FORBIDDEN, cycles, imports, modules

REPO = Path(__file__).resolve().parent.parent


def test_no_import_cycle_and_none_against_the_layers() -> None:
    known = modules(REPO)
    edges = {name: imports(name, path, known) for name, path in known.items()}
    assert cycles(edges) == []
    against = [
        (name, target)
        for name in known
        for layer, forbidden in FORBIDDEN.items()
        if name == layer or name.startswith(layer + ".")
        for target in edges[name]
        if target.startswith(forbidden)
    ]
    assert against == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_over_1000_lines_and_no_function_over_120() -> None:
    too_long = []
    for path in modules(REPO).values():
        text = path.read_text()
        if len(text.splitlines()) > 1000:
            too_long.append(f"{path}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 120:
                    too_long.append(f"{path}:{node.lineno} {node.name}: {length} lines")
    assert too_long == []
