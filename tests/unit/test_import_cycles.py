"""No import cycles among distune's modules: a cycle means two modules are one unit in disguise, and which one
loads first decides whether `from x import y` works.

grimp reads every import statement, those inside functions (and under `if TYPE_CHECKING:`) included: moving an
import into a function hides a cycle from Python, not from this test.
"""

from __future__ import annotations

from collections import deque

import grimp
import pytest


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("distune", cache_dir=None)


def test_no_module_cycles(graph):
    edges = {m: graph.find_modules_directly_imported_by(m) - {m} for m in graph.modules}
    cycles = _cycles(edges)
    assert not cycles, _describe(cycles, edges, lambda a, b: f"{a} (line {_lines(graph, a, b)})")


def test_no_package_cycles(graph):
    """The same with each of distune's packages squashed into one node (distune.data, distune.config, ...)."""
    edges: dict[str, set[str]] = {}
    via: dict[tuple[str, str], list[str]] = {}  # (package, package) -> the module imports behind that edge
    for m in sorted(graph.modules):
        edges.setdefault(_unit(m), set())
        for x in sorted(graph.find_modules_directly_imported_by(m)):
            if _unit(x) != _unit(m):
                edges[_unit(m)].add(_unit(x))
                via.setdefault((_unit(m), _unit(x)), []).append(f"{m} -> {x}")
    cycles = _cycles(edges)
    assert not cycles, _describe(cycles, edges, lambda a, b: f"{a} ({'; '.join(via[a, b])})")


def _unit(module: str) -> str:
    """distune.data.render -> distune.data; distune.cli -> distune.cli."""
    return ".".join(module.split(".")[:2])


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, each sorted, the list sorted."""
    reach = {m: _reachable(edges, m) for m in edges}
    found = {frozenset({m} | {x for x in reach[m] if m in reach[x]}) for m in edges if m in reach[m]}
    return sorted(sorted(c) for c in found)


def _reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(edges.get(start, ()))
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(edges.get(m, ()))
    return seen


def _describe(cycles: list[list[str]], edges: dict[str, set[str]], step) -> str:
    """Each cycle as chains `step(a, b) -> step(b, a) -> a`: shortest loops until every member is on one."""
    out = [f"{len(cycles)} import cycle(s):"]
    for members in cycles:
        out.append(f"  {len(members)} members: {', '.join(members)}")
        covered: set[str] = set()
        for start in members:
            if start not in covered:
                loop = _shortest_loop(edges, start, set(members))
                covered.update(loop)
                steps = [step(a, b) for a, b in zip(loop, loop[1:] + [start])]
                out.append("    " + " -> ".join(steps + [start]))
    return "\n".join(out)


def _shortest_loop(edges: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """[start, ..., last] where last imports start, by breadth-first search inside one component."""
    parent: dict[str, str] = {}
    todo = deque([start])
    while todo:
        m = todo.popleft()
        for x in sorted(edges[m] & within):
            if x == start:
                path = [m]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return path[::-1]
            if x not in parent:
                parent[x] = m
                todo.append(x)
    raise AssertionError(f"{start} is on no loop")


def _lines(graph: grimp.ImportGraph, importer: str, imported: str) -> str:
    """Where `importer` imports `imported`: `12` or `12, 40`."""
    return ", ".join(str(n) for n in sorted({d["line_number"] for d in graph.get_import_details(
        importer=importer, imported=imported)}))
