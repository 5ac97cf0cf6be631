"""The one table from an error to the CLI's exit code."""

from __future__ import annotations

import pytest
from dhtfs_cli.exits import exit_code

from dht_dfs.core import errors

USAGE = {"InputError", "ConfigError", "InvalidReferenceError"}


@pytest.mark.parametrize(
    "kind",
    [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, errors.DhtfsError)
    ],
)
def test_every_library_error_has_its_exit_code(kind: type[errors.DhtfsError]) -> None:
    error = kind.__new__(kind)
    expected = 2 if any(k.__name__ in USAGE for k in kind.__mro__) else 1
    assert exit_code(error) == expected


def test_interrupted_and_unknown_errors() -> None:
    assert exit_code(KeyboardInterrupt()) == 130
    assert exit_code(OSError("disk on fire")) == 1
    assert exit_code(RuntimeError("a bug")) == 1
