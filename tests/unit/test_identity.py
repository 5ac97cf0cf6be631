"""The node key in the data dir."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dht_dfs.core.errors import ConfigError
from dht_dfs.node.identity import KEY_FILE, load_or_create_identity


def test_key_is_created_private_and_reloaded(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path / "node")
    key_file = tmp_path / "node" / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "node").stat().st_mode) == 0o700
    assert load_or_create_identity(tmp_path / "node").node_id == first.node_id


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path)
    os.chmod(tmp_path / KEY_FILE, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_identity(tmp_path)


def test_damaged_key_file_is_reported(tmp_path: Path) -> None:
    key_file = tmp_path / KEY_FILE
    key_file.write_text("something else\n")
    key_file.chmod(0o600)
    with pytest.raises(ConfigError, match="not a dhtfs key file"):
        load_or_create_identity(tmp_path)
