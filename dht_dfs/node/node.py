"""A running node: chunk store + TCP endpoint + DHT + maintenance, one port.

The DHT (UDP) and the chunk transport (TCP) listen on the same port number,
so a node is named by one ``HOST:PORT``. A node owns its data dir while it
runs (an flock on ``node.lock``), so two nodes never share a store by
mistake; the data dir holds::

    identity.key        Ed25519 seed, mode 0600
    store/              chunk files and their SQLite index (store.py)
    pins.sqlite         what this node published and pins (pins.py), 0600
    dht-contacts.json   routing table, to rejoin without a bootstrap node
    control.sock        local control endpoint for the CLI (control.py), 0600
    node.lock           held while the node runs

The node is the control socket's ``ControlHandler``: it answers status and
pins (``NodeRequest``) and runs operations on its own network; what it
publishes it pins, so its leases are renewed (``leasing.py``). The short-lived client a CLI command
uses when no node runs here is ``session.client_network``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import time
from collections.abc import Coroutine, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web

from dht_dfs import __version__
from dht_dfs.core.config import Config
from dht_dfs.core.crypto import Identity
from dht_dfs.core.direntry import EntryKind
from dht_dfs.core.errors import ConfigError, DhtfsError, InputError
from dht_dfs.core.ids import ChunkId
from dht_dfs.dht.node import DhtNode
from dht_dfs.node.control import CONTROL_SOCKET, ControlServer
from dht_dfs.node.identity import ensure_data_dir, load_or_create_identity
from dht_dfs.node.leasing import LeaseKeeper
from dht_dfs.node.maintenance import Maintainer
from dht_dfs.node.metrics import serve_metrics
from dht_dfs.node.operations import (
    PinRequest,
    PinsRequest,
    PublishRequest,
    Request,
    StatusRequest,
    UnpinRequest,
    run_operation,
)
from dht_dfs.node.pins import Pin, PinCatalogue, PinList, Unpinned, new_pin
from dht_dfs.node.results import Contact, NodeStatus, OnEvent, PublishSummary, Result
from dht_dfs.node.service import ChunkService
from dht_dfs.node.session import client_network
from dht_dfs.node.tasks import cancel_and_wait
from dht_dfs.store.chunks import ChunkStore
from dht_dfs.transfer.network import Network
from dht_dfs.transport.endpoint import Endpoint

log = logging.getLogger(__name__)

__all__ = ["CONTACTS_FILE", "CONTROL_SOCKET", "LOCK_FILE", "Node", "client_network"]
"""``CONTROL_SOCKET`` and ``client_network`` live in control.py and session.py;
they are re-exported because callers found them here before."""

LOCK_FILE = "node.lock"
CONTACTS_FILE = "dht-contacts.json"
_PORT_ATTEMPTS = 20


class Node:
    """One dhtfs node. ``start``, then ``stop`` (or use ``async with``)."""

    def __init__(
        self,
        data_dir: Path,
        config: Config | None = None,
        *,
        host: str = "0.0.0.0",
        port: int = 0,
        advertise_host: str | None = None,
        bootstrap: Sequence[str] = (),
        control: bool = True,
        metrics: tuple[str, int] | None = None,
    ) -> None:
        """``metrics``: (host, port) to serve Prometheus metrics on (port 0: any free)."""
        self.data_dir = Path(data_dir).expanduser()
        self.config = (config or Config()).validate()
        self.host = host
        self.requested_port = port
        self.advertise_host = advertise_host
        self.bootstrap_addresses = list(bootstrap)
        self._control_enabled = control
        self._metrics_address = metrics
        self._metrics: web.AppRunner | None = None
        self.metrics_port: int | None = None
        """Where ``/metrics`` is served, once started with ``metrics``."""
        self.identity: Identity | None = None
        self.store: ChunkStore | None = None
        self.endpoint: Endpoint | None = None
        self.dht: DhtNode | None = None
        self.network: Network | None = None
        self.service: ChunkService | None = None
        self.maintainer: Maintainer | None = None
        self.pins: PinCatalogue | None = None
        self.leases: LeaseKeeper | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock_fd: int | None = None
        self._control: ControlServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.started_at = 0.0
        self.stopped = asyncio.Event()
        self.announced = asyncio.Event()
        """Set once the node rejoined and announced the chunks found in its store."""

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> Node:
        ensure_data_dir(self.data_dir)
        self._take_lock()
        try:
            await self._start()
        except BaseException:
            await self.stop(leave=False)
            raise
        return self

    def _take_lock(self) -> None:
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"another dhtfs node is already running with data dir {self.data_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    async def _start(self) -> None:
        config = self.config
        self.identity = load_or_create_identity(self.data_dir)
        self._executor = ThreadPoolExecutor(config.workers, thread_name_prefix="dhtfs-node")
        self.store = ChunkStore(
            self.data_dir / "store",
            quota=config.max_storage,
            fsync=config.fsync,
            guest_bytes_per_peer=config.guest_bytes_per_peer,
            max_guest_bytes=config.max_guest_bytes,
            min_free_disk=config.min_free_disk,
            min_free_disk_fraction=config.min_free_disk_fraction,
            lease_ttl=config.lease_ttl,
        ).open()
        self.pins = PinCatalogue(self.data_dir)
        self.service = ChunkService(
            self.store,
            self._executor,
            receipt_for=self._receipt_for,
            rightful=self._is_rightful,
            max_lease=config.max_lease_ttl,
        )
        self.endpoint, self.dht = await self._bind(self.identity)
        self.network = Network(config, self.dht, self.endpoint, self._executor, self.store)
        self.maintainer = Maintainer(self.network, self.store, config)
        self.leases = LeaseKeeper(self.network, self.store, self.pins, config)
        rejoined = False
        if self.bootstrap_addresses:
            # Asked for by the user: joining must work, or starting fails.
            await self.dht.bootstrap(self.bootstrap_addresses)
            rejoined = True
        elif self.dht.has_saved_contacts:
            # A restart: one try through the contacts saved last time before
            # reporting ready, so a node restarted after a crash is back in
            # its network when it says so; if none answers, keep trying in
            # the background.
            try:
                await self.dht.bootstrap([], attempts=1)
                rejoined = True
            except DhtfsError as error:
                log.info("%s; still trying", error)
        else:
            log.info(
                "no bootstrap address and no saved contacts: this node starts a new network "
                "(others join it with --bootstrap %s:%d)",
                self.advertise_host
                or (self.host if self.host not in ("0.0.0.0", "::") else "THIS_HOST"),
                self.port,
            )
            rejoined = True
        self._spawn(self._rejoin_and_announce(rejoined), "rejoin")
        if config.repair_interval > 0:
            self._spawn(self.maintainer.run_repair(), "repair")
        if config.scrub_interval > 0:
            self._spawn(self.maintainer.run_scrub(), "scrub")
        self._spawn(self.leases.run_renewals(self.announced), "lease-renewal")
        self._spawn(self.leases.run_collection(), "lease-collection")
        if self._control_enabled:
            control = ControlServer(self, self.data_dir / CONTROL_SOCKET)
            await control.start()
            self._control = control
        if self._metrics_address is not None:
            metrics_host, metrics_port = self._metrics_address
            try:
                self._metrics = await serve_metrics(self, metrics_host, metrics_port)
            except OSError as error:
                raise ConfigError(
                    f"cannot serve metrics on {metrics_host}:{metrics_port}: {error.strerror}"
                ) from None
            self.metrics_port = int(self._metrics.addresses[0][1])
        self.started_at = time.time()
        log.info(
            "node %s listening on %s:%d (data dir %s)",
            self.identity.node_id.hex(),
            self.host,
            self.port,
            self.data_dir,
        )

    async def _bind(self, identity: Identity) -> tuple[Endpoint, DhtNode]:
        """TCP and UDP on the same port number (a free pair if port is 0)."""
        assert self.service is not None and self.store is not None
        last_error: OSError | None = None
        for _ in range(_PORT_ATTEMPTS if self.requested_port == 0 else 1):
            endpoint = Endpoint(identity, self.config, self.service)
            try:
                tcp_port = await endpoint.start(self.host, self.requested_port)
            except OSError as error:
                await endpoint.close()
                raise ConfigError(
                    f"cannot listen on TCP {self.host}:{self.requested_port}: {error.strerror}"
                ) from None
            dht = DhtNode(
                identity,
                self.config,
                tcp_port=tcp_port,
                advertise_host=self.advertise_host,
                state_path=self.data_dir / CONTACTS_FILE,
                provided_keys=self._provided_keys,
            )
            try:
                await dht.start(self.host, tcp_port)
            except OSError as error:
                last_error = error
                await endpoint.close()
                continue
            return endpoint, dht
        detail = last_error.strerror if last_error else "no free port"
        raise ConfigError(f"cannot listen on UDP {self.host}:{self.requested_port}: {detail}")

    async def stop(self, *, leave: bool = True) -> None:
        """Stop serving. With ``leave``, hand off what only this node holds first.

        Every step runs even when an earlier one fails (the first failure is
        raised at the end): whatever happens, the store is closed, the lock
        released and ``stopped`` set, so the data dir can be used again.
        """
        # Callbacks run last-pushed first: the order below is the reverse of
        # the order they run in (control, dht, endpoint, executor, store, lock).
        async with contextlib.AsyncExitStack() as cleanup:
            cleanup.callback(self.stopped.set)
            cleanup.callback(self._release_lock)
            if self.store is not None:
                cleanup.callback(self.store.close)
            if self.pins is not None:
                cleanup.callback(self.pins.close)
            if self._executor is not None:
                cleanup.callback(self._executor.shutdown, wait=True, cancel_futures=True)
            if self.endpoint is not None:
                cleanup.push_async_callback(self.endpoint.close)
            if self.dht is not None:
                # Leaving (not a crash): contacts are told, and evict this node at once.
                cleanup.push_async_callback(functools.partial(self.dht.stop, goodbye=leave))
            cleanup.push_async_callback(self._close_control)
            cleanup.push_async_callback(self._close_metrics)
            # Repair and scrub end first, so none runs during the hand-off.
            await cancel_and_wait(self._tasks)
            if leave and self.maintainer is not None and self.store is not None:
                try:
                    await self.maintainer.hand_off()
                except DhtfsError as error:
                    log.warning("hand-off failed: %s", error)

    async def _close_metrics(self) -> None:
        metrics, self._metrics = self._metrics, None
        if metrics is not None:
            await metrics.cleanup()

    async def _close_control(self) -> None:
        control, self._control = self._control, None
        if control is not None:
            await control.close()

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(leave=False)

    # --- state --------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.endpoint.port if self.endpoint is not None else self.requested_port

    @property
    def address(self) -> str:
        host = self.dht.contact.host if self.dht is not None else self.host
        return f"{host}:{self.port}"

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coroutine, name=f"dhtfs-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("node task %s failed", task.get_name(), exc_info=task.exception())

    async def _rejoin_and_announce(self, rejoined: bool) -> None:
        assert self.dht is not None and self.store is not None
        try:
            if not rejoined:
                # Keep trying the saved contacts; if none ever answers, run
                # alone until some node joins through us.
                try:
                    await self.dht.bootstrap([])
                except DhtfsError as error:
                    log.warning("%s; running alone until another node joins", error)
            # Whatever this node stored before a restart is announced again
            # now, not at the next periodic pass: the records others held
            # for it may be gone with their own restarts.
            if self.store.stats().chunks:
                count = await self.dht.reannounce()
                log.info("announced %d stored chunk(s)", count)
        finally:
            self.announced.set()

    def _provided_keys(self) -> Iterable[bytes]:
        """The DHT keys this node announces: one per chunk it stores."""
        assert self.store is not None
        return (chunk_id.dht_key for chunk_id in self.store.ids())

    def _is_rightful(self, chunk_id: ChunkId) -> bool:
        # The DHT starts after the endpoint that serves STOREs: until then
        # (milliseconds) a chunk can only be a guest.
        if self.dht is None:
            return False
        rank = self.config.store_closeness_slack * self.config.replicas
        return self.dht.is_rightful_for(chunk_id.dht_key, rank)

    def _receipt_for(self, chunk_id: ChunkId) -> bytes:
        assert self.dht is not None
        record = self.dht.sign_record(chunk_id.dht_key)
        self.dht.hold_own_record(record)
        return record.to_bytes()

    def status(self) -> NodeStatus:
        assert self.store is not None and self.dht is not None and self.endpoint is not None
        assert self.identity is not None
        stats = self.store.stats()
        contacts = self.dht.known_contacts()
        return NodeStatus(
            version=__version__,
            node_id=self.identity.node_id,
            address=self.address,
            data_dir=self.data_dir,
            pid=os.getpid(),
            uptime_s=round(time.time() - self.started_at, 1),
            replicas=self.config.replicas,
            peers_known=len(contacts),
            peers_connected=len(self.endpoint.connected_peers()),
            contacts=tuple(Contact(c.node_id, f"{c.host}:{c.tcp_port}") for c in contacts[:50]),
            chunks=stats.chunks,
            bytes_stored=stats.bytes_used,
            quota=stats.quota,
            disk_free=stats.disk_free,
            full=stats.full,
            metrics_port=self.metrics_port,
            lease_ttl=self.config.lease_ttl,
            pins=self.pins.count() if self.pins is not None else 0,
        )

    async def handle(self, request: Request, on_event: OnEvent) -> Result:
        """Serve one control request (``ControlHandler``)."""
        if isinstance(request, StatusRequest):
            return self.status()
        if isinstance(request, PinRequest):
            return await self.pin(request)
        if isinstance(request, UnpinRequest):
            return await self.unpin(request)
        if isinstance(request, PinsRequest):
            return self.pin_list()
        assert self.network is not None
        result = await run_operation(self.network, request, on_event)
        if isinstance(request, PublishRequest):
            assert isinstance(result, PublishSummary)
            await self._pin_published(
                result, request.name or request.path.name or str(request.path)
            )
        return result

    # --- pins -----------------------------------------------------------------------

    async def _pin_published(self, published: PublishSummary, name: str) -> None:
        """What this node publishes it pins: the chunks got their first lease on STORE."""
        assert self.pins is not None
        pin = new_pin(
            published.root_hash,
            reference=published.reference,
            origin="published",
            name=name,
            kind="directory" if published.is_tree else "file",
            size=published.size,
        )
        await asyncio.to_thread(self.pins.add, pin)

    async def pin(self, request: PinRequest) -> Pin:
        """Pin a root: its leases are renewed now (it must be found) and from now on."""
        assert self.network is not None and self.pins is not None and self.leases is not None
        name = kind = None
        size: int | None = None
        if request.reference is not None:
            entry = (await self.network.resolve(request.reference, ())).entry
            name, size = entry.name, entry.size
            kind = "directory" if entry.kind is EntryKind.DIRECTORY else "file"
        candidate = new_pin(
            request.root,
            reference=request.reference,
            origin=request.origin,
            name=name,
            kind=kind,
            size=size,
        )
        # Kept only once the renewal found the root: a wrong reference pins nothing.
        # A root pinned before keeps its date and origin and gains what this
        # request knows more (a reference and name after a pin by root hash).
        report = await self.network.renew_leases(request.root, self.leases.lease_seconds)
        await asyncio.to_thread(self.pins.add, candidate)
        return await self.leases.record(request.root, report)

    async def unpin(self, request: UnpinRequest) -> Unpinned:
        assert self.pins is not None
        pin = await asyncio.to_thread(self.pins.remove, request.root)
        if pin is None:
            raise InputError(f"{request.root} is not pinned on this node (dhtfs pins lists pins)")
        last = pin.renewed_at if pin.renewed_at is not None else pin.pinned_at
        return Unpinned(pin, last + self.config.lease_ttl)

    def pin_list(self) -> PinList:
        assert self.pins is not None
        return PinList(
            tuple(self.pins.all()), self.config.lease_ttl, self.config.lease_renewal_interval
        )
