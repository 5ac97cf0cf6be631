"""Helpers for the DHT integration tests: networks of DhtNodes on 127.0.0.1,
a raw UDP peer that speaks (or abuses) the wire format, a settable clock, and a
recorder of event-loop exception reports."""

from __future__ import annotations

import asyncio
import os
import time
import typing
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from dht_dfs.core.config import Config
from dht_dfs.core.crypto import Identity
from dht_dfs.core.errors import RemoteProtocolError
from dht_dfs.core.ids import NodeId
from dht_dfs.dht.codec import FLAG_CLIENT, KIND_REPLY, decode_datagram, encode_request
from dht_dfs.dht.node import DhtNode
from dht_dfs.dht.values import Address

LOCALHOST = "127.0.0.1"
WAIT = 10.0
"""Upper bound on any single wait in these tests (they normally take far less)."""


class FakeClock:
    """A unix clock that moves only when told to."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def start_node(config: Config, **kwargs: Any) -> DhtNode:
    node = DhtNode(Identity.generate(), config, **kwargs)
    await node.start(LOCALHOST, 0)
    return node


async def settle(nodes: Sequence[DhtNode]) -> None:
    """Wait until no node has identity checks or record pushes in flight.

    A push can start another node's identity check, so a few passes may be needed;
    the pass count and each wait are bounded.
    """
    for _ in range(10):
        if not any(node.busy() for node in nodes if node.running):
            return
        await asyncio.gather(*(node.settled(WAIT) for node in nodes if node.running))
    raise AssertionError("the DHT did not settle")


@asynccontextmanager
async def dht_network(
    count: int,
    config: Config,
    *,
    batch: int = 8,
    node_kwargs: Callable[[int], dict[str, Any]] | None = None,
) -> AsyncIterator[list[DhtNode]]:
    """``count`` started, bootstrapped and settled nodes; all stopped on exit."""
    nodes: list[DhtNode] = []
    try:
        for index in range(count):
            nodes.append(await start_node(config, **(node_kwargs(index) if node_kwargs else {})))
        seed = (LOCALHOST, nodes[0].port)
        for first in range(1, count, batch):
            group = nodes[first : first + batch]
            await asyncio.gather(*(node.bootstrap([seed]) for node in group))
        await settle(nodes)
        yield nodes
    finally:
        await asyncio.gather(*(node.stop() for node in nodes))


class RawPeer(asyncio.DatagramProtocol):
    """A bare UDP socket for sending hand-made datagrams and reading replies."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.received: list[tuple[bytes, Address]] = []
        self._arrived = asyncio.Event()
        self.identity = Identity.generate()
        self.closed = asyncio.Event()

    @classmethod
    @asynccontextmanager
    async def open(cls) -> AsyncIterator[RawPeer]:
        loop = asyncio.get_running_loop()
        _transport, peer = await loop.create_datagram_endpoint(cls, local_addr=(LOCALHOST, 0))
        try:
            yield peer
        finally:
            assert peer.transport is not None
            peer.transport.close()
            await asyncio.wait_for(peer.closed.wait(), WAIT)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append((data, (addr[0], addr[1])))
        self._arrived.set()

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def header(self, *, client: bool = True, node_id: NodeId | None = None) -> list[object]:
        """Our sender header; client mode by default, so nodes do not ping us back."""
        own = node_id or self.identity.node_id
        return [own.digest, 0 if client else self.port, FLAG_CLIENT if client else 0]

    def send(self, data: bytes, address: Address) -> None:
        assert self.transport is not None
        self.transport.sendto(data, address)

    def send_request(self, address: Address, name: str, args: Sequence[object]) -> bytes:
        message_id = os.urandom(20)
        self.send(encode_request(message_id, name, args), address)
        return message_id

    def reply_to(self, message_id: bytes) -> bytes | None:
        for data, _address in self.received:
            if data[:1] == bytes([KIND_REPLY]) and data[1:21] == message_id:
                return data
        return None

    async def wait_reply(self, message_id: bytes, within: float = WAIT) -> bytes:
        async with asyncio.timeout(within):
            # Bounded by the timeout; each round waits for a new datagram.
            while (reply := self.reply_to(message_id)) is None:
                self._arrived.clear()
                await self._arrived.wait()
        return reply

    async def wait_datagram(self, within: float = WAIT) -> tuple[bytes, Address]:
        """The first datagram received (waiting for it if none came yet)."""
        async with asyncio.timeout(within):
            # Bounded by the timeout; each round waits for a new datagram.
            while not self.received:
                self._arrived.clear()
                await self._arrived.wait()
        return self.received[0]

    async def request(
        self, address: Address, name: str, args: Sequence[object], within: float = WAIT
    ) -> Any:
        """Send a request and return the decoded reply body."""
        message_id = self.send_request(address, name, args)
        return decode_datagram(await self.wait_reply(message_id, within)).body

    async def ping_ours(self, address: Address) -> Any:
        """A valid client-mode ping to a DhtNode (proves it still answers)."""
        return await self.request(address, "ping", [self.header(), os.urandom(20)])


def reply_size_ok(data: bytes, limit: int) -> bool:
    try:
        decode_datagram(data)
    except RemoteProtocolError:
        return False
    return len(data) <= limit


@contextmanager
def loop_exception_reports() -> Any:
    """Collect what the running loop's exception handler receives.

    A task that ends with an exception nobody retrieved is reported here (when it
    is garbage-collected), as is an exception raised in a callback.
    """
    loop = asyncio.get_running_loop()
    reports: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reports.append(context))
    try:
        yield reports
    finally:
        loop.set_exception_handler(previous)
