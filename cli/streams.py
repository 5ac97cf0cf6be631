"""Streams on the command line: ``publish -`` from stdin, ``cat`` and ``fetch -o -`` to stdout.

They run in the CLI's own process, as a short-lived client (through the
local node's address when there is one): stdin and stdout belong to this
process, and the node's control socket carries one JSON line per event, no
bytes. Memory stays bounded: a window of chunks, whatever the size.
"""

from __future__ import annotations

import os
import sys

from dht_dfs.core.direntry import DirEntry, EntryKind
from dht_dfs.core.errors import InputError
from dht_dfs.transfer.network import Network


def stdin_for_publish() -> int:
    """stdin's descriptor, refused when it is a terminal (nothing was piped in)."""
    fd = sys.stdin.fileno()
    if os.isatty(fd):
        raise InputError(
            "publish - reads what is piped into it (for example: tar c DIR | dhtfs publish - "
            "--name DIR.tar); stdin is a terminal"
        )
    return fd


def check_streamable(entry: DirEntry, where: str) -> None:
    """Refuse what has no bytes to write: a directory, a link (never followed)."""
    if entry.kind is EntryKind.DIRECTORY:
        raise InputError(
            f"{where} is a directory: it cannot go to stdout; fetch it with -o DIR (or ls it)"
        )
    if entry.kind is EntryKind.SYMLINK:
        raise InputError(f"{where} is a symlink to {entry.target!r}; links are not followed")


async def write_to_stdout(network: Network, entry: DirEntry) -> int:
    """A file's bytes to stdout, each chunk verified first; returns the bytes written.

    A reader that goes away (``head``, ``less``) ends the stream quietly.
    """
    sink = sys.stdout.buffer
    written = 0
    try:
        async for part in network.stream_file(entry):
            sink.write(part)
            written += len(part)
        sink.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's last flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return written


__all__ = ["check_streamable", "stdin_for_publish", "write_to_stdout"]
