"""The ``Network`` facade: a node's (or client's) view of the network.

Holds the seams the engines work over (a ``Locator`` for the DHT, a
``Dialer`` for the chunk transport, worker threads, maybe this node's own
store) and offers the operations a node and the CLI need: publish, fetch,
check, repair, and the replica accounting maintenance uses. The work itself
is in ``placement`` (where copies go), ``retrieval`` (where copies come
from) and ``health`` (how many live copies there are).

``dht.node.DhtNode`` and ``transport.endpoint.Endpoint`` are handed in by
``node.node``; nothing here names them.

Must not import: dht (except ``dht.values``), transport, node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import stat
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import TypeVar

from dht_dfs.core.addresses import PeerAddress
from dht_dfs.core.config import Config
from dht_dfs.core.direntry import DirEntry, EntryKind
from dht_dfs.core.errors import ChunkNotFoundError
from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.core.manifest import FileMetadata
from dht_dfs.core.refs import ReadReference, RootHash
from dht_dfs.dht.values import Contact
from dht_dfs.store.chunks import ChunkStore
from dht_dfs.transfer import browse, health, leases, placement
from dht_dfs.transfer.browse import Resolved
from dht_dfs.transfer.fetch import FetchResult, fetch_file
from dht_dfs.transfer.health import CheckReport, ChunkHealth
from dht_dfs.transfer.leases import RenewalReport
from dht_dfs.transfer.nearby import Neighbourhoods
from dht_dfs.transfer.pipeline import ProgressFn
from dht_dfs.transfer.placement import NetworkSink
from dht_dfs.transfer.ports import Dialer, Locator, PeerLink
from dht_dfs.transfer.publish import PublishResult, publish_file, publish_stream
from dht_dfs.transfer.retrieval import NetworkSource, root_not_found
from dht_dfs.transfer.tree import publish_tree
from dht_dfs.transfer.treefetch import TreeFetchResult, fetch_entry

log = logging.getLogger(__name__)

ROOT_CACHE_BYTES = 4 * 1024 * 1024
"""Nodes kept while a fetch resolves its path, so the root is fetched once."""

T = TypeVar("T")


def _is_directory(path: Path) -> bool:
    """A directory itself, not a link to one (publish never follows a link into a tree)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False  # the file engine reports what is wrong with it


class Network:
    """A node's (or client's) view of the network: locator, dialer, maybe a store."""

    def __init__(
        self,
        config: Config,
        locator: Locator,
        dialer: Dialer,
        executor: Executor,
        store: ChunkStore | None = None,
    ) -> None:
        self.config = config
        self.locator = locator
        self.dialer = dialer
        self.executor = executor
        self.store = store
        """This node's own store; None for a short-lived client."""
        # Read once: a fetch compares it per chunk, and it never changes.
        self._node_id = locator.contact.node_id
        self.nearby = Neighbourhoods(locator, config.ksize)
        """Closest nodes of many keys from few lookups, for placing and finding chunks."""

    @property
    def node_id(self) -> NodeId:
        return self._node_id

    async def run(self, func: Callable[..., T], *args: object) -> T:
        """``func(*args)`` in the worker threads (hashing, crypto, file I/O)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, func, *args)

    async def connect(self, address: PeerAddress) -> PeerLink:
        return await self.dialer.connect(address)

    # --- the engines -----------------------------------------------------------------

    async def publish(
        self,
        path: Path,
        *,
        name: str | None = None,
        progress: ProgressFn | None = None,
        convergence_secret: bytes | None = None,
        strict: bool = False,
    ) -> PublishResult:
        """Publish a file or a directory tree; a private ``convergence_secret`` overrides
        the config's. ``strict``: a tree entry that cannot be published fails it."""
        config = self.config
        if convergence_secret is not None:
            config = config.replace(convergence_secret=convergence_secret).validate()
        async with NetworkSink(self) as sink:
            if await self.run(_is_directory, path):
                result = await publish_tree(
                    path, sink, config, executor=self.executor, strict=strict, progress=progress
                )
            else:
                result = await publish_file(
                    path, sink, config, executor=self.executor, name=name, progress=progress
                )
        if sink.under_replicated:
            log.warning(
                "%d chunk(s) of %s have fewer than %d copies; repair will add them "
                "when more nodes are up",
                sink.under_replicated,
                path,
                self.config.replicas,
            )
        return dataclasses.replace(
            result,
            under_replicated=sink.under_replicated,
            copies=sink.placed,
            already_held=sink.held.skipped,
        )

    async def publish_stream(
        self,
        fd: int,
        *,
        name: str,
        progress: ProgressFn | None = None,
        convergence_secret: bytes | None = None,
    ) -> PublishResult:
        """Publish what a pipe gives until its end (``publish -``), as a file called ``name``."""
        config = self.config
        if convergence_secret is not None:
            config = config.replace(convergence_secret=convergence_secret).validate()
        async with NetworkSink(self) as sink:
            result = await publish_stream(
                fd, sink, config, executor=self.executor, name=name, progress=progress
            )
        return dataclasses.replace(
            result,
            under_replicated=sink.under_replicated,
            copies=sink.placed,
            already_held=sink.held.skipped,
        )

    async def fetch(
        self,
        reference: ReadReference,
        *,
        path: Sequence[str] = (),
        output: Path | None = None,
        directory: Path | None = None,
        overwrite: bool = False,
        progress: ProgressFn | None = None,
        on_found: Callable[[str, int, Path], None] | None = None,
        verify_hash: bool | None = None,
    ) -> FetchResult | TreeFetchResult:
        """Fetch what ``REF/PATH`` names: a file, or a directory tree, or a tree's link.

        To ``output`` when given (see ``fetch_entry`` for a directory), else
        under its published name in ``directory`` [the working directory].
        ``on_found(name, total_bytes, target)`` is called before any write.
        """
        source = NetworkSource(self)
        directory = directory if directory is not None else Path.cwd()
        try:
            resolved = await browse.resolve(
                browse.CachingSource(source, ROOT_CACHE_BYTES), reference, path, self.executor
            )
            entry = resolved.entry
            if entry.kind is not EntryKind.FILE or entry.inline is not None:

                def on_plan(target: Path, total: int) -> None:
                    if on_found is not None:
                        on_found(entry.name, total, target)

                return await fetch_entry(
                    entry, source, self.config, executor=self.executor, reference=reference,
                    output=output, directory=directory, overwrite=overwrite, progress=progress,
                    on_plan=on_plan,
                )  # fmt: skip

            def on_metadata(metadata: FileMetadata, target: Path) -> None:
                if on_found is not None:
                    on_found(metadata.name, metadata.size, target)

            assert entry.reference is not None
            result = await fetch_file(
                entry.reference,
                source,
                self.config,
                executor=self.executor,
                output=output if output is not None else directory,
                overwrite=overwrite,
                progress=progress,
                on_metadata=on_metadata,
                verify_hash=verify_hash,
            )
        except ChunkNotFoundError as error:
            raise root_not_found(error, reference.root) from None
        if entry.mtime_ns:  # a file of a tree: its time as published
            times = (entry.mtime_ns, entry.mtime_ns)
            await self.run(functools.partial(os.utime, result.path, ns=times))
        return result

    async def resolve(self, reference: ReadReference, path: Sequence[str]) -> Resolved:
        """The entry ``REF/PATH`` names, from directory nodes alone."""
        try:
            return await browse.resolve(NetworkSource(self), reference, path, self.executor)
        except ChunkNotFoundError as error:
            raise root_not_found(error, reference.root) from None

    def list_directory(self, entry: DirEntry) -> AsyncIterator[DirEntry]:
        """A directory's entries in name order (no file chunk is fetched)."""
        return browse.list_directory(NetworkSource(self), entry, self.executor)

    def stream_file(
        self, entry: DirEntry, *, start: int = 0, stop: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """A file's bytes [start, stop) in order, each chunk verified, a window ahead at most."""
        return browse.stream_file(
            NetworkSource(self), entry, self.config, self.executor, start=start, stop=stop
        )

    async def check(
        self, root: RootHash, progress: ProgressFn | None = None, *, verify: bool = False
    ) -> CheckReport:
        """Count live copies of every chunk of a file: claimed, or with ``verify`` proven."""
        return await health.survey(self, root, repair=False, progress=progress, verify=verify)

    async def repair(
        self, root: RootHash, progress: ProgressFn | None = None, *, verify: bool = False
    ) -> CheckReport:
        """Bring every chunk of a file back to ``replicas`` live (``verify``: proven) copies."""
        return await health.survey(self, root, repair=True, progress=progress, verify=verify)

    async def renew_leases(
        self, root: RootHash, seconds: int, progress: ProgressFn | None = None
    ) -> RenewalReport:
        """Lease every chunk of a file or tree for ``seconds`` on the nodes holding it."""
        return await leases.renew(self, root, seconds, progress=progress)

    # --- replica accounting (see health and placement) --------------------------------

    async def live_holders(self, chunk_ids: Sequence[ChunkId]) -> dict[ChunkId, list[NodeId]]:
        """For each chunk, the live nodes that confirm holding it right now."""
        return await health.live_holders(self, chunk_ids)

    async def ask_have(
        self, asks: Mapping[NodeId, tuple[PeerAddress, list[ChunkId]]]
    ) -> dict[NodeId, list[bool] | None]:
        """Ask each peer, once and all at the same time, which of its chunks it holds."""
        return await health.ask_have(self, asks)

    async def prove_holders(
        self,
        asks: Mapping[NodeId, tuple[PeerAddress, list[ChunkId]]],
        copies: Mapping[ChunkId, bytes | bytearray],
    ) -> dict[NodeId, set[ChunkId]]:
        """Challenge each peer to prove it holds its chunks; the chunks each one proved."""
        return await health.prove_holders(self, asks, copies)

    async def copy_to(
        self,
        chunk_id: ChunkId,
        data: bytes,
        closest: Sequence[Contact],
        candidates: Sequence[Contact],
        wanted: int,
        *,
        lease: int,
    ) -> list[NodeId]:
        """Put ``wanted`` copies on ``candidates`` (kept ``lease`` seconds), then announce
        them to ``closest``."""
        return await placement.copy_to(
            self,
            chunk_id,
            data,
            closest=closest,
            candidates=candidates,
            wanted=wanted,
            lease=lease,
        )

    async def replicate(self, chunk_id: ChunkId, holders: Sequence[NodeId]) -> list[NodeId]:
        """Copy a chunk to the closest live nodes lacking it, up to ``replicas``."""
        return await health.replicate(self, chunk_id, holders)


__all__ = [
    "CheckReport",
    "ChunkHealth",
    "FetchResult",
    "Network",
    "NetworkSink",
    "NetworkSource",
    "PublishResult",
    "RenewalReport",
    "TreeFetchResult",
]
