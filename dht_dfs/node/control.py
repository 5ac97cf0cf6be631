"""The local control endpoint: how CLI commands use the node on this machine.

A Unix socket in the node's data dir (mode 0600, so only its owner may
drive the node). One connection carries one operation, as lines of JSON::

    -> {"op": "publish", "path": "/abs/file", "name": null}
    <- {"event": "progress", "done": 1048576, "total": 10485760}
    <- ...
    <- {"event": "result", "result": {...}}     or
    <- {"event": "error", "type": "RootNotFoundError", "message": "..."}

Operations: status, publish, fetch, check, repair. If the client hangs up,
the node cancels the operation. ``operate`` runs an operation against any
``Network``, so a short-lived client produces the very same documents.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dht_dfs.core import errors
from dht_dfs.core.errors import ControlError, DhtfsError, NodeNotRunningError
from dht_dfs.core.manifest import FileMetadata
from dht_dfs.core.refs import parse_read_reference, parse_root_hash
from dht_dfs.transfer.network import CheckReport, FetchResult, Network, PublishResult

if TYPE_CHECKING:
    from dht_dfs.node.node import Node

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]
_MAX_LINE = 1024 * 1024
_PROGRESS_INTERVAL = 0.1


def publish_document(result: PublishResult) -> dict[str, Any]:
    return {
        "reference": str(result.reference),
        "root_hash": str(result.root_hash),
        "root_id": result.reference.root.hex(),
        "size": result.size,
        "data_chunks": result.data_chunks,
        "manifest_chunks": result.manifest_chunks,
        "copies_placed": result.copies,
        "under_replicated": result.under_replicated,
        "seconds": round(result.seconds, 3),
        "mb_per_s": round(result.size / 1e6 / result.seconds, 1) if result.seconds else None,
    }


def fetch_document(result: FetchResult) -> dict[str, Any]:
    return {
        "path": str(result.path),
        "name": result.metadata.name,
        "size": result.size,
        "sha256": result.metadata.plain_sha256.hex(),
        "chunks": result.chunks,
        "chunks_fetched": result.chunks_fetched,
        "chunks_resumed": result.chunks_resumed,
        "seconds": round(result.seconds, 3),
        "mb_per_s": round(result.size / 1e6 / result.seconds, 1) if result.seconds else None,
    }


def check_document(report: CheckReport) -> dict[str, Any]:
    return report.to_json()


class _Throttle:
    """Forward progress at most every ``_PROGRESS_INTERVAL`` seconds (and at the end)."""

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last >= _PROGRESS_INTERVAL or (total and done >= total):
            self._last = now
            self._emit({"event": "progress", "done": done, "total": total})


async def operate(network: Network, request: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """Run one operation; progress goes to ``emit``; returns the result document."""
    op = request.get("op")
    progress = _Throttle(emit)
    if op == "publish":
        path = Path(str(request["path"]))
        name = request.get("name")
        secret = request.get("convergence_secret")
        published = await network.publish(
            path,
            name=str(name) if name is not None else None,
            progress=progress,
            convergence_secret=bytes.fromhex(str(secret)) if secret else None,
        )
        return publish_document(published)
    if op == "fetch":
        reference = parse_read_reference(str(request["reference"]))
        output = request.get("output")

        def on_metadata(metadata: FileMetadata, target: Path) -> None:
            emit(
                {"event": "meta", "name": metadata.name, "size": metadata.size, "path": str(target)}
            )

        fetched = await network.fetch(
            reference,
            output=Path(str(output)) if output else None,
            overwrite=bool(request.get("overwrite", False)),
            progress=progress,
            on_metadata=on_metadata,
            verify_hash=bool(request["verify_hash"]) if "verify_hash" in request else None,
        )
        return fetch_document(fetched)
    if op in ("check", "repair"):
        root = parse_root_hash(str(request["root"]))
        if op == "check":
            report = await network.check(root, progress=progress)
        else:
            report = await network.repair(root, progress=progress)
        return check_document(report)
    raise ControlError(f"unknown operation {op!r}")


class ControlServer:
    """Serves the control socket of a running node."""

    def __init__(self, node: Node, path: Path) -> None:
        self._node = node
        self.path = path
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            # The node lock is held, so no live node owns this: a leftover.
            self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._accept, path=str(self.path), limit=_MAX_LINE
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        for task in list(self._clients):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._clients.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def emit(event: dict[str, Any]) -> None:
            if not writer.is_closing():
                writer.write(json.dumps(event).encode() + b"\n")

        try:
            request = json.loads(await reader.readline())
        except ValueError as error:  # not JSON, or a line over the limit
            emit({"event": "error", "type": "ControlError", "message": f"bad request: {error}"})
            return
        if not isinstance(request, dict):
            emit(
                {
                    "event": "error",
                    "type": "ControlError",
                    "message": "bad request: a control request is a JSON object",
                }
            )
            return
        operation = asyncio.create_task(self._run(request, emit))
        hangup = asyncio.create_task(reader.read(1))
        try:
            done, _ = await asyncio.wait({operation, hangup}, return_when=asyncio.FIRST_COMPLETED)
            if operation not in done:
                log.info("control client hung up; cancelling %s", request.get("op"))
                operation.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await operation
        finally:
            hangup.cancel()
            operation.cancel()
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def _run(self, request: dict[str, Any], emit: Emit) -> None:
        node = self._node
        try:
            if request.get("op") == "status":
                result: dict[str, Any] = node.status()
            else:
                assert node.network is not None
                result = await operate(node.network, request, emit)
            emit({"event": "result", "result": result})
        except DhtfsError as error:
            emit({"event": "error", "type": type(error).__name__, "message": str(error)})
        except (KeyError, TypeError, ValueError) as error:
            emit({"event": "error", "type": "ControlError", "message": f"bad request: {error}"})
        except Exception as error:
            log.exception("control operation %s failed", request.get("op"))
            emit(
                {
                    "event": "error",
                    "type": "DhtfsError",
                    "message": f"internal error in the node: {type(error).__name__}: {error}",
                }
            )


def _error_from(event: dict[str, Any]) -> DhtfsError:
    kind = getattr(errors, str(event.get("type", "")), None)
    message = str(event.get("message", "the node reported an error"))
    if isinstance(kind, type) and issubclass(kind, DhtfsError):
        try:
            return kind(message)
        except TypeError:
            pass
    return DhtfsError(message)


async def call(
    socket_path: Path, request: dict[str, Any], on_event: Emit | None = None
) -> dict[str, Any]:
    """Run an operation on the node behind ``socket_path``; returns its result."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=_MAX_LINE)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NodeNotRunningError(
            f"no dhtfs node is running with data dir {socket_path.parent}"
        ) from None
    except PermissionError:
        raise ControlError(f"not allowed to use the node's control socket {socket_path}") from None
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line:
                raise ControlError("the node closed the control connection without an answer")
            event = json.loads(line)
            kind = event.get("event")
            if kind == "result":
                result = event.get("result")
                return result if isinstance(result, dict) else {}
            if kind == "error":
                raise _error_from(event)
            if on_event is not None:
                on_event(event)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
