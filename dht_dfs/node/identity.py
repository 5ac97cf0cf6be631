"""A node's persistent identity: its Ed25519 key in the data dir.

The key file is created on first use with mode 0600 inside a 0700 data dir.
Like ssh, dhtfs refuses a key file that others may read: whoever reads it
can impersonate the node.

File format (text)::

    dhtfs-ed25519-seed-v1
    <64 hex digits: the 32-byte seed>
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from dht_dfs.core.crypto import Identity
from dht_dfs.core.errors import ConfigError

KEY_FILE = "identity.key"
_HEADER = "dhtfs-ed25519-seed-v1"


def ensure_data_dir(data_dir: Path) -> Path:
    data_dir = Path(data_dir).expanduser()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return data_dir


def load_or_create_identity(data_dir: Path) -> Identity:
    """The node identity stored in ``data_dir``, created if absent."""
    data_dir = ensure_data_dir(data_dir)
    path = data_dir / KEY_FILE
    try:
        return _load(path)
    except FileNotFoundError:
        pass
    identity = Identity.generate()
    text = f"{_HEADER}\n{identity.seed.hex()}\n".encode("ascii")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _load(path)  # another process created it first
    try:
        os.write(fd, text)
        os.fsync(fd)
    finally:
        os.close(fd)
    return identity


def _load(path: Path) -> Identity:
    fd = os.open(path, os.O_RDONLY)
    try:
        mode = os.fstat(fd).st_mode
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"identity key {path} is accessible by other users "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
    lines = raw.decode("ascii", errors="replace").split()
    if len(lines) != 2 or lines[0] != _HEADER:
        raise ConfigError(f"identity key {path} is not a dhtfs key file")
    try:
        seed = bytes.fromhex(lines[1])
        return Identity(seed)
    except ValueError:
        raise ConfigError(f"identity key {path} is damaged") from None
