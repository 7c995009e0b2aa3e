"""The package's layering, read from the code: import graph, cycles, upward imports, and the picture in the docs.

The layers are listed, bottom first, in docs/architecture.md (the table between the `layers:` markers); a module
may import from its own layer or any layer below. Imports are read with `ast`, at module level and inside
functions (a lazy import is still an arrow); imports under `if TYPE_CHECKING:` are annotations, not arrows.

    python3 scripts/layers.py            # print violations and cycles (exit 1 if any)
    python3 scripts/layers.py --write    # also rewrite the generated picture in docs/architecture.md
    python3 scripts/layers.py --check    # fail when the picture in the docs is not what the code gives
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "thoughtscope"
DOC = ROOT / "docs" / "architecture.md"
TABLE = ("<!-- layers: begin -->", "<!-- layers: end -->")
PICTURE = ("<!-- layers picture: begin (scripts/layers.py --write) -->", "<!-- layers picture: end -->")


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (a `from pkg import name` of a submodule is an arrow to it)."""
    mods = modules(package)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_lines(tree)
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    graph[name].add(sub if sub in mods else target)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names)
        graph[name] = {t for t in graph[name] if t in mods and t != name}
    return graph


def read_layers(doc: Path = DOC) -> list[tuple[str, list[str]]]:
    """(layer name, units) bottom first, from the table in the docs; a unit is a module or a subpackage."""
    text = doc.read_text()
    body = text[text.index(TABLE[0]) + len(TABLE[0]) : text.index(TABLE[1])]
    layers = []
    for row in body.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0] or set(cells[0]) <= set("-: ") or cells[0] == "layer":
            continue
        layers.append((cells[0], [u.strip(" `") for u in cells[1].split(",") if u.strip(" `")]))
    return layers


def unit_of(module: str, layers: list[tuple[str, list[str]]]) -> str | None:
    """The unit listed in the docs that a module belongs to (the longest matching name)."""
    rel = module.removeprefix("thoughtscope").lstrip(".") or "__init__"
    if rel.split(".")[-1] == "__main__" and rel != "__main__":
        rel = "__main__"  # `python -m thoughtscope.x` entry points are the command line's
    best = None
    for _, units in layers:
        for u in units:
            if (rel == u or rel.startswith(u + ".")) and (best is None or len(u) > len(best)):
                best = u
    return best


def check(graph: dict[str, set[str]], layers: list[tuple[str, list[str]]]) -> list[str]:
    """Every problem: a module in no layer, an arrow to a higher layer, a cycle."""
    level = {u: i for i, (_, units) in enumerate(layers) for u in units}
    problems = []
    for m in sorted(graph):
        if unit_of(m, layers) is None:
            problems.append(f"{m} is in no layer of {DOC.name}")
    for m, targets in sorted(graph.items()):
        um = unit_of(m, layers)
        for t in sorted(targets):
            ut = unit_of(t, layers)
            if um and ut and level[ut] > level[um]:
                problems.append(f"upward import: {m} ({layers[level[um]][0]}) imports {t} ({layers[level[ut]][0]})")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def picture(graph: dict[str, set[str]], layers: list[tuple[str, list[str]]]) -> str:
    """A Mermaid flowchart: one box per layer (bottom at the bottom), one arrow per unit-to-unit import."""
    arrows: dict[tuple[str, str], int] = defaultdict(int)
    for m, targets in graph.items():
        for t in targets:
            a, b = unit_of(m, layers), unit_of(t, layers)
            if a and b and a != b:
                arrows[(a, b)] += 1

    def node(u: str) -> str:
        return "u_" + re.sub(r"\W", "_", u)

    lines = ["```mermaid", "flowchart BT"]
    for i, (name, units) in enumerate(layers):
        lines.append(f'  subgraph L{i}["{i} · {name}"]')
        lines += [f'    {node(u)}["{u}"]' for u in units]
        lines.append("  end")
    lines += [f"  {node(a)} --> {node(b)}" for (a, b) in sorted(arrows)]
    lines.append("```")
    return "\n".join(lines)


def _replace_between(text: str, markers: tuple[str, str], new: str) -> str:
    start, end = text.index(markers[0]) + len(markers[0]), text.index(markers[1])
    return text[:start] + "\n" + new + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite the picture in docs/architecture.md")
    ap.add_argument("--check", action="store_true", help="fail when the picture in the docs is stale")
    args = ap.parse_args(argv)
    graph, layers = import_graph(), read_layers()
    problems = check(graph, layers)
    for p in problems:
        print(p)
    text = DOC.read_text()
    fresh = _replace_between(text, PICTURE, picture(graph, layers))
    if args.write and fresh != text:
        DOC.write_text(fresh)
        print(f"wrote the layers picture in {DOC.relative_to(ROOT)}")
    elif args.check and fresh != text:
        print(f"the layers picture in {DOC.relative_to(ROOT)} is stale: run python3 scripts/layers.py --write")
        return 1
    if not problems:
        n = sum(len(t) for t in graph.values())
        print(f"{len(graph)} modules, {n} imports, {len(layers)} layers: no cycle, no upward import")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
