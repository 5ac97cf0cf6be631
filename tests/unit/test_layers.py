"""The package's layers, as its docstrings promise them, checked on the source.

Every ``import`` in dht_dfs/ is read with ``ast`` (including those inside
functions and under ``TYPE_CHECKING``: a dependency is a dependency), and
the graph is checked for the rules in DESIGN's "Layout": arrows point down
the layers, the pure packages reach no asyncio even indirectly, only the
DHT's compat module touches kademlia, and there are no import cycles.
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "dht_dfs"

ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "store": {"core", "store"},
    "wire": {"core", "wire"},
    "transport": {"core", "wire", "transport"},
    "dht": {"core", "dht"},
    "transfer": {"core", "store", "wire", "transfer", "dht.values"},
    "node": {"core", "store", "wire", "transport", "dht", "transfer", "node"},
    "gateway": {"core", "transfer", "gateway", "dht.values"},
    "fs": {"core", "store", "transfer", "fs", "dht.values"},
}
"""Which packages (or single modules) each package may import."""

PURE = ("core", "wire", "store", "dht.codec", "dht.values", "dht.records", "dht.lookup")
"""Packages and modules that must not reach asyncio, directly or through others."""

MAX_LINES = 650


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


@cache
def imports_of(module: str) -> frozenset[str]:
    """Every module ``module`` imports: dht_dfs modules by full name, others by top name."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            found.add(source)
            for alias in node.names:
                # "from dht_dfs import wire" imports the module dht_dfs.wire.
                if f"{source}.{alias.name}" in MODULES:
                    found.add(f"{source}.{alias.name}")
    return frozenset(
        name if name.startswith("dht_dfs") else name.split(".")[0] for name in found if name
    )


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def ours(names: frozenset[str]) -> set[str]:
    return {name for name in names if name in MODULES and name != "dht_dfs"}


def within(module: str, allowed: str) -> bool:
    target = f"dht_dfs.{allowed}"
    return module == target or module.startswith(target + ".")


def test_the_walk_sees_the_package() -> None:
    assert {"dht_dfs.core.ids", "dht_dfs.wire.connection", "dht_dfs.node.node"} <= set(MODULES)
    assert "dht_dfs.core.errors" in imports_of("dht_dfs.wire.connection")
    assert "asyncio" in imports_of("dht_dfs.transport.connection")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m)))
def test_imports_point_down_the_layers(module: str) -> None:
    layer = layer_of(module)
    allowed = ALLOWED[layer]
    wrong = sorted(
        target for target in ours(imports_of(module)) if not any(within(target, a) for a in allowed)
    )
    assert not wrong, f"{module} ({layer}) may not import {wrong}"


def reachable(module: str) -> set[str]:
    seen: set[str] = set()
    stack = [module]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        stack.extend(ours(imports_of(current)))
    return seen


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if any(within(m, pure) for pure in PURE))
)
def test_pure_modules_reach_no_asyncio(module: str) -> None:
    offenders = sorted(m for m in reachable(module) if "asyncio" in imports_of(m))
    assert not offenders, f"{module} reaches asyncio through {offenders}"


def test_only_the_compat_module_imports_kademlia() -> None:
    importers = sorted(m for m in MODULES if {"kademlia", "rpcudp"} & imports_of(m))
    assert importers == ["dht_dfs.dht.compat"]


def test_the_library_never_imports_the_cli() -> None:
    assert not [m for m in MODULES if {"dhtfs_cli", "typer", "rich"} & imports_of(m)]


def test_no_import_cycles() -> None:
    # Tarjan's strongly connected components over our own modules.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(MODULES)))

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in ours(imports_of(module)):
            # A package's __init__ that re-exports its own modules is not a cycle.
            if target.startswith(module + "."):
                continue
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in MODULES:
        if module not in index:
            visit(module)
    assert not cycles


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_a_monolith(module: str) -> None:
    lines = MODULES[module].read_text().count("\n")
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it by job"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_says_what_it_owns(module: str) -> None:
    path = MODULES[module]
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring, f"{module} has no docstring"
    if path.name == "__init__.py" and module != "dht_dfs":
        assert "must not import" in docstring.lower(), (
            f"{module} does not say what it must not import"
        )


def test_every_package_is_installed() -> None:
    """A package missing from pyproject's list works from the source tree and
    fails once installed (as ``dhtfs gateway`` once did)."""
    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    found = {
        ".".join(path.parent.relative_to(PACKAGE.parent).parts)
        for path in PACKAGE.rglob("__init__.py")
    }
    assert found <= listed, f"not in pyproject's packages: {sorted(found - listed)}"
