"""Chunk transport throughput against a raw loopback TCP copy of the same bytes.

A server process holds N chunks in a real chunk store and also serves the
same bytes as one flat file on a raw TCP port. The client (this process)
alternates, round by round:

    raw    connect, receive the flat file (server: socket.sendfile), discard
    get    fetch every chunk over the dhtfs protocol, `--window` in flight
           (server: authenticated session, loop.sendfile of chunk files)
    store  push every chunk to the server, which hashes and fsyncs each one
           (reported for information; it includes disk writes)

and reports medians, the ratio get/raw, and CPU seconds per GiB of both
processes. ``--encrypt-bulk`` adds a ChaCha20-Poly1305 pass over every
chunk body on both ends (read + seal on the server instead of sendfile,
open on the client): what passing bulk bytes through the session cipher
would cost.

    python -m bench.transport                     # 1 GiB, 1 MiB chunks, 3 rounds
    python -m bench.transport --size-mib 256 --rounds 5 --encrypt-bulk
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import MiB, median, save


def cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- server process ------------------------------------------------------------------


async def serve(directory: Path, count: int, chunk_size: int, encrypt_bulk: bool) -> None:
    from dht_dfs.core.config import Config
    from dht_dfs.core.crypto import Identity, session_seal
    from dht_dfs.core.ids import ChunkId
    from dht_dfs.node.service import ChunkService
    from dht_dfs.store.chunks import ChunkStore
    from dht_dfs.transport.endpoint import Endpoint

    store = ChunkStore(directory / "store", fsync=True).open()
    flat = directory / "flat.bin"
    ids: list[str] = []
    with open(flat, "wb") as handle:
        for index in range(count):
            block = index.to_bytes(8, "big") + os.urandom(chunk_size - 8)
            chunk_id = ChunkId.of(block)
            store.put(chunk_id, block)
            handle.write(block)
            ids.append(chunk_id.hex())
    upload_store = ChunkStore(directory / "uploads", fsync=True).open()
    service = ChunkService(store)
    key = os.urandom(32)

    class Handler:
        async def handle_store(self, peer, chunk_id, body, *, host, lease):  # type: ignore[no-untyped-def]
            return await ChunkService(upload_store).handle_store(
                peer, chunk_id, body, host=host, lease=lease
            )

        async def handle_get(self, peer, chunk_id):  # type: ignore[no-untyped-def]
            if not encrypt_bulk:
                return await service.handle_get(peer, chunk_id)
            data = await asyncio.to_thread(store.get, chunk_id, verify=False)
            return await asyncio.to_thread(session_seal, key, 1, b"", data)

        async def handle_have(self, peer, chunk_ids):  # type: ignore[no-untyped-def]
            return await service.handle_have(peer, chunk_ids)

        async def handle_prove(self, peer, nonce, chunk_ids):  # type: ignore[no-untyped-def]
            return await service.handle_prove(peer, nonce, chunk_ids)

        async def handle_lease(self, peer, seconds, chunk_ids):  # type: ignore[no-untyped-def]
            return await service.handle_lease(peer, seconds, chunk_ids)

    identity = Identity.generate()
    endpoint = Endpoint(identity, Config(max_chunk_size=chunk_size + 64 * 1024), Handler())
    port = await endpoint.start("127.0.0.1", 0)

    raw = socket.create_server(("127.0.0.1", 0))
    raw.setblocking(False)
    loop = asyncio.get_running_loop()

    async def raw_server() -> None:
        while True:
            connection, _ = await loop.sock_accept(raw)
            with connection, open(flat, "rb") as handle:
                await loop.sock_sendfile(connection, handle)

    raw_task = loop.create_task(raw_server())
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(
        json.dumps(
            {
                "event": "ready",
                "port": port,
                "raw_port": raw.getsockname()[1],
                "node_id": identity.node_id.hex(),
                "ids": ids,
                "key": key.hex(),
            }
        ),
        flush=True,
    )
    await stop.wait()  # the supervisor's SIGTERM
    raw_task.cancel()
    await endpoint.close()
    store.close()
    upload_store.close()


# --- client --------------------------------------------------------------------------


def raw_copy(port: int, expected: int) -> None:
    buffer = bytearray(MiB)
    view = memoryview(buffer)
    received = 0
    with socket.create_connection(("127.0.0.1", port)) as connection:
        while True:
            n = connection.recv_into(view)
            if not n:
                break
            received += n
    if received != expected:
        raise SystemExit(f"raw copy received {received} bytes, expected {expected}")


async def over_dhtfs(
    info: dict[str, Any],
    window: int,
    mode: str,
    encrypt_bulk: bool,
    payloads: dict[int, bytes],
) -> None:
    from dht_dfs.core.addresses import PeerAddress
    from dht_dfs.core.config import Config
    from dht_dfs.core.crypto import Identity, session_open
    from dht_dfs.core.ids import ChunkId, NodeId
    from dht_dfs.transport.endpoint import Endpoint

    ids = [ChunkId.from_hex(h) for h in info["ids"]]
    key = bytes.fromhex(str(info["key"]))
    address = PeerAddress("127.0.0.1", int(info["port"]), NodeId.from_hex(str(info["node_id"])))
    endpoint = Endpoint(Identity.generate(), Config(max_chunk_size=2 * MiB + 64 * 1024), None)
    connection = await endpoint.connect(address)
    semaphore = asyncio.Semaphore(window)

    async def one(index: int, chunk_id: ChunkId) -> None:
        async with semaphore:
            if mode == "get":
                body = await connection.get(chunk_id)
                if body is None:
                    raise SystemExit(f"server lacks chunk {chunk_id}")
                if encrypt_bulk:
                    opened = await asyncio.to_thread(session_open, key, 1, b"", bytes(body))
                    if opened is None:
                        raise SystemExit("bulk decryption failed")
            else:
                result = await connection.store(chunk_id, payloads.pop(index), 3600)
                if result.status.name not in ("STORED", "ALREADY_HAD"):
                    raise SystemExit(f"store failed: {result.status}")

    await asyncio.gather(*(one(i, c) for i, c in enumerate(ids)))
    await endpoint.close()


async def run_client(
    args: argparse.Namespace, count: int, chunk_size: int
) -> dict[str, list[dict[str, float]]]:
    """Rounds against a server process; returns the samples of each mode."""
    from dht_dfs.node.processes import Supervisor

    scratch = Path(tempfile.mkdtemp(prefix="dhtfs-bench-transport-"))
    command = [
        sys.executable,
        "-m",
        "bench.transport",
        "--serve",
        str(scratch),
        "--size-mib",
        str(args.size_mib),
        "--chunk-mib",
        str(args.chunk_mib),
    ]
    if args.encrypt_bulk:
        command.append("--encrypt-bulk")
    total = count * chunk_size
    modes = ["raw", "get"] + ([] if args.no_store else ["store"])
    samples: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    # Writing the chunks and the flat file comes before the ready line.
    async with Supervisor(ready_timeout=600, grace=30) as supervisor:
        try:
            server = await supervisor.start(command, name="transport server")
            info = server.ready
            for _ in range(args.rounds):
                for mode in modes:
                    payloads: dict[int, bytes] = {}
                    if mode == "store":
                        with open(scratch / "flat.bin", "rb") as flat:
                            payloads = {i: flat.read(chunk_size) for i in range(count)}
                    wall0, mine0, theirs0 = time.perf_counter(), own_cpu(), cpu_of(server.pid)
                    if mode == "raw":
                        await asyncio.to_thread(raw_copy, int(info["raw_port"]), total)
                    else:
                        await over_dhtfs(info, args.window, mode, args.encrypt_bulk, payloads)
                    wall = time.perf_counter() - wall0
                    samples[mode].append(
                        {
                            "seconds": wall,
                            "mb_s": total / 1e6 / wall,
                            "client_cpu_s_per_gib": (own_cpu() - mine0) * (1 << 30) / total,
                            "server_cpu_s_per_gib": (cpu_of(server.pid) - theirs0)
                            * (1 << 30)
                            / total,
                        }
                    )
                    if mode == "store":
                        shutil.rmtree(scratch / "uploads" / "chunks", ignore_errors=True)
                        os.sync()
        finally:
            await supervisor.stop()
            shutil.rmtree(scratch, ignore_errors=True)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--chunk-mib", type=float, default=1.0)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--encrypt-bulk", action="store_true")
    parser.add_argument("--no-store", action="store_true", help="skip the store direction")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    chunk_size = int(args.chunk_mib * MiB)
    count = args.size_mib * MiB // chunk_size
    if args.serve:
        asyncio.run(serve(Path(args.serve), count, chunk_size, args.encrypt_bulk))
        return

    samples = asyncio.run(run_client(args, count, chunk_size))
    summary = {
        mode: {key: round(median([s[key] for s in rows]), 3) for key in rows[0]}
        for mode, rows in samples.items()
    }
    raw_rate = summary["raw"]["mb_s"]
    print(
        f"{args.size_mib} MiB in {count} chunks, window {args.window}, {args.rounds} rounds "
        f"(medians), encrypt_bulk={args.encrypt_bulk}"
    )
    print(f"{'mode':<6} {'MB/s':>8} {'ratio':>6} {'client CPU s/GiB':>17} {'server CPU s/GiB':>17}")
    for mode, row in summary.items():
        print(
            f"{mode:<6} {row['mb_s']:>8.0f} {row['mb_s'] / raw_rate:>6.2f} "
            f"{row['client_cpu_s_per_gib']:>17.2f} {row['server_cpu_s_per_gib']:>17.2f}"
        )
    name = "transport-encrypted-bulk" if args.encrypt_bulk else "transport"
    print("results:", save(name, {"args": vars(args), "summary": summary, "samples": samples}))


if __name__ == "__main__":
    main()
