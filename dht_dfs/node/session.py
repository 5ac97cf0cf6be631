"""Sessions: run operations through the local node, or as a short-lived client.

``open_session(data_dir, bootstrap, config)`` picks one: given bootstrap
addresses it joins the network briefly as a client (``client_network``);
otherwise it talks to the node running with ``data_dir`` over its control
socket. Either way ``session.run(request, on_event)`` returns the same
typed result.

Check a request's input (``request.check_input()``) before opening a
session: joining the network takes seconds, a missing file should not.
``run`` checks again (cheap), so a caller who forgets still gets the error
before any work on the network.

Must not import: node.py, the CLI.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import overload

from dht_dfs.core.config import Config, default_data_dir
from dht_dfs.core.crypto import Identity
from dht_dfs.core.errors import ConfigError
from dht_dfs.dht.node import DhtNode
from dht_dfs.node import control
from dht_dfs.node.operations import (
    CheckRequest,
    FetchRequest,
    PinRequest,
    PinsRequest,
    PublishRequest,
    RepairRequest,
    Request,
    StatusRequest,
    UnpinRequest,
    run_operation,
)
from dht_dfs.node.pins import Pin, PinList, Unpinned
from dht_dfs.node.results import (
    FetchSummary,
    HealthReport,
    NodeStatus,
    OnEvent,
    PublishSummary,
    Result,
)
from dht_dfs.transfer.network import Network
from dht_dfs.transport.endpoint import Endpoint


class Session:
    """Runs requests somewhere: the local node, or this process as a client.

    ``run`` is typed per request (a PublishRequest gives a PublishSummary...);
    each kind of session implements ``_run``.
    """

    @overload
    async def run(
        self, request: PublishRequest, on_event: OnEvent | None = None
    ) -> PublishSummary: ...
    @overload
    async def run(self, request: FetchRequest, on_event: OnEvent | None = None) -> FetchSummary: ...
    @overload
    async def run(
        self, request: CheckRequest | RepairRequest, on_event: OnEvent | None = None
    ) -> HealthReport: ...
    @overload
    async def run(self, request: StatusRequest, on_event: OnEvent | None = None) -> NodeStatus: ...
    @overload
    async def run(self, request: PinRequest, on_event: OnEvent | None = None) -> Pin: ...
    @overload
    async def run(self, request: UnpinRequest, on_event: OnEvent | None = None) -> Unpinned: ...
    @overload
    async def run(self, request: PinsRequest, on_event: OnEvent | None = None) -> PinList: ...
    async def run(self, request: Request, on_event: OnEvent | None = None) -> Result:
        return await self._run(request.check_input(), on_event)

    async def _run(self, request: Request, on_event: OnEvent | None) -> Result:
        raise NotImplementedError


class LocalNodeSession(Session):
    """The node running with a data dir on this machine, through its control socket."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.socket_path = data_dir / control.CONTROL_SOCKET

    async def _run(self, request: Request, on_event: OnEvent | None) -> Result:
        return await control.call(self.socket_path, request, on_event)


class ClientSession(Session):
    """This process, joined to the network as a client for the session's length."""

    def __init__(self, network: Network) -> None:
        self.network = network

    async def _run(self, request: Request, on_event: OnEvent | None) -> Result:
        if isinstance(request, StatusRequest):
            raise ConfigError("status shows a running node: give its --data-dir, not --bootstrap")
        if isinstance(request, PinRequest | UnpinRequest | PinsRequest):
            raise ConfigError(
                f"{request.op}: pins are kept by a running node, which renews their leases; "
                "give its --data-dir, not --bootstrap"
            )
        return await run_operation(self.network, request, on_event)


@contextlib.asynccontextmanager
async def open_session(
    data_dir: Path | None, bootstrap: Sequence[str], config: Config
) -> AsyncIterator[Session]:
    """A client session given ``bootstrap``; else the node running with ``data_dir``.

    ``data_dir`` None means the default (``$DHTFS_DATA_DIR`` or ``~/.dhtfs``).
    """
    if bootstrap:
        async with client_network(config, bootstrap) as network:
            yield ClientSession(network)
    else:
        yield LocalNodeSession((data_dir or default_data_dir()).expanduser())


@contextlib.asynccontextmanager
async def open_network(
    data_dir: Path | None, bootstrap: Sequence[str], config: Config
) -> AsyncIterator[Network]:
    """A client ``Network`` for reading in this process: through ``bootstrap``, or else
    through the node running with ``data_dir``.

    Reads that stream to the caller (``ls``, ``cat``) run here, not in the
    node: the control socket carries one JSON line per event and no flow
    control, the wrong pipe for a file's bytes. Joining through the local
    node costs one status call and a bootstrap off a single contact.
    """
    if not bootstrap:
        directory = (data_dir or default_data_dir()).expanduser()
        status = await LocalNodeSession(directory).run(StatusRequest())
        if status.lease_ttl is not None:
            # What this process stores gets the node's leases, as if the node stored it.
            config = config.replace(lease_ttl=status.lease_ttl)
        host, _, port = status.address.rpartition(":")
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"  # a node bound to every address answers on loopback
        bootstrap = [f"{host}:{port}"]
    async with client_network(config, bootstrap) as network:
        yield network


@contextlib.asynccontextmanager
async def client_network(config: Config, bootstrap: Sequence[str]) -> AsyncIterator[Network]:
    """Join the network briefly as a client (stores nothing, not in routing tables)."""
    if not bootstrap:
        raise ConfigError("a client needs --bootstrap HOST:PORT of a running node")
    identity = Identity.generate()
    executor = ThreadPoolExecutor(config.workers, thread_name_prefix="dhtfs-client")
    endpoint = Endpoint(identity, config, None, client_mode=True)
    dht = DhtNode(identity, config, client_mode=True)
    try:
        await dht.start("0.0.0.0", 0)
        await dht.bootstrap(list(bootstrap))
        yield Network(config, dht, endpoint, executor, None)
    finally:
        await dht.stop()
        await endpoint.close()
        executor.shutdown(wait=False, cancel_futures=True)
