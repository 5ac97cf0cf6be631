"""The mount's inodes: a published tree's entries, numbered as the kernel meets them.

Inode 1 is the mounted root. For a directory reference it is that
directory; for a file reference it is a directory holding just that file,
under its published name. A directory's entries are read from its
directory nodes (never from a file chunk) the first time the kernel looks
inside it, and kept: the tree is immutable, so nothing here is ever stale.
Listing a directory also starts listing its subdirectories (a few at a
time, one level: a recursive reader such as ``ls -lR`` then finds each
next level ready, and a reader of one directory pays for one level more).
Names are bytes as the kernel wants them; a name was checked when its
directory node was decoded (no "/", NUL, "." or "..", at most NAME_MAX),
so none can step outside the mount.

Must not import: pyfuse3, node.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from dht_dfs.core.direntry import DirEntry, EntryKind
from dht_dfs.core.errors import DhtfsError, DirectoryError, InputError
from dht_dfs.core.refs import ReadReference
from dht_dfs.fs.chunks import PlainChunks
from dht_dfs.fs.files import FileView
from dht_dfs.transfer.network import Network

log = logging.getLogger(__name__)

ROOT_INODE = 1
MAX_INODES = 2_000_000
"""Entries a mount numbers at most (about 1 GiB of memory). A published DAG
can list one subtree under many names, so a walk could number far more
entries than are stored; past this, listing fails (EIO) rather than the
machine running out of memory."""
_LISTINGS_AHEAD = 8
_LISTINGS_AHEAD_PER_DIRECTORY = 64
"""Subdirectories of one directory listed ahead at most."""
"""Subdirectories listed in the background at once."""


@dataclass
class Inode:
    number: int
    entry: DirEntry | None
    """None for the directory made up to hold a mounted file (it has no node)."""
    parent: int
    children: dict[bytes, int] | None = None
    """Name -> inode, in name order, once the directory was listed."""
    file: FileView | None = None
    loading: asyncio.Lock = field(default_factory=asyncio.Lock)
    listed_ahead: bool = False
    """Its subdirectories were sent to be listed in the background."""
    names: list[tuple[bytes, int]] | None = None
    """``children`` in order, for readdir's offsets."""

    @property
    def is_directory(self) -> bool:
        return self.entry is None or self.entry.kind is EntryKind.DIRECTORY


class Tree:
    """Inodes of one mounted reference (see the module docstring)."""

    def __init__(
        self, network: Network, chunks: PlainChunks, *, max_inodes: int = MAX_INODES
    ) -> None:
        self._network = network
        self._max_inodes = max_inodes
        self._chunks = chunks
        self._inodes: dict[int, Inode] = {}
        self._next = ROOT_INODE + 1
        self._ahead = asyncio.Semaphore(_LISTINGS_AHEAD)
        self._background: set[asyncio.Task[None]] = set()
        self.directories_listed = 0
        self.total_size = 0
        self.entries = 0

    async def mount(self, reference: ReadReference, path: tuple[str, ...] = ()) -> Inode:
        """Resolve what is mounted (``REF[/PATH]``): the root inode."""
        resolved = await self._network.resolve(reference, path)
        entry = resolved.entry
        if entry.kind is EntryKind.SYMLINK:
            raise InputError(f"{'/'.join(path)} is a symlink: mount its target instead")
        if entry.kind is EntryKind.DIRECTORY:
            root = Inode(ROOT_INODE, entry, ROOT_INODE)
        else:
            root = Inode(ROOT_INODE, None, ROOT_INODE, children={})
            assert root.children is not None
            root.children[_name(entry)] = self._add(entry, ROOT_INODE).number
            root.names = list(root.children.items())
        self._inodes[ROOT_INODE] = root
        self.total_size = entry.size
        return root

    def _add(self, entry: DirEntry, parent: int) -> Inode:
        if len(self._inodes) >= self._max_inodes:
            raise DirectoryError(
                f"the mounted tree has more than {self._max_inodes} entries; "
                "mount a subdirectory (REF/PATH) instead"
            )
        inode = Inode(self._next, entry, parent)
        self._next += 1
        self._inodes[inode.number] = inode
        self.entries += 1
        return inode

    def get(self, number: int) -> Inode | None:
        return self._inodes.get(number)

    async def children(self, inode: Inode, *, ahead: bool = True) -> dict[bytes, int]:
        """The directory's entries (listed from its directory nodes once);
        ``ahead``: list its subdirectories in the background too."""
        if inode.children is None:
            async with inode.loading:
                if inode.children is None:
                    assert inode.entry is not None
                    listed: dict[bytes, int] = {}
                    try:
                        async with asyncio.timeout(self._chunks.timeout):
                            async for entry in self._network.list_directory(inode.entry):
                                listed[_name(entry)] = self._add(entry, inode.number).number
                    except TimeoutError:
                        raise DirectoryError(
                            f"listing {inode.entry.name}: its directory nodes did not come "
                            f"within {self._chunks.timeout:g} s"
                        ) from None
                    inode.names = list(listed.items())
                    inode.children = listed
                    self.directories_listed += 1
        if ahead and not inode.listed_ahead:
            inode.listed_ahead = True
            self._list_ahead(inode.children)
        return inode.children

    def _list_ahead(self, listed: dict[bytes, int]) -> None:
        # Bounded: a hostile tree can list one big directory under many names,
        # and listing ahead must not number its entries for a reader who never
        # looks (what a reader lists is bounded by MAX_INODES).
        if len(self._inodes) > self._max_inodes // 4:
            return
        for number in list(listed.values())[:_LISTINGS_AHEAD_PER_DIRECTORY]:
            child = self._inodes[number]
            if child.is_directory and child.children is None:
                task = asyncio.create_task(self._list_quietly(child))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _list_quietly(self, inode: Inode) -> None:
        async with self._ahead:
            if inode.children is not None:
                return
            try:
                await self.children(inode, ahead=False)
            except DhtfsError as error:
                # Reported by the reader that asks for it, if one does.
                log.debug("listing %s ahead failed: %s", inode.number, error)

    async def close(self) -> None:
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def lookup(self, parent: Inode, name: bytes) -> Inode | None:
        number = (await self.children(parent)).get(name)
        return None if number is None else self._inodes[number]

    def file(self, inode: Inode) -> FileView:
        if inode.file is None:
            assert inode.entry is not None
            inode.file = FileView(self._network, inode.entry, self._chunks)
        return inode.file


def _name(entry: DirEntry) -> bytes:
    return entry.name.encode("utf-8", "surrogateescape")


__all__ = ["ROOT_INODE", "Inode", "Tree"]
