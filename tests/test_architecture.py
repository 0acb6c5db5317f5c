"""The package's shape, read from its imports: no import cycle (type-only and function-level
imports included), and no core module that names a driver technology."""

from __future__ import annotations

import ast
from pathlib import Path

import machinery

SRC = Path(machinery.__file__).resolve().parent
TECHNOLOGIES = ("memory", "sqlite", "redis", "amqp", "sqs", "gcppubsub", "memcache", "mongodb", "dynamodb")


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every machinery module `name` imports, wherever the import stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root, first in edges.items():
        if root in index:
            continue
        work = [(root, iter(sorted(first)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
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
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


def test_no_module_imports_itself_round_a_cycle() -> None:
    edges = graph()
    assert {"machinery.server", "machinery.task", "machinery.worker"} <= set(edges)
    assert cycles(edges) == []


def test_the_cycle_finder_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_core_modules_name_no_driver_technology() -> None:
    """Only the registry and the drivers themselves know a technology by name."""
    edges = graph()
    technology = tuple(f"machinery.drivers.{t}" for t in TECHNOLOGIES)
    offenders = {
        name: sorted(m for m in deps if m.startswith(technology))
        for name, deps in edges.items()
        if not name.startswith(("machinery.drivers.", "machinery.testing"))
    }
    assert {name: deps for name, deps in offenders.items() if deps} == {}


def test_every_package_says_what_it_holds() -> None:
    packages = [path for path in SRC.rglob("__init__.py")]
    assert len(packages) >= 12
    missing = [str(p.relative_to(SRC)) for p in packages if not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []
