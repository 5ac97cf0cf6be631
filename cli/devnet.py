"""A whole network on this machine: ``dhtfs devnet`` and ``dhtfs demo``.

Each node is a real ``dhtfs join`` process on 127.0.0.1 with its own data
dir, run by the library's process ``Supervisor``: the devnet starts node 0,
then the rest bootstrapping from it, and waits for each to report ready on
stdout (no polling). Nodes log to ``DIR/node-N/node.log``. Stopping sends
SIGTERM (a node then hands off its chunks), and SIGKILL only to a node that
overstays its leave timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dht_dfs.core.config import Config, format_size
from dht_dfs.core.errors import DhtfsError
from dht_dfs.node.control import CONTROL_SOCKET
from dht_dfs.node.operations import CheckRequest, FetchRequest, PublishRequest, StatusRequest
from dht_dfs.node.processes import ManagedProcess, Supervisor, join_command
from dht_dfs.node.session import LocalNodeSession
from dht_dfs.node.tasks import cancel_and_wait

from . import output

READY_TIMEOUT = 60.0


@dataclass(eq=False)
class DevnetNode:
    index: int
    port: int
    data_dir: Path
    process: ManagedProcess

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def node_id(self) -> str:
        return str(self.process.ready.get("node_id", ""))

    @property
    def control(self) -> Path:
        return self.data_dir / CONTROL_SOCKET

    @property
    def session(self) -> LocalNodeSession:
        return LocalNodeSession(self.data_dir)


@dataclass
class Devnet:
    directory: Path
    supervisor: Supervisor
    extra: list[str] = field(default_factory=list)
    nodes: list[DevnetNode] = field(default_factory=list)

    async def start_node(self, index: int, port: int, bootstrap: str | None) -> DevnetNode:
        """Start node ``index`` (again, if it ran before: it rejoins through saved contacts)."""
        data_dir = self.directory / f"node-{index}"
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        process = await self.supervisor.start(
            join_command(
                data_dir, port=port, bootstrap=[bootstrap] if bootstrap else [], extra=self.extra
            ),
            name=f"node {index}",
            log_path=data_dir / "node.log",
        )
        node = DevnetNode(index, port, data_dir, process)
        if index < len(self.nodes):
            self.nodes[index] = node
        return node

    async def stop(self, grace: float) -> None:
        stopped = await asyncio.gather(
            self.supervisor.stop(grace=grace),
            *(self._stop_restarted(node, grace) for node in self.nodes),
            return_exceptions=True,
        )
        for outcome in stopped:
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome  # cancelled, interrupted: not ours to swallow
        first = stopped[0]
        if isinstance(first, Exception):
            raise first
        for outcome, node in zip(stopped[1:], self.nodes, strict=True):
            if isinstance(outcome, Exception):
                output.stderr.print(
                    f"dhtfs: warning: could not stop node {node.index} restarted outside "
                    f"the devnet: {outcome}",
                    markup=False,
                )

    async def _stop_restarted(self, node: DevnetNode, grace: float) -> None:
        """A node the user restarted in this devnet's data dir (with the command the
        devnet printed) is part of this network: it stops with it, by SIGTERM."""
        if node.process.running:
            return
        try:
            status = await asyncio.wait_for(node.session.run(StatusRequest()), 5)
        except (DhtfsError, OSError, TimeoutError):
            return  # nothing runs there
        output.stderr.print(
            f"stopping node {node.index} (pid {status.pid}), restarted outside the devnet",
            markup=False,
        )
        try:
            exited = os.pidfd_open(status.pid)
        except ProcessLookupError:
            return
        # Signalled through the pidfd: the process it names, even if its pid
        # were reused meanwhile.
        try:
            signal.pidfd_send_signal(exited, signal.SIGTERM)
            gone = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_reader(exited, gone.set)
            try:
                await asyncio.wait_for(gone.wait(), grace)
            except TimeoutError:
                signal.pidfd_send_signal(exited, signal.SIGKILL)
            finally:
                loop.remove_reader(exited)
        except ProcessLookupError:
            pass
        finally:
            os.close(exited)


async def start_devnet(
    count: int, base_port: int, directory: Path, extra: Sequence[str] = ()
) -> Devnet:
    net = Devnet(directory, Supervisor(ready_timeout=READY_TIMEOUT), list(extra))
    try:
        net.nodes.append(await net.start_node(0, base_port, None))
        first = net.nodes[0].address
        rest = await asyncio.gather(
            *(net.start_node(i, base_port + i, first) for i in range(1, count)),
            return_exceptions=True,
        )
        for item in rest:
            if isinstance(item, DevnetNode):
                net.nodes.append(item)
        failures = [item for item in rest if isinstance(item, BaseException)]
        if failures:
            raise failures[0]
    except BaseException:
        await net.stop(grace=10)
        raise
    return net


def _node_args(
    replicas: int | None, max_storage: str | None, lease_ttl: float | None = None
) -> list[str]:
    extra: list[str] = []
    if replicas is not None:
        extra += ["--replicas", str(replicas)]
    if max_storage is not None:
        extra += ["--max-storage", max_storage]
    if lease_ttl is not None:
        extra += ["--lease-ttl", f"{lease_ttl:g}"]
    return extra


async def run_devnet(
    count: int,
    base_port: int,
    directory: Path | None,
    replicas: int | None,
    max_storage: str | None,
    *,
    lease_ttl: float | None = None,
) -> None:
    temporary = directory is None
    root = Path(tempfile.mkdtemp(prefix="dhtfs-devnet-")) if directory is None else directory
    root.mkdir(parents=True, exist_ok=True)
    extra = _node_args(replicas, max_storage, lease_ttl)
    net = await start_devnet(count, base_port, root, extra)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    last = net.nodes[-1]
    for line in (
        f"devnet: {count} node(s) on 127.0.0.1:{base_port}-{base_port + count - 1}, data in {root}",
        f"  publish: dhtfs publish FILE --data-dir {net.nodes[0].data_dir}",
        f"  fetch:   dhtfs fetch REFERENCE --data-dir {last.data_dir}",
        f"  client:  dhtfs fetch REFERENCE --bootstrap {net.nodes[0].address}",
        f"  status:  dhtfs status --data-dir {net.nodes[0].data_dir}",
        f"  pins:    dhtfs pins --data-dir {net.nodes[0].data_dir}",
        "Ctrl-C stops the network.",
    ):
        output.print_line(line)
    # A node that dies (killed to watch the network repair itself, say) is
    # reported; the others keep running until Ctrl-C or until none is left.
    by_process = {node.process: node for node in net.nodes}
    stopper = asyncio.create_task(stop.wait())
    running = len(net.nodes)
    try:
        while running and not stop.is_set():
            died = asyncio.create_task(net.supervisor.exited())
            try:
                await asyncio.wait([stopper, died], return_when=asyncio.FIRST_COMPLETED)
            finally:
                await cancel_and_wait([died])
            if died.done() and not died.cancelled():
                running -= 1
                _report_exit(by_process[died.result()], running, extra)
    finally:
        await cancel_and_wait([stopper])
        output.stderr.print("stopping the devnet...", markup=False)
        await net.stop(grace=Config().leave_timeout + 10)
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    if not running and not stop.is_set():
        raise DhtfsError("every node of the devnet has exited")


def _report_exit(node: DevnetNode, left: int, extra: list[str]) -> None:
    # It rejoins through the contacts it saved, so no --bootstrap is needed.
    restart = ["dhtfs", "join", "--host", "127.0.0.1", "--port", str(node.port)]
    restart += ["--data-dir", str(node.data_dir), *extra]
    output.stderr.print(
        f"dhtfs: node {node.index} exited with code {node.process.returncode} "
        f"(log: {node.data_dir / 'node.log'}); {left} node(s) still running. "
        f"To restart it: {' '.join(restart)}",
        markup=False,
    )


def ports_free(base: int, count: int) -> bool:
    for port in range(base, base + count):
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    return False
    return True


def find_free_ports(count: int, attempts: int = 50) -> int:
    """A base port with ``count`` consecutive free TCP+UDP ports on 127.0.0.1.

    Below 32768: above it the kernel hands out ephemeral ports, which could
    take a node's port between this probe and its bind.
    """
    for _ in range(attempts):
        base = random.randrange(20000, 32768 - count)
        if ports_free(base, count):
            return base
    raise DhtfsError(f"found no {count} consecutive free ports")


def _write_sample(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    block = os.urandom(min(size, 4 * 1024 * 1024)) if size else b""
    with open(path, "wb") as handle:
        written = 0
        counter = 0
        while written < size:
            piece = (counter.to_bytes(8, "big") + block[8:])[: size - written]
            handle.write(piece)
            digest.update(piece)
            written += len(piece)
            counter += 1
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(4 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


async def run_demo(count: int, size: int, *, keep: bool, port: int | None = None) -> bool:
    root = Path(tempfile.mkdtemp(prefix="dhtfs-demo-"))
    base = find_free_ports(count) if port is None else port
    output.stderr.print(
        f"starting {count} nodes on 127.0.0.1:{base}-{base + count - 1} ...", markup=False
    )
    started = time.monotonic()
    net = await start_devnet(count, base, root)
    try:
        output.stderr.print(
            f"network up in {time.monotonic() - started:.1f} s; "
            f"writing a {format_size(size)} sample file",
            markup=False,
        )
        sample = root / "sample.bin"
        expected = await asyncio.to_thread(_write_sample, sample, size)
        publisher, fetcher = net.nodes[0], net.nodes[-1]
        with output.progress_bar(
            f"publish via node 0 ({publisher.address})", enabled=True
        ) as on_event:
            published = await publisher.session.run(PublishRequest(sample), on_event)
        out = root / "fetched.bin"
        with output.progress_bar(
            f"fetch via node {fetcher.index} ({fetcher.address})", enabled=True
        ) as on_event:
            fetched = await fetcher.session.run(
                FetchRequest(published.reference, output=out), on_event
            )
        identical = await asyncio.to_thread(_sha256, out) == expected
        checked = await fetcher.session.run(CheckRequest(published.root_hash))
        output.print_line(f"root:      {published.reference}")
        output.print_line(f"root hash: {published.root_hash}")
        output.print_line(
            f"publish:   {format_size(size)} in {published.seconds:.2f} s "
            f"({output.rate(size, published.seconds)}) through node 0"
        )
        output.print_line(
            f"fetch:     {format_size(size)} in {fetched.seconds:.2f} s "
            f"({output.rate(size, fetched.seconds)}) through node {fetcher.index}"
        )
        output.print_line(
            f"copies:    every chunk on >= {checked.min_copies} nodes "
            f"(wanted {checked.replicas_wanted})"
        )
        output.print_line(f"identical: {'yes' if identical else 'NO'}")
        return identical and checked.ok
    finally:
        await net.stop(grace=Config().leave_timeout + 10)
        if keep:
            output.stderr.print(f"demo data kept in {root}", markup=False)
        else:
            shutil.rmtree(root, ignore_errors=True)
