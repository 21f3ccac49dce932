"""The package's layering (STYLE §1), checked on every import statement: nothing imports from a higher tier, and
no two folders import each other, directly or through others.

Tiers, lowest first (a module may import its own tier and any lower one):

0. plumbing and math: ``spectral``, ``data``, ``atomic`` (atomic file writes), ``precision``, ``abstain``
1. layers: ``nn``
2. architectures and their files: ``models``
3. certificates and analyses: ``certify`` (certificates and the record format), ``smoothing``, ``curvature``
4. workflows: ``train``, ``workflows`` (certification runs, verification, reports, the demo), ``bench``
5. the command line: ``cli``

Every import counts, also one inside a function (a lazy import hides a dependency, it does not remove it). The
only exceptions are the deprecated aliases that keep old import paths working for one release (listed in
``CHANGELOG.md``): a module whose source says ``DEPRECATED_ALIAS = True``, and the lazy ``__getattr__`` of a
package ``__init__`` that names its aliases in ``_DEPRECATED``.
"""

from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "stablenet"

TIERS = {
    "spectral": 0,
    "data": 0,
    "atomic": 0,
    "precision": 0,
    "abstain": 0,
    "nn": 1,
    "models": 2,
    "certify": 3,
    "smoothing": 3,
    "curvature": 3,
    "train": 4,
    "workflows": 4,
    "bench": 4,
    "cli": 5,
}


def _unit(module: str) -> str | None:
    """The folder (or top-level module) of ``stablenet.x.y``: ``x``; ``None`` for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


@functools.cache
def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _is_alias(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "DEPRECATED_ALIAS" for t in node.targets)
        for node in tree.body
    )


def _imports(path: Path, tree: ast.Module) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every ``stablenet`` import, skipping a package's deprecated ``__getattr__``."""
    skip: set[int] = set()
    if path.name == "__init__.py":
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                skip.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "stablenet":
            found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "stablenet"]
    return found


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    unknown = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        if _is_alias(tree):
            continue
        unit = _unit(name)
        for target, line in _imports(path, tree):
            other = _unit(target)
            if unit is None or other is None or other == unit:
                continue
            if unit not in TIERS or other not in TIERS:
                unknown.append(f"{path.relative_to(SRC.parent)}:{line} ({unit} -> {other})")
            edges[unit].add(other)
            edges.setdefault(f"{unit}->{other}", set()).add(f"{path.relative_to(SRC.parent)}:{line}")
    return edges, unknown


def test_every_folder_has_a_tier():
    _, unknown = _graph()
    assert not unknown, f"folders missing from TIERS: {unknown}"


def test_no_import_from_a_higher_tier():
    edges, _ = _graph()
    upward = [
        f"{a} (tier {TIERS[a]}) imports {b} (tier {TIERS[b]}): {sorted(edges[f'{a}->{b}'])}"
        for a in TIERS
        for b in sorted(edges.get(a, ()))
        if b in TIERS and TIERS[b] > TIERS[a]
    ]
    assert not upward, "\n".join(upward)


def test_no_cycle_between_folders():
    edges, _ = _graph()
    graph = {a: {b for b in edges.get(a, ()) if b in TIERS} for a in TIERS}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"folder cycles: {cycles}"


@functools.cache
def _module_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for m, p in modules.items():
        tree = ast.parse(p.read_text())
        if not _is_alias(tree):
            graph[m] = {t for t, _ in _imports(p, tree) if t in modules and t != m}
    return graph


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_imports_itself_in_a_circle(name):
    """No file circle inside a folder either (a lazy import that hides one included)."""
    modules, graph = _modules(), _module_graph()
    seen, stack = set(), [(name, [name])]
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == name and not (nxt.endswith("__init__") or _is_package(nxt, modules)):
                pytest.fail(f"import circle: {' -> '.join([*path, nxt])}")
            if nxt not in seen and not _is_package(nxt, modules):
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"
