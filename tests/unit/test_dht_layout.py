"""The DHT package's import rules, read from the source (no import runs).

Each module's docstring says what it must not import; these tests hold the
code to it, so a new import across a layer fails here rather than in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "dht_dfs"
DHT = ROOT / "dht"

DHT_IMPORTS_ALLOWED: dict[str, set[str]] = {
    "codec": set(),
    "values": {"codec"},
    "records": {"values"},
    "contacts": {"codec", "values"},
    "lookup": {"values"},
    "compat": {"codec", "values"},
    "protocol": {"codec", "compat", "records", "values"},
    "driver": {"lookup", "protocol", "values"},
    "membership": {"compat", "protocol", "values"},
    "announce": {"protocol", "records", "values"},
    "node": {
        "announce",
        "compat",
        "contacts",
        "driver",
        "lookup",
        "membership",
        "protocol",
        "records",
        "values",
    },
}
"""Which other ``dht`` modules each one may import: lower layers only."""
PURE = {"codec", "values", "records", "contacts", "lookup"}
"""Modules without asyncio: values, codecs and state machines."""


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, by full dotted name."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
    return names


def test_every_dht_module_is_in_the_table() -> None:
    modules = {p.stem for p in DHT.glob("*.py")} - {"__init__"}
    assert modules == set(DHT_IMPORTS_ALLOWED)


def test_compat_is_the_only_importer_of_kademlia_and_rpcudp() -> None:
    importers = {
        str(path.relative_to(ROOT))
        for path in ROOT.rglob("*.py")
        if any(name.split(".")[0] in {"kademlia", "rpcudp"} for name in imported(path))
    }
    assert importers == {"dht/compat.py"}


@pytest.mark.parametrize("module", sorted(DHT_IMPORTS_ALLOWED))
def test_dht_module_imports_only_lower_layers(module: str) -> None:
    names = imported(DHT / f"{module}.py")
    ours = {n for n in names if n.startswith("dht_dfs.")}
    assert {n.split(".")[1] for n in ours} <= {"core", "dht"}
    dht_modules = {n.split(".")[2] for n in ours if n.startswith("dht_dfs.dht.")}
    assert dht_modules <= DHT_IMPORTS_ALLOWED[module]
    if module in PURE:
        assert "asyncio" not in names
