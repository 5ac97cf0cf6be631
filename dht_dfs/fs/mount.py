"""Running a mount: from a reference and a directory to a live FUSE file system.

``serve_mount`` resolves the reference (its root must be found before
anything is mounted), opens the chunk cache, mounts read-only and serves
until ``stop`` is set (Ctrl-C or SIGTERM in ``dhtfs mount``) or the file
system is unmounted from outside (``dhtfs umount``, ``fusermount3 -u``);
either way it unmounts and returns what it did.

Mount options: ``ro,nosuid,nodev`` (nothing on it can be run set-uid or
opened as a device), ``default_permissions`` (the kernel checks modes),
and ``auto_unmount``: fusermount3 watches the
process and unmounts if it dies, so a crash leaves no dead mount that
blocks the directory. A directory left with a dead mount anyway (a kernel
without it) is cleaned by the next mount, or by ``fusermount3 -u DIR``.

Must not import: node, the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dht_dfs.core.errors import InputError
from dht_dfs.core.refs import ReadReference
from dht_dfs.store.cache import ChunkCache
from dht_dfs.transfer.network import Network

log = logging.getLogger(__name__)

MEMORY_BYTES = 96 * 1024 * 1024
"""Decrypted chunks kept in memory: read-ahead for a few streaming readers."""
_STOP_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class MountOptions:
    cache_dir: Path | None
    """Where fetched chunks are kept across mounts; None: no disk cache."""
    cache_bytes: int
    read_timeout: float = 30.0
    """Seconds a read may wait for a chunk before it fails with EIO."""
    memory_bytes: int = MEMORY_BYTES


@dataclass(frozen=True, slots=True)
class MountStats:
    """What a mount did, reported when it ends."""

    reads: int
    bytes_read: int
    chunks_fetched: int
    """Data chunks fetched from the network."""
    chunks_from_cache: int
    """Data chunks read from the disk cache instead."""
    chunks_unavailable: int
    directories_listed: int
    largest_read: int = 0
    """The largest read the kernel asked for."""

    def to_json(self) -> dict[str, int]:
        return {
            "reads": self.reads,
            "bytes_read": self.bytes_read,
            "chunks_fetched": self.chunks_fetched,
            "chunks_from_cache": self.chunks_from_cache,
            "chunks_unavailable": self.chunks_unavailable,
            "directories_listed": self.directories_listed,
            "largest_read": self.largest_read,
        }


def check_mountpoint(mountpoint: Path) -> Path:
    """The absolute mount point, once it is an empty directory we may use.

    A dead FUSE mount left there (ENOTCONN) is unmounted first.
    """
    path = mountpoint.expanduser().absolute()
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ENOTCONN:
            log.info("%s holds a dead FUSE mount; unmounting it first", path)
            unmount(path)
        elif error.errno == errno.ENOENT:
            raise InputError(f"cannot mount on {mountpoint}: no such directory") from None
        else:
            raise InputError(f"cannot mount on {mountpoint}: {error.strerror}") from None
    if not path.is_dir():
        raise InputError(f"cannot mount on {mountpoint}: not a directory")
    if os.path.ismount(path):
        raise InputError(f"cannot mount on {mountpoint}: something is mounted there already")
    if any(path.iterdir()):
        raise InputError(f"cannot mount on {mountpoint}: the directory is not empty")
    return path


def unmount(mountpoint: Path) -> None:
    """``fusermount3 -u``: a clear error if it is missing or refuses."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise InputError("fusermount3 is not installed (Debian: apt-get install fuse3)")
    done = subprocess.run(
        [tool, "-u", str(mountpoint)], capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        detail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        raise InputError(f"cannot unmount {mountpoint}: {detail}")


async def serve_mount(
    network: Network,
    reference: ReadReference,
    mountpoint: Path,
    options: MountOptions,
    stop: asyncio.Event,
    *,
    path: tuple[str, ...] = (),
    on_ready: Callable[[Path], None] | None = None,
) -> MountStats:
    """Mount ``reference`` read-only on ``mountpoint`` until ``stop`` (see the docstring)."""
    # pyfuse3 is imported here: the rest of dhtfs works on machines without FUSE.
    import pyfuse3  # noqa: PLC0415
    import pyfuse3.asyncio  # noqa: PLC0415

    from dht_dfs.fs.chunks import PlainChunks  # noqa: PLC0415
    from dht_dfs.fs.fuse import MountOperations  # noqa: PLC0415
    from dht_dfs.fs.tree import Tree  # noqa: PLC0415

    target = check_mountpoint(mountpoint)
    cache = None
    if options.cache_dir is not None and options.cache_bytes > 0:
        cache = await asyncio.to_thread(ChunkCache(options.cache_dir, options.cache_bytes).open)
    chunks = PlainChunks(
        network, cache, memory_bytes=options.memory_bytes, timeout=options.read_timeout
    )
    tree = Tree(network, chunks)
    try:
        await tree.mount(reference, path)  # the root must be found before anything is mounted
        operations = MountOperations(tree, block_size=network.config.chunk_size)
        pyfuse3.asyncio.enable()
        fuse_options = {
            "fsname=dhtfs",
            "subtype=dhtfs",
            "ro",
            "nosuid",
            "nodev",
            "default_permissions",
        }
        if shutil.which("fusermount3"):
            fuse_options.add("auto_unmount")
        try:
            pyfuse3.init(operations, str(target), fuse_options)
        except RuntimeError as error:
            raise InputError(f"cannot mount on {mountpoint}: {error}") from None
        main = asyncio.create_task(pyfuse3.main(), name="dhtfs-fuse")
        stopping = asyncio.create_task(stop.wait())
        try:
            if on_ready is not None:
                on_ready(target)
            await asyncio.wait([main, stopping], return_when=asyncio.FIRST_COMPLETED)
            if main.done() and main.exception() is not None:
                raise main.exception()  # type: ignore[misc]
        finally:
            stopping.cancel()
            if not main.done():
                pyfuse3.terminate()
            # Handlers still waiting answer before the session is freed (a
            # late answer on a freed session crashes the process).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_STOP_TIMEOUT):
                    await operations.end_handlers()
            if not main.done():
                with contextlib.suppress(TimeoutError, Exception):
                    async with asyncio.timeout(_STOP_TIMEOUT):
                        await main
            await operations.close()
            # Unmounted in every case: after an unmount from outside this
            # is a no-op, after a failure it is what leaves no dead mount.
            pyfuse3.close(unmount=True)
        return MountStats(
            reads=operations.reads,
            bytes_read=operations.bytes_read,
            chunks_fetched=chunks.fetched,
            chunks_from_cache=chunks.from_disk,
            chunks_unavailable=chunks.unavailable,
            directories_listed=tree.directories_listed,
            largest_read=operations.largest_read,
        )
    finally:
        await tree.close()
        await chunks.close()


__all__ = ["MountOptions", "MountStats", "check_mountpoint", "serve_mount", "unmount"]
