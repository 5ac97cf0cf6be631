"""The transfer layer keeps to its seams: no DHT, transport or node imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dht_dfs.transfer

TRANSFER = Path(dht_dfs.transfer.__file__).parent
FORBIDDEN = ("dht_dfs.dht", "dht_dfs.transport", "dht_dfs.node")
ALLOWED = ("dht_dfs.dht.values",)
"""Pure values another layer owns but transfer may name."""


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted(TRANSFER.glob("*.py")), ids=lambda p: p.name)
def test_transfer_module_imports_only_what_its_layer_allows(path: Path) -> None:
    imported = imported_modules(path)
    assert any(name.startswith("dht_dfs.") for name in imported) or path.name == "__init__.py"
    bad = sorted(
        name for name in imported if name.startswith(FORBIDDEN) and not name.startswith(ALLOWED)
    )
    assert bad == [], f"{path.name} imports {bad}"
