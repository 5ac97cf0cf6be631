"""A network of real nodes in one process on 127.0.0.1, for integration tests."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dht_dfs.core.config import Config, KiB
from dht_dfs.core.ids import ChunkId
from dht_dfs.node.node import Node
from dht_dfs.node.session import client_network
from dht_dfs.transfer.network import Network

log = logging.getLogger(__name__)

TEST_CONFIG = Config(
    chunk_size=64 * KiB,
    manifest_fanout=16,
    dht_rpc_timeout=0.3,
    dht_lookup_timeout=5.0,
    request_timeout=5.0,
    connect_timeout=2.0,
    handshake_timeout=2.0,
    transfer_window=8,
    workers=2,
    fsync=False,
    repair_interval=0,
    scrub_interval=0,
    leave_timeout=10.0,
)
"""Small chunks (files of a few MB make many chunks) and short timeouts.

No background repair or scrub: tests run those passes themselves, so what
happens when is decided by the test, not by timers.
"""


@dataclass
class Cluster:
    root: Path
    config: Config
    nodes: list[Node | None] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)

    @property
    def live(self) -> list[Node]:
        return [node for node in self.nodes if node is not None]

    @property
    def bootstrap(self) -> list[str]:
        return [f"127.0.0.1:{node.port}" for node in self.live[:2]]

    def data_dir(self, index: int) -> Path:
        return self.root / f"node-{index}"

    async def add(
        self, config: Config | None = None, *, metrics: tuple[str, int] | None = None
    ) -> Node:
        index = len(self.nodes)
        node = Node(
            self.data_dir(index),
            config or self.config,
            host="127.0.0.1",
            port=0,
            bootstrap=self.bootstrap,
            control=False,
            metrics=metrics,
        )
        await node.start()
        self.nodes.append(node)
        self.ports.append(node.port)
        return node

    async def kill(self, index: int) -> None:
        """Stop a node without handing anything off (as a crash would)."""
        node = self.nodes[index]
        assert node is not None
        self.nodes[index] = None
        await node.stop(leave=False)

    async def restart(self, index: int, config: Config | None = None) -> Node:
        assert self.nodes[index] is None
        node = Node(
            self.data_dir(index),
            config or self.config,
            host="127.0.0.1",
            port=self.ports[index],
            bootstrap=self.bootstrap,
            control=False,
        )
        await node.start()
        self.nodes[index] = node
        return node

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[Network]:
        async with client_network(self.config, self.bootstrap) as network:
            yield network

    def holders(self, chunk_id: ChunkId) -> list[int]:
        return [
            index
            for index, node in enumerate(self.nodes)
            if node is not None and node.store is not None and node.store.has(chunk_id)
        ]

    def stored_chunks(self) -> set[ChunkId]:
        ids: set[ChunkId] = set()
        for node in self.live:
            assert node.store is not None
            ids.update(node.store.ids())
        return ids

    async def close(self) -> None:
        for index, node in enumerate(self.nodes):
            if node is not None:
                self.nodes[index] = None
                await node.stop(leave=False)


@contextlib.asynccontextmanager
async def cluster(
    root: Path, size: int, config: Config = TEST_CONFIG, configs: Sequence[Config] = ()
) -> AsyncIterator[Cluster]:
    net = Cluster(root, config)
    try:
        for index in range(size):
            await net.add(configs[index] if index < len(configs) else None)
        yield net
    finally:
        await net.close()
