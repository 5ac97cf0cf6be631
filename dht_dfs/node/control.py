"""The local control endpoint: how CLI commands use the node on this machine.

A Unix socket in the node's data dir (mode 0600, so only its owner may
drive the node). One connection carries one operation, as lines of JSON
(requests, events and results are the documents of ``operations``)::

    -> {"op": "publish", "path": "/abs/file", "name": null, "convergence_secret": null}
    <- {"event": "progress", "done": 1048576, "total": 10485760}
    <- ...
    <- {"event": "result", "result": {...}}     or
    <- {"event": "error", "type": "IntegrityError", "message": "...", "chunk_hex": "..."}

An error event carries the error's fields (``chunk_hex``, ``code``) when it
has them, and ``call`` raises the same class with the same fields. If the
client hangs up, the node cancels the operation.

The server serves any ``ControlHandler`` (the node is one).

Must not import: node.py, session.py, the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, overload

from dht_dfs.core import errors
from dht_dfs.core.errors import ControlError, DhtfsError, NodeNotRunningError
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
    request_from_json,
)
from dht_dfs.node.pins import Pin, PinList, Unpinned
from dht_dfs.node.results import (
    Event,
    FetchSummary,
    HealthReport,
    NodeStatus,
    OnEvent,
    PublishSummary,
    Result,
    event_from_json,
)
from dht_dfs.node.tasks import cancel_and_wait

log = logging.getLogger(__name__)

CONTROL_SOCKET = "control.sock"
"""The socket's name in a node's data dir."""
_MAX_LINE = 1024 * 1024
_ERROR_FIELDS = ("chunk_hex", "code")
"""Attributes of a ``DhtfsError`` that cross the socket (constructor keywords)."""


class ControlHandler(Protocol):
    """What the control socket drives: the node, or a stand-in in tests."""

    async def handle(self, request: Request, on_event: OnEvent) -> Result:
        """Run one request; progress goes to ``on_event``; raises ``DhtfsError``."""
        ...


# --- errors across the socket ----------------------------------------------------------


def error_event(error: DhtfsError) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event": "error",
        "type": type(error).__name__,
        "message": str(error),
    }
    for name in _ERROR_FIELDS:
        value = getattr(error, name, None)
        if value is not None:
            event[name] = value
    return event


def error_from_event(event: dict[str, Any]) -> DhtfsError:
    """The error an error event describes, rebuilt as its own class with its fields.

    A class this side does not know (a newer node) becomes a plain
    ``DhtfsError`` with the same message.
    """
    message = str(event.get("message", "the node reported an error"))
    kind = getattr(errors, str(event.get("type", "")), None)
    if not (isinstance(kind, type) and issubclass(kind, DhtfsError)):
        return DhtfsError(message)
    fields = {name: event[name] for name in _ERROR_FIELDS if event.get(name) is not None}
    try:
        return kind(message, **fields)
    except TypeError:
        # The class takes no such field here (versions differ): keep the class.
        try:
            return kind(message)
        except TypeError:
            return DhtfsError(message)


# --- the server ----------------------------------------------------------------------


class ControlServer:
    """Serves the control socket of a running node."""

    def __init__(self, handler: ControlHandler, path: Path) -> None:
        self._handler = handler
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
        try:
            if self._server is not None:
                self._server.close()
            await cancel_and_wait(self._clients)
            if self._server is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._server.wait_closed(), 2)
        finally:
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
        def send(document: dict[str, Any]) -> None:
            if not writer.is_closing():
                writer.write(json.dumps(document).encode() + b"\n")

        try:
            request = request_from_json(json.loads(await reader.readline()))
        except ValueError as error:  # not JSON, or a line over the limit
            send(error_event(ControlError(f"bad request: {error}")))
            return
        except DhtfsError as error:
            send(error_event(error))
            return
        operation = asyncio.create_task(self._run(request, send))
        hangup = asyncio.create_task(reader.read(1))
        try:
            done, _ = await asyncio.wait({operation, hangup}, return_when=asyncio.FIRST_COMPLETED)
            if operation not in done:
                log.info("control client hung up; cancelling %s", request.op)
        finally:
            await cancel_and_wait([operation, hangup])
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def _run(self, request: Request, send: Callable[[dict[str, Any]], None]) -> None:
        def on_event(event: Event) -> None:
            send(event.to_json())

        try:
            result = await self._handler.handle(request, on_event)
            send({"event": "result", "result": result.to_json()})
        except DhtfsError as error:
            send(error_event(error))
        except Exception as error:
            log.exception("control operation %s failed", request.op)
            send(
                error_event(
                    DhtfsError(f"internal error in the node: {type(error).__name__}: {error}")
                )
            )


# --- the client ----------------------------------------------------------------------


@overload
async def call(
    socket_path: Path, request: PublishRequest, on_event: OnEvent | None = None
) -> PublishSummary: ...
@overload
async def call(
    socket_path: Path, request: FetchRequest, on_event: OnEvent | None = None
) -> FetchSummary: ...
@overload
async def call(
    socket_path: Path, request: CheckRequest | RepairRequest, on_event: OnEvent | None = None
) -> HealthReport: ...
@overload
async def call(
    socket_path: Path, request: StatusRequest, on_event: OnEvent | None = None
) -> NodeStatus: ...
@overload
async def call(socket_path: Path, request: PinRequest, on_event: OnEvent | None = None) -> Pin: ...
@overload
async def call(
    socket_path: Path, request: UnpinRequest, on_event: OnEvent | None = None
) -> Unpinned: ...
@overload
async def call(
    socket_path: Path, request: PinsRequest, on_event: OnEvent | None = None
) -> PinList: ...
async def call(socket_path: Path, request: Request, on_event: OnEvent | None = None) -> Result:
    """Run a request on the node behind ``socket_path``; returns its typed result."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=_MAX_LINE)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NodeNotRunningError(
            f"no dhtfs node is running with data dir {socket_path.parent}"
        ) from None
    except PermissionError:
        raise ControlError(f"not allowed to use the node's control socket {socket_path}") from None
    try:
        writer.write(json.dumps(request.to_json()).encode() + b"\n")
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line:
                raise ControlError("the node closed the control connection without an answer")
            try:
                document = json.loads(line)
                kind = document.get("event")
                if kind == "result":
                    return request.result_from_json(document["result"])
                if kind == "error":
                    raise error_from_event(document)
                event = event_from_json(document)
            except (AttributeError, KeyError, TypeError, ValueError) as error:
                raise ControlError(f"the node sent a malformed answer: {error!r}") from None
            if event is not None and on_event is not None:
                on_event(event)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
