"""Building a directory's tree of nodes from its entries, streaming. Pure, no I/O.

The byte format, and what a reader checks, is dirnode.py's; this module
only decides where nodes end. The builder takes entries in name order and
keeps one open node per level, so any directory size works in memory
bounded by ``levels x max_node_bytes``.

A node closes when it is full (``max_node_entries``, or its stored size
would pass ``max_node_bytes``) or after an entry whose keyed hash of
(level, name) hits one in ``max_node_entries // 4``. Those content-defined
boundaries (as in prolly trees) make a node's contents depend on the names
near it, not on how many came before: inserting or removing one name
changes the nodes on its path and rarely a neighbour, where fixed-size
nodes would change every node after it. Changing one entry in place
changes exactly the nodes on its path, ``height + 1`` of them. Nodes are
sealed convergently, so the same entries under the same secret always give
the same root.

All leaves are at the same depth; the last node of a level may have a
single child.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from dht_dfs.core.crypto import PUBLIC_CONVERGENCE_SECRET, SealedChunk
from dht_dfs.core.direntry import MAX_INLINE_SIZE, BuiltDirectory, DirEntry, DirTotals
from dht_dfs.core.dirnode import (
    MAX_HEIGHT,
    MAX_NODE_ENTRIES,
    MAX_NODE_SIZE,
    NODE_OVERHEAD,
    EncodedItem,
    encode_branch,
    encode_entry,
    largest_entry_size,
    seal_node,
)
from dht_dfs.core.refs import ReadReference

DEFAULT_INLINE_LIMIT = 4096
DEFAULT_MAX_NODE_ENTRIES = 2048
DEFAULT_MAX_NODE_BYTES = 512 * 1024
_SPLIT_PERSON = b"dhtfs/dsplit"


@dataclass(slots=True)
class _OpenNode:
    items: list[EncodedItem] = field(default_factory=list)
    size: int = 0
    """Bytes its items add to the stored node."""
    boundary: bool = False
    """The last item hit a content boundary: close before the next one."""


class DirectoryBuilder:
    """Builds one directory's tree from its entries, in name order.

    Feed each entry to ``add`` and store the nodes it returns, then call
    ``finish``: it returns the remaining nodes (the root last) and what the
    parent directory's entry needs (``DirEntry.directory``).
    """

    def __init__(
        self,
        secret: bytes = PUBLIC_CONVERGENCE_SECRET,
        *,
        max_node_entries: int = DEFAULT_MAX_NODE_ENTRIES,
        max_node_bytes: int = DEFAULT_MAX_NODE_BYTES,
        inline_limit: int = DEFAULT_INLINE_LIMIT,
    ) -> None:
        if not 8 <= max_node_entries <= MAX_NODE_ENTRIES:
            # Below 8 a content boundary (one in max/4) would come after
            # nearly every entry, and levels would barely shrink.
            raise ValueError(f"max_node_entries must be between 8 and {MAX_NODE_ENTRIES}")
        if not 0 <= inline_limit <= MAX_INLINE_SIZE:
            raise ValueError(f"inline_limit must be between 0 and {MAX_INLINE_SIZE}")
        # Two of the largest entries must fit in a node, or a level might
        # not shrink as it goes up.
        smallest = NODE_OVERHEAD + 2 * largest_entry_size(inline_limit)
        if not smallest <= max_node_bytes <= MAX_NODE_SIZE:
            raise ValueError(f"max_node_bytes must be between {smallest} and {MAX_NODE_SIZE}")
        self.inline_limit = inline_limit
        """Largest file ``add`` accepts inlined; a publisher inlines files up to this size."""
        self._secret = secret
        self._max_entries = max_node_entries
        self._max_items_size = max_node_bytes - NODE_OVERHEAD
        self._split_one_in = max_node_entries // 4
        # Keyed by the convergence secret: under a private secret, where
        # a node ends says nothing about the names in it.
        self._split_key = hashlib.blake2b(key=secret, digest_size=32, person=_SPLIT_PERSON).digest()
        self._levels: list[_OpenNode] = [_OpenNode()]
        self._last_name: bytes | None = None
        self._entry_count = 0
        self._total_size = 0
        self._finished = False

    def add(self, entry: DirEntry) -> list[SealedChunk]:
        """Record the next entry (names strictly increasing); returns nodes sealed meanwhile."""
        if self._finished:
            raise RuntimeError("directory already finished")
        item = encode_entry(entry)
        if self._last_name is not None and item.first_name <= self._last_name:
            raise ValueError(f"directory entry {entry.name!r} does not sort after the previous one")
        if entry.inline is not None and len(entry.inline) > self.inline_limit:
            raise ValueError(
                f"directory entry {entry.name!r} inlines {len(entry.inline)} bytes, "
                f"more than this builder's inline_limit of {self.inline_limit}"
            )
        sealed: list[SealedChunk] = []
        self._push(0, item, sealed)
        self._last_name = item.first_name
        self._entry_count += 1
        self._total_size += entry.size
        return sealed

    def _is_boundary(self, level: int, name: bytes) -> bool:
        digest = hashlib.blake2b(bytes([level]) + name, key=self._split_key, digest_size=8)
        return int.from_bytes(digest.digest(), "big") % self._split_one_in == 0

    def _push(self, level: int, item: EncodedItem, sealed: list[SealedChunk]) -> None:
        if level == len(self._levels):
            if level > MAX_HEIGHT:
                raise ValueError(
                    f"this directory needs more than {MAX_HEIGHT} levels; raise max_node_entries"
                )
            self._levels.append(_OpenNode())
        node = self._levels[level]
        # Close lazily, when the next item arrives: the last node of a level
        # is then never empty, so ``finish`` never writes a one-child root.
        full = len(node.items) == self._max_entries
        if node.items and (node.boundary or full or node.size + item.size > self._max_items_size):
            self._close(level, sealed)
            node = self._levels[level]
        node.items.append(item)
        node.size += item.size
        # A boundary needs two items, so a closed interior node always
        # has two children or more and the tree converges.
        node.boundary = len(node.items) >= 2 and self._is_boundary(level, item.first_name)

    def _close(self, level: int, sealed: list[SealedChunk]) -> None:
        items = self._levels[level].items
        self._levels[level] = _OpenNode()
        chunk = seal_node(level, items, None, self._secret)
        sealed.append(chunk)
        self._push(level + 1, encode_branch(chunk, items[0].first_name), sealed)

    def finish(self) -> tuple[list[SealedChunk], BuiltDirectory]:
        """Seal what is left; the last node returned is the root."""
        if self._finished:
            raise RuntimeError("directory already finished")
        if self._total_size >= 1 << 64:
            raise ValueError("directory total size does not fit 64 bits")
        self._finished = True
        sealed: list[SealedChunk] = []
        level = 0
        # Every level below the top holds at least one item here (see _push),
        # and closing it may add a level: re-read the height each time.
        while level < len(self._levels) - 1:
            self._close(level, sealed)
            level += 1
        totals = DirTotals(self._entry_count, self._total_size)
        root = seal_node(level, self._levels[level].items, totals, self._secret)
        sealed.append(root)
        reference = ReadReference(root.chunk_id, root.key)
        return sealed, BuiltDirectory(reference, len(root.data), totals)
