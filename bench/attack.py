"""Hostile peers against a real node: memory, descriptors, slots, honest service.

Starts one victim ``dhtfs join`` process on 127.0.0.1 (port 0, read from its
ready line) through the process ``Supervisor``, with RLIMIT_NOFILE 1024 (as
the machine of the report), puts a few chunks in it with an honest client,
then runs each attack in turn from this process. The attacker completes
handshakes with throwaway identities using the sans-IO ``wire.Connection``
over plain sockets, from loopback source addresses of its own (127.0.0.2,
...; all traffic goes to 127.0.0.1):

    get-flood     connections that send 64 GETs of a 1 MiB chunk and read nothing
    store-headers STORE headers promising 16 MiB bodies that never come
    fd-exhaust    20 connections with 64 unread GETs each (two source addresses)
    slots         one host opening 1,100 connections and holding them idle

During each, an honest peer (127.0.0.1, a fresh identity each time) stores a
chunk and fetches one, every second. Printed per attack: the victim's peak
RSS (sampled VmRSS, and VmHWM reset before the attack), its peak open fds
(/proc/PID/fd), and whether the honest peer was served every time. Results
go to bench/results/attack.json.

    python -m bench.attack [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import MiB, save

FD_LIMIT = 1024
WAIT = 10.0
"""Seconds any single network step of the attacker or honest peer may take."""


# --- the victim, observed through /proc -----------------------------------------------


def proc_status_kib(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Sampler:
    """Samples the victim's RSS and fds every 20 ms while running."""

    pid: int
    peak_rss_kib: int = 0
    peak_fds: int = 0
    samples: int = 0

    def reset(self) -> None:
        self.peak_rss_kib = self.peak_fds = self.samples = 0
        # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/clear_refs", "w") as handle:
            handle.write("5")

    def sample(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.peak_rss_kib = max(self.peak_rss_kib, proc_status_kib(self.pid, "VmRSS"))
            self.peak_fds = max(self.peak_fds, open_fds(self.pid))
            self.samples += 1

    def hwm_kib(self) -> int:
        return proc_status_kib(self.pid, "VmHWM")

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.02)


# --- attacker side ------------------------------------------------------------------------


@dataclass
class RawPeer:
    """A raw connection that completed the handshake with a throwaway identity."""

    sock: socket.socket
    wire: Any

    def send(self, message: Any) -> None:
        data = self.wire.send(message)
        with contextlib.suppress(OSError):
            self.sock.send(data)

    def close(self) -> None:
        self.sock.close()


async def raw_handshake(port: int, source: str, *, receive_buffer: int | None = None) -> RawPeer:
    from dht_dfs import wire
    from dht_dfs.core.crypto import Identity

    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind((source, 0))
        sock.setblocking(False)
        async with asyncio.timeout(WAIT):
            await loop.sock_connect(sock, ("127.0.0.1", port))
            connection = wire.Connection(wire.Role.INITIATOR, Identity.generate())
            await loop.sock_sendall(sock, connection.data_to_send())
            while connection.state is not wire.State.OPEN:
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    raise ConnectionResetError("closed by the victim")
                connection.receive_data(data)
                await loop.sock_sendall(sock, connection.data_to_send())
    except BaseException:
        sock.close()
        raise
    return RawPeer(sock, connection)


async def open_many(
    count: int, port: int, sources: list[str], *, parallel: int = 32, **options: Any
) -> tuple[list[RawPeer], int]:
    """Up to ``count`` handshaken connections (``parallel`` at a time); and how many failed."""
    semaphore = asyncio.Semaphore(parallel)
    peers: list[RawPeer] = []
    failed = 0

    async def one(index: int) -> None:
        nonlocal failed
        async with semaphore:
            try:
                peers.append(await raw_handshake(port, sources[index % len(sources)], **options))
            except (OSError, TimeoutError, Exception):
                failed += 1

    await asyncio.gather(*(one(i) for i in range(count)))
    return peers, failed


# --- honest side ----------------------------------------------------------------------------


@dataclass
class Honest:
    port: int
    node_id: Any
    stored: list[Any]
    attempts: int = 0
    served: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    async def round_trip(self) -> None:
        from dht_dfs import wire
        from dht_dfs.core.addresses import PeerAddress
        from dht_dfs.core.config import Config
        from dht_dfs.core.crypto import Identity, seal_chunk
        from dht_dfs.transport.endpoint import Endpoint

        self.attempts += 1
        started = time.monotonic()
        client = Endpoint(Identity.generate(), Config(request_timeout=WAIT, connect_timeout=WAIT))
        try:
            async with asyncio.timeout(2 * WAIT):
                connection = await client.connect(PeerAddress("127.0.0.1", self.port, self.node_id))
                sealed = seal_chunk(os.urandom(MiB - 64))
                result = await connection.store(sealed.chunk_id, sealed.data, 3600)
                if result.status is not wire.StoreStatus.STORED:
                    raise RuntimeError(f"store answered {result.status.name}")
                want = self.stored[self.attempts % len(self.stored)]
                body = await connection.get(want.chunk_id)
                if body != want.data:
                    raise RuntimeError("fetch returned other bytes")
            self.served += 1
            self.latencies.append(time.monotonic() - started)
        except Exception as error:
            self.errors.append(f"{type(error).__name__}: {error}")
        finally:
            await client.close()


# --- the attacks --------------------------------------------------------------------------


async def get_flood(
    port: int, honest: Honest, hold: Callable[[], Awaitable[None]]
) -> dict[str, Any]:
    from dht_dfs import wire

    sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    peers, failed = await open_many(64, port, sources, receive_buffer=4096)
    chunk = honest.stored[0].chunk_id
    for peer in peers:
        for request_id in range(1, 65):
            peer.send(wire.GetChunk(request_id, chunk))
    try:
        await hold()
    finally:
        for peer in peers:
            peer.close()
    return {"connections": len(peers), "refused": failed, "gets": 64 * len(peers)}


async def store_headers(
    port: int, honest: Honest, hold: Callable[[], Awaitable[None]]
) -> dict[str, Any]:
    from dht_dfs import wire
    from dht_dfs.core.ids import ChunkId

    peers, failed = await open_many(40, port, ["127.0.0.2"])
    for index, peer in enumerate(peers):
        peer.send(wire.StoreChunk(1, ChunkId(index.to_bytes(32, "big")), 16 * MiB))
    try:
        await hold()
    finally:
        for peer in peers:
            peer.close()
    return {"connections": len(peers), "refused": failed, "promised_mib": 16 * len(peers)}


async def fd_exhaust(
    port: int, honest: Honest, hold: Callable[[], Awaitable[None]]
) -> dict[str, Any]:
    from dht_dfs import wire

    peers, failed = await open_many(20, port, ["127.0.0.2", "127.0.0.3"], receive_buffer=4096)
    for peer in peers:
        for request_id in range(1, 65):
            chunk = honest.stored[request_id % len(honest.stored)].chunk_id
            peer.send(wire.GetChunk(request_id, chunk))
    try:
        await hold()
    finally:
        for peer in peers:
            peer.close()
    return {"connections": len(peers), "refused": failed, "gets": 64 * len(peers)}


async def slots(port: int, honest: Honest, hold: Callable[[], Awaitable[None]]) -> dict[str, Any]:
    started = time.monotonic()
    peers, failed = await open_many(1100, port, ["127.0.0.2"], parallel=64)
    opened_in = time.monotonic() - started
    alive = 0
    for peer in peers:  # handshaken, and not closed since by the victim
        with contextlib.suppress(BlockingIOError):
            if peer.sock.recv(1, socket.MSG_PEEK) == b"":
                continue
        alive += 1
    try:
        await hold()
    finally:
        for peer in peers:
            peer.close()
    return {
        "attempted": 1100,
        "handshaken": len(peers),
        "still_open_after_handshakes": alive,
        "refused": failed,
        "seconds_to_open": round(opened_in, 2),
    }


ATTACKS = {
    "get-flood": get_flood,
    "store-headers": store_headers,
    "fd-exhaust": fd_exhaust,
    "slots": slots,
}


# --- driver ----------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from dht_dfs.core.addresses import PeerAddress
    from dht_dfs.core.config import Config
    from dht_dfs.core.crypto import Identity, seal_chunk
    from dht_dfs.core.ids import NodeId
    from dht_dfs.node.processes import Supervisor, join_command
    from dht_dfs.transport.endpoint import Endpoint

    scratch = Path(tempfile.mkdtemp(prefix="dhtfs-bench-attack-"))
    results: dict[str, Any] = {}
    try:
        async with Supervisor(ready_timeout=60) as supervisor:
            victim = await supervisor.start(
                join_command(scratch / "victim", port=0, extra=["--repair-interval", "0"]),
                name="victim",
                log_path=scratch / "victim.log",
                prefix=["prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", "--"],
                env={**os.environ, **dict(e.split("=", 1) for e in args.env)},
            )
            host, port_text = str(victim.ready["address"]).rsplit(":", 1)
            port = int(port_text)
            node_id = NodeId.from_hex(str(victim.ready["node_id"]))
            pid = victim.pid
            print(f"victim pid {pid} on {host}:{port}, fd limit {FD_LIMIT}", flush=True)

            chunks = [seal_chunk(os.urandom(MiB - 64)) for _ in range(4)]
            client = Endpoint(Identity.generate(), Config(request_timeout=WAIT))
            try:
                connection = await client.connect(PeerAddress("127.0.0.1", port, node_id))
                for sealed in chunks:
                    await connection.store(sealed.chunk_id, sealed.data, 3600)
            finally:
                await client.close()

            sampler = Sampler(pid)
            sampling = asyncio.create_task(sampler.run())
            try:
                sampler.reset()
                await asyncio.sleep(0.2)
                results["idle"] = {
                    "rss_mb": round(sampler.peak_rss_kib / 1024, 1),
                    "fds": sampler.peak_fds,
                }
                print(f"idle victim: {results['idle']}", flush=True)
                for name, attack in ATTACKS.items():
                    if args.only and name not in args.only:
                        continue
                    honest = Honest(port, node_id, chunks)
                    sampler.reset()

                    async def hold(honest: Honest = honest) -> None:
                        # The honest peer works once a second while the attack holds.
                        deadline = time.monotonic() + args.seconds
                        for _ in range(int(args.seconds) + 1):
                            if time.monotonic() >= deadline:
                                break
                            await honest.round_trip()
                            await asyncio.sleep(max(0.0, min(1.0, deadline - time.monotonic())))

                    detail = await attack(port, honest, hold)
                    sampler.sample()
                    results[name] = {
                        **detail,
                        "peak_rss_mb": round(sampler.peak_rss_kib / 1024, 1),
                        "vm_hwm_mb": round(sampler.hwm_kib() / 1024, 1),
                        "peak_fds": sampler.peak_fds,
                        "fd_limit": FD_LIMIT,
                        "honest_attempts": honest.attempts,
                        "honest_served": honest.served,
                        "honest_served_throughout": honest.served == honest.attempts > 0,
                        "honest_max_s": round(max(honest.latencies, default=0.0), 2),
                        "honest_errors": honest.errors[:3],
                        "victim_alive": victim.running,
                    }
                    print(f"{name:14s} {results[name]}", flush=True)
                    # Let the victim notice the closed connections before the next attack.
                    await asyncio.sleep(1.0)
            finally:
                sampling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampling
            log = (scratch / "victim.log").read_text(errors="replace")
            results["log"] = {
                "lines": log.count("\n"),
                "too_many_open_files": log.count("Too many open files"),
            }
            await supervisor.stop(grace=5)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"kept {scratch}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="Seconds each attack holds.")
    parser.add_argument("--only", nargs="*", choices=list(ATTACKS), help="Run only these.")
    parser.add_argument("--keep", action="store_true", help="Keep the victim's directory.")
    parser.add_argument("--env", nargs="*", default=[], help="NAME=VALUE for the victim.")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    attacks = {k: v for k, v in results.items() if k in ATTACKS}
    ok = all(
        v["honest_served_throughout"] and v["peak_rss_mb"] < 300 and v["peak_fds"] < FD_LIMIT
        for v in attacks.values()
    )
    path = save("attack", {"args": vars(args), "target_met": ok, "results": results})
    print(f"target met (RSS < 300 MB, fds < {FD_LIMIT}, honest served): {ok}; saved {path}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
