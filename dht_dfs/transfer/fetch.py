"""The fetch engine: get, verify, decrypt and write a file's chunks from a ``ChunkSource``.

``fetch_file`` builds a ``FileFetch`` and runs it. The steps, in order:

1. ``open``: read the root, pick the output path, open ``<output>.dhtfs-part``
   and check that the file fits in the free space.
2. ``run``: walk the leaves with ``transfer_window`` chunks in flight; for
   each, ``resume_check`` (a part file left by an earlier try may hold it
   already: re-encrypting the region gives its id) or a fetch whose worker
   call is ``write_chunk`` (check, decrypt into a per-thread buffer, write
   at the offset: one thread hop per chunk).
3. ``finish``: compare the optional whole-file hash, fsync, set the mode,
   rename the part file over the output.

Decryption happens here, at the edge: a source only moves sealed bytes.

Nothing the publisher chose may harm the fetcher's machine: the part file is
created exclusively and never through a symbolic link (one planted at its
name in a shared directory such as /tmp would otherwise aim our writes at
the link's target), and a resumed part must be a regular file of ours; the
final rename replaces a link at the output, never writes through it, and
needs ``overwrite`` for anything there; the mode is the published permission
bits under the fetcher's umask, without setuid, setgid or sticky; a
published name that would be hidden or read as an option is refused unless
the caller names the output.

Must not import: dht, transport, node, or the network side of transfer.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from dht_dfs.core.config import Config, format_size
from dht_dfs.core.crypto import decrypt_into, encrypt_with_key
from dht_dfs.core.errors import (
    ChunkNotFoundError,
    DhtfsError,
    InputError,
    IntegrityError,
    ManifestError,
    OutputError,
)
from dht_dfs.core.ids import ChunkId
from dht_dfs.core.manifest import FileMetadata, OpenedNode
from dht_dfs.core.refs import ReadReference
from dht_dfs.transfer.pipeline import InOrderHasher, ProgressFn, first_error
from dht_dfs.transfer.ports import ChunkSource
from dht_dfs.transfer.walk import LeafChunk, open_root, walk_leaves

PART_SUFFIX = ".dhtfs-part"

MetadataFn = Callable[[FileMetadata, Path], Awaitable[None] | None]
"""Called once the file's metadata and output path are known, before any chunk."""


@dataclass(frozen=True, slots=True)
class FetchResult:
    path: Path
    size: int
    chunks: int
    chunks_fetched: int
    """Chunks downloaded in this run (the rest were already in a partial file)."""
    chunks_resumed: int
    seconds: float
    metadata: FileMetadata


def safe_file_name(name: str, fallback: str) -> str:
    """A publisher-chosen name made safe to create in a directory."""
    cleaned = name.replace("\x00", "").strip()
    if not cleaned or cleaned in (".", "..") or "/" in cleaned or "\\" in cleaned:
        return fallback
    return cleaned


def resolve_output(name: str, reference: ReadReference, output: Path | None) -> Path:
    """The file to write: ``output`` itself, or the published ``name`` in it (or here).

    Raises InputError for a published name that would land as a dotfile
    (``.bashrc`` in a home directory) or read as an option (``-rf``) when
    the caller did not name the output file.
    """
    if output is not None and not output.is_dir():
        return output
    fallback = f"dhtfs-{reference.root.hex()[:16]}"
    name = safe_file_name(name, fallback)
    if name.startswith((".", "-")):
        what = "be hidden" if name.startswith(".") else "read as an option"
        raise InputError(
            f"the published name '{name}' would {what}; "
            "choose the output file with -o NAME (or -o DIR/NAME)"
        )
    return (output if output is not None else Path.cwd()) / name


async def fetch_file(
    reference: ReadReference,
    source: ChunkSource,
    config: Config,
    *,
    executor: Executor,
    output: Path | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    on_metadata: MetadataFn | None = None,
    verify_hash: bool | None = None,
) -> FetchResult:
    """Fetch, verify and decrypt a file, writing each chunk at its offset.

    Every chunk is checked against its id (SHA-256 of its ciphertext, listed
    in the authenticated manifest) and its AEGIS tag before it is written.
    With ``verify_hash`` (default: ``config.verify_file_hash``) the whole
    file's SHA-256 is also recomputed and compared with the manifest's; that
    catches nothing the chunk checks miss unless dhtfs itself has a bug, and
    costs ~0.6 CPU-seconds per GiB.

    Writes into ``<output>.dhtfs-part`` and renames it when all is well. If
    a part file is already there, chunks it holds intact (re-encrypting them
    gives their id) are not fetched again. Memory is bounded by
    ``transfer_window`` chunks.
    """
    fetch = FileFetch(
        reference,
        source,
        config,
        executor=executor,
        output=output,
        overwrite=overwrite,
        progress=progress,
        on_metadata=on_metadata,
        verify_hash=config.verify_file_hash if verify_hash is None else verify_hash,
    )
    return await fetch.run()


class FileFetch:
    """One fetch of one file into its part file (see the module docstring for the steps)."""

    def __init__(
        self,
        reference: ReadReference,
        source: ChunkSource,
        config: Config,
        *,
        executor: Executor,
        output: Path | None,
        overwrite: bool,
        progress: ProgressFn | None,
        on_metadata: MetadataFn | None,
        verify_hash: bool,
        durable: bool = True,
        expected_size: int | None = None,
    ) -> None:
        """``durable`` False: no fsync of this file (a tree fetch syncs once at the end).
        ``expected_size``: what a directory entry says; a manifest that disagrees is refused."""
        self._reference = reference
        self._durable = durable
        self._expected_size = expected_size
        self._source = source
        self._config = config
        self._executor = executor
        self._output = output
        self._overwrite = overwrite
        self._progress = progress
        self._on_metadata = on_metadata
        self._verify_hash = verify_hash
        # Set by open():
        self._root: OpenedNode | None = None
        self._metadata: FileMetadata | None = None
        self.target = Path()
        self._part = Path()
        self._fd = -1
        self._size = 0
        self._resuming = False
        # Progress of run():
        self._window = asyncio.Semaphore(config.transfer_window)
        self._hasher: InOrderHasher | None = None
        self._ready: dict[int, bytes] = {}
        """Chunks written but not yet hashed, waiting for those before them (by index)."""
        self._next_to_hash = 0
        self._digest: bytes | None = None
        """The whole file's SHA-256 as fetched, when ``verify_hash`` asked for it."""
        self._done_bytes = 0
        self.chunks = 0
        self.fetched = 0
        self.resumed = 0

    async def run(self) -> FetchResult:
        started = time.monotonic()
        metadata = await self.open()
        try:
            self._prepare_part()
            await self._fetch_all()
            await self.finish()
        except ChunkNotFoundError as error:
            # The root was there, so this is a lost chunk of the file: what
            # came is kept, and a later run fetches only the rest.
            raise ChunkNotFoundError(
                f"{error}; what was fetched ({format_size(self._done_bytes)} of "
                f"{format_size(self._size)}) is kept in {self._part}: run the same "
                "command again to resume",
                error.chunk_hex,
            ) from None
        finally:
            os.close(self._fd)
        # Checked again: something may have appeared during the download.
        # rename() replaces a symbolic link itself, never what it points to.
        if _anything_at(self.target) and not self._overwrite:
            raise _exists_error(self.target)
        try:
            os.replace(self._part, self.target)
        except OSError as exc:
            raise _output_error(self.target, exc) from None
        return FetchResult(
            self.target,
            self._size,
            self.chunks,
            self.fetched,
            self.resumed,
            time.monotonic() - started,
            metadata,
        )

    # --- the steps ---------------------------------------------------------------------

    async def open(self) -> FileMetadata:
        """Read the root, choose the output path, open the part file."""
        self._root = await open_root(self._source, self._reference, self._executor)
        metadata = self._root.metadata
        assert metadata is not None
        self._metadata = metadata
        self._size = metadata.size
        if self._expected_size is not None and metadata.size != self._expected_size:
            raise ManifestError(
                f"{self._reference.root.hex()}: its directory says {self._expected_size} bytes, "
                f"its manifest {metadata.size}"
            )
        self.target = resolve_output(metadata.name, self._reference, self._output)
        if _anything_at(self.target) and not self._overwrite:
            raise _exists_error(self.target)
        if self._on_metadata is not None:
            maybe = self._on_metadata(metadata, self.target)
            if maybe is not None:
                await maybe
        self._part = self.target.with_name(self.target.name + PART_SUFFIX)
        self._fd, created = _open_part(self._part)
        try:
            self._check_free_space()
        except OutputError:
            os.close(self._fd)
            self._fd = -1
            if created:
                os.unlink(self._part)
            raise
        return metadata

    def _check_free_space(self) -> None:
        """Refuse a file that cannot fit, before writing any of it.

        The declared size is the publisher's claim; the shape checks make
        the tree agree with it, and this makes it agree with the disk. What
        a resumed part already holds (its allocated blocks) is not needed
        again.
        """
        held = os.fstat(self._fd)
        already = min(held.st_size, held.st_blocks * 512)
        needed = max(0, self._size - already)
        directory = self._part.parent
        try:
            space = os.statvfs(directory)
        except OSError:
            return  # no figure to compare with; a full disk still fails the write cleanly
        available = space.f_bavail * space.f_frsize
        if needed > available:
            raise OutputError(
                f"not enough free space in {directory} for {self.target.name}: the file needs "
                f"{needed} bytes ({format_size(needed)}), {available} bytes "
                f"({format_size(available)}) are available"
            )

    def _prepare_part(self) -> None:
        self._resuming = os.fstat(self._fd).st_size > 0
        try:
            os.ftruncate(self._fd, self._size)
        except OSError as exc:
            raise _output_error(self._part, exc) from None

    def resume_check(self, leaf: LeafChunk) -> bytes | None:
        """In a worker: the chunk's plaintext if the part file already holds it intact."""
        fd = self._fd
        if not _region_has_data(fd, leaf.offset, leaf.entry.plain_size):
            return None
        plain = os.pread(fd, leaf.entry.plain_size, leaf.offset)
        if len(plain) != leaf.entry.plain_size:
            return None
        if ChunkId.of(encrypt_with_key(plain, leaf.key)) != leaf.entry.chunk_id:
            return None
        return plain

    def write_chunk(self, leaf: LeafChunk, data: bytes | bytearray) -> bytes | int:
        """In a worker: check, decrypt into this thread's buffer, write at the offset.

        Returns the plaintext when the whole-file hash needs it, else its length.
        """
        chunk_id = leaf.entry.chunk_id
        if len(data) != leaf.entry.stored_size or not chunk_id.matches(data):
            raise IntegrityError(f"chunk {chunk_id.hex()} is corrupt", chunk_id.hex())
        buffer = _thread_buffer(leaf.entry.plain_size)
        length = decrypt_into(data, leaf.key, buffer, chunk_id)
        if length != leaf.entry.plain_size:
            raise ManifestError(f"chunk {chunk_id.hex()} size disagrees with its manifest")
        view = memoryview(buffer)[:length]
        position = leaf.offset
        try:
            while view:
                written = os.pwrite(self._fd, view, position)
                view = view[written:]
                position += written
        except OSError as exc:
            raise _output_error(self._part, exc) from None
        return bytes(buffer[:length]) if self._verify_hash else length

    async def finish(self) -> None:
        """Check the whole-file hash (if asked for), then make the part file durable."""
        metadata = self._metadata
        assert metadata is not None
        if self._digest is not None and self._digest != metadata.plain_sha256:
            raise IntegrityError(
                f"file assembled from {self._reference.root.hex()} does not match its "
                "recorded SHA-256; the partial file is kept for inspection"
            )
        loop = asyncio.get_running_loop()
        try:
            if self._durable:
                await loop.run_in_executor(self._executor, os.fsync, self._fd)
            # Permission bits only: a publisher sets no setuid, setgid or
            # sticky bit, nor anything the fetcher's umask forbids.
            os.fchmod(self._fd, (metadata.mode & 0o777 or 0o644) & ~current_umask())
        except OSError as exc:
            raise _output_error(self._part, exc) from None

    # --- the pipeline ------------------------------------------------------------------

    async def _fetch_all(self) -> None:
        assert self._root is not None
        root_hex = self._reference.root.hex()
        size = self._size
        expected_offset = 0
        if self._verify_hash:
            self._hasher = InOrderHasher(self._config.transfer_window)
        try:
            async with asyncio.TaskGroup() as group:
                async for leaf in walk_leaves(self._source, self._root, self._executor):
                    if leaf.offset != expected_offset or leaf.offset + leaf.entry.plain_size > size:
                        raise ManifestError(
                            f"manifest of {root_hex} does not add up to the file size"
                        )
                    expected_offset += leaf.entry.plain_size
                    self.chunks += 1
                    await self._window.acquire()
                    group.create_task(self._fetch_one(leaf))
            if expected_offset != size:
                raise ManifestError(
                    f"manifest of {root_hex} covers {expected_offset} bytes, the file has {size}"
                )
            if self._hasher is not None:
                self._digest = await self._hasher.digest()
        except* DhtfsError as group_error:
            raise first_error(group_error) from None
        finally:
            if self._hasher is not None:
                self._hasher.close()

    async def _fetch_one(self, leaf: LeafChunk) -> None:
        result: bytes | int | None = None
        if self._resuming:
            result = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.resume_check, leaf
            )
        if result is not None:
            self.resumed += 1
        else:
            result = await self._source.fetch(
                leaf.entry.chunk_id,
                leaf.entry.stored_size,
                functools.partial(self.write_chunk, leaf),
            )
            self.fetched += 1
        if self._hasher is None:
            self._chunk_done(result if isinstance(result, int) else len(result))
        else:
            assert isinstance(result, bytes)
            self._ready[leaf.index] = result
            await self._hash_in_order()

    async def _hash_in_order(self) -> None:
        # The whole-file hash needs the chunks in file order: finished ones
        # wait here, holding their window slot, until their turn.
        assert self._hasher is not None
        while self._next_to_hash in self._ready:
            plain = self._ready.pop(self._next_to_hash)
            await self._hasher.update(plain)
            self._next_to_hash += 1
            self._chunk_done(len(plain))

    def _chunk_done(self, length: int) -> None:
        self._done_bytes += length
        self._window.release()
        if self._progress is not None:
            self._progress(self._done_bytes, self._size)


def _anything_at(path: Path) -> bool:
    """True if a name exists, even as a dangling symbolic link (``exists`` says no)."""
    return os.path.lexists(path)


def _exists_error(target: Path) -> InputError:
    return InputError(f"{target} already exists; fetch to another path or overwrite it (--force)")


def _open_part(part: Path) -> tuple[int, bool]:
    """Open the part file for writing: (descriptor, whether this call created it).

    A new part is created exclusively (O_EXCL also refuses a symbolic link
    at the name); an existing one is reopened only without following a
    link, and only if it is a regular file of ours with one name, since a
    part left by an earlier try is the only thing worth resuming.
    """
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(part, flags | os.O_CREAT | os.O_EXCL, 0o600), True
    except FileExistsError:
        pass
    except OSError as exc:
        raise OutputError(f"cannot write {part}: {exc.strerror}") from None
    refusal = (
        f"{part} is in the way and is not a partial fetch of yours (a regular file you own); "
        "remove it and fetch again"
    )
    try:
        fd = os.open(part, flags | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise OutputError(refusal) from None
        raise OutputError(f"cannot write {part}: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_nlink != 1:
        os.close(fd)
        raise OutputError(refusal)
    return fd, False


def current_umask() -> int:
    """The process umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # os.umask can only be read by setting it. Set the strictest mask
    # meanwhile, so a file another thread creates in that instant gets
    # fewer permissions, never more.
    previous = os.umask(0o077)
    os.umask(previous)
    return previous


def _output_error(path: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc)
    return OutputError(
        f"cannot write {path}: {reason}; the partial file is kept, "
        "fetch again to resume once this is fixed"
    )


_buffers = threading.local()


def _thread_buffer(size: int) -> bytearray:
    """A reusable per-thread buffer of at least ``size`` bytes (no churn of fresh pages)."""
    buffer: bytearray | None = getattr(_buffers, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = bytearray(size)
        _buffers.buffer = buffer
    return buffer


def _region_has_data(fd: int, offset: int, length: int) -> bool:
    """False when [offset, offset+length) is a hole: nothing was written there."""
    if length == 0:
        return True
    try:
        data_at = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError:
        return False  # ENXIO: only a hole remains after offset
    return data_at < offset + length


__all__ = [
    "PART_SUFFIX",
    "FetchResult",
    "FileFetch",
    "current_umask",
    "fetch_file",
    "resolve_output",
]
