"""vmckpt's import graph, read from the code: every import, those inside functions too.

    python3 scripts/import_graph.py [--layers] [REPO]

Prints the import cycles inside ``vmckpt/`` (strongly connected components), the module count,
the largest modules and the longest functions; with ``--layers``, also every import that goes
against docs/ARCHITECTURE.md's layering (exit status 1 if there is a cycle or such an import).
``from pkg import submodule`` counts as an import of the submodule, not of ``pkg/__init__.py``.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

# What a layer must not import (docs/ARCHITECTURE.md): the store knows no wire, session,
# guest or CLI; the wire and the machine know no store.
FORBIDDEN = {
    "vmckpt.images": ("vmckpt.qmp", "vmckpt.stream", "vmckpt.session", "vmckpt.guests",
                      "vmckpt.mechanisms", "vmckpt.cli", "vmckpt.guard"),
    "vmckpt.stream": ("vmckpt.images", "vmckpt.guests", "vmckpt.mechanisms", "vmckpt.cli"),
    "vmckpt.qmp": ("vmckpt.images", "vmckpt.guests", "vmckpt.mechanisms", "vmckpt.cli"),
    "vmckpt.machine": ("vmckpt.images", "vmckpt.session", "vmckpt.guests", "vmckpt.mechanisms",
                       "vmckpt.cli"),
    "vmckpt.guests": ("vmckpt.mechanisms", "vmckpt.cli"),
    "vmckpt.mechanisms": ("vmckpt.cli",),
}  # fmt: skip


def modules(repo: Path) -> dict[str, Path]:
    found = {}
    for path in sorted((repo / "vmckpt").rglob("*.py")):
        name = ".".join(path.relative_to(repo).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The vmckpt modules ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        wanted: list[str] = []
        if isinstance(node, ast.Import):
            wanted = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            subs = [f"{base}.{alias.name}" for alias in node.names]
            wanted = [s for s in subs if s in known]
            if len(wanted) < len(subs):
                wanted.append(base)
        for target in wanted:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
    return targets


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", nargs="?", default=".", type=Path)
    parser.add_argument("--layers", action="store_true", help="check the layering too")
    args = parser.parse_args(argv)
    known = modules(args.repo)
    edges = {name: imports(name, path, known) for name, path in known.items()}
    bad = False
    for component in cycles(edges):
        bad = True
        print(f"cycle of {len(component)}:")
        for member in component:
            print(f"  {member} -> {', '.join(sorted(edges[member] & set(component)))}")
    found = cycles(edges)
    print(f"{len(known)} modules, {len(found)} cycles")
    if args.layers:
        against = [
            (name, target)
            for name in known
            for layer, forbidden in FORBIDDEN.items()
            if name == layer or name.startswith(layer + ".")
            for target in sorted(edges[name])
            if target.startswith(forbidden)
        ]
        for name, target in against:
            print(f"against the layering: {name} imports {target}")
        print(f"{len(against)} imports against the layering")
        bad = bad or bool(against)
    sizes = sorted(((len(p.read_text().splitlines()), n) for n, p in known.items()), reverse=True)
    print("largest modules:", ", ".join(f"{n} {lines}" for lines, n in sizes[:5]))
    functions = []
    for path in known.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                functions.append((length, f"{path}:{node.lineno} {node.name}"))
    functions.sort(reverse=True)
    print("longest functions:", ", ".join(f"{where} {n}" for n, where in functions[:5]))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
