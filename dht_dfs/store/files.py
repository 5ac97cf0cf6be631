"""Writing a file so that a crash at any instant leaves it whole or absent.

Blocking; raises ``OSError`` as the system gives it (the store turns a full
disk into ``StoreFullError``).
"""

from __future__ import annotations

import os
from pathlib import Path


def write_durably(
    tmp: Path, final: Path, data: bytes | bytearray | memoryview, *, fsync: bool = True
) -> None:
    """Write ``data`` to ``tmp`` (created, never reused), fsync it, rename it to
    ``final`` and fsync the directory, so ``final`` is either absent or whole.

    ``final``'s directory must exist; if it vanished under us it is made again.
    """
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, final)
    except FileNotFoundError:  # the fan-out directory was removed under us
        final.parent.mkdir(mode=0o700, exist_ok=True)
        os.replace(tmp, final)
    if fsync:
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


__all__ = ["write_durably"]
