"""The HTTP gateway: ``GET``/``HEAD /REFERENCE[/PATH]`` answered from the network.

- A file comes as its bytes, streamed a chunk window at a time (memory does
  not grow with the file), every chunk verified before a byte of it is
  sent. ``Range`` is honoured: one range is a 206 with ``Content-Range``,
  several a ``multipart/byteranges`` 206 (at most ``MAX_RANGES``), none
  satisfiable a 416; chunks outside the ranges are not fetched. At most
  ``MAX_STREAMS`` files stream at once (a request waits ``STREAM_WAIT``
  for a slot, then gets a 503), and a client that stops reading for
  ``WRITE_TIMEOUT`` is cut off, so idle clients cannot hold the gateway.
- ``ETag`` is derived from the root and the path: what a read reference
  names never changes, so it is also ``Cache-Control: immutable``, and
  ``If-None-Match`` gets a 304.
- ``Content-Type`` comes from the name. A file is served with
  ``Content-Security-Policy: sandbox`` and ``nosniff``: a published HTML
  page renders, but runs no script with the gateway's origin (which every
  reference served here shares).
- A directory is a plain HTML listing with links (its URL ends in ``/``,
  so relative links work; without it, a redirect adds it). A symlink is a
  404 that says where it points: the gateway never follows links.
- A malformed reference or path is a 400, a path or root not found a 404,
  a chunk no holder could supply a 502, each with a one-line message. An
  error after the headers went out cuts the connection, so a client never
  takes a short body for the whole file.

Must not import: dht (except ``dht.values``), transport, store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import logging
import mimetypes
import os
import re
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote

from aiohttp import web

from dht_dfs.core.direntry import DirEntry, EntryKind
from dht_dfs.core.errors import (
    ChunkNotFoundError,
    ConfigError,
    DhtfsError,
    InputError,
    InvalidReferenceError,
    PathNotFoundError,
    RootNotFoundError,
)
from dht_dfs.core.refs import ReadReference, parse_read_reference
from dht_dfs.transfer.browse import split_path
from dht_dfs.transfer.network import Network

log = logging.getLogger(__name__)

MAX_RANGES = 16
"""Ranges one request may ask for (more is a 416: each costs a manifest walk)."""
MAX_STREAMS = 16
"""Files streamed at once, over all requests. Each holds up to
``transfer_window`` chunks, so this bounds the gateway's memory."""
MAX_RESOLVES = 64
"""References and paths being resolved at once (each may cost DHT lookups:
made-up references must not queue without bound)."""
STREAM_WAIT = 10.0
"""Seconds a request waits for a stream slot before a 503."""
WRITE_TIMEOUT = 20.0
"""Seconds one write may wait for the client to read: a client that stops
reading is cut off, so it cannot keep a stream slot."""

_RANGE_SPEC = re.compile(r"^\s*(\d{0,19})\s*-\s*(\d{0,19})\s*$")
"""One range of a ``Range`` header; at most 19 digits (more is not a size)."""


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    stop: int
    """Exclusive."""

    def header(self, size: int) -> str:
        return f"bytes {self.start}-{self.stop - 1}/{size}"


class _CutShort(Exception):
    """The body could not be finished; the connection is closed."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("cut short")
        self.response = response


class Unsatisfiable(Exception):
    """No range of the header falls inside the file (a 416)."""


def parse_ranges(header: str, size: int) -> list[ByteRange] | None:
    """The ranges of a ``Range`` header for a file of ``size`` bytes.

    None when the header is not a byte range set this parser reads (RFC 9110
    says to ignore it then: the whole file is sent). Raises Unsatisfiable
    when none of the ranges overlaps the file, or there are too many.
    """
    unit, _, specs = header.partition("=")
    if unit.strip().lower() != "bytes" or not specs.strip() or size == 0:
        return None  # an empty file has no range to give: it is sent whole
    ranges: list[ByteRange] = []
    for spec in specs.split(","):
        match = _RANGE_SPEC.match(spec)
        if match is None:
            return None
        first, last = match.groups()
        if not first and not last:
            return None
        if not first:  # a suffix: the last N bytes
            length = int(last)
            if length == 0:
                continue
            ranges.append(ByteRange(max(0, size - length), size))
            continue
        start = int(first)
        stop = size if not last else min(size, int(last) + 1)
        if last and int(last) < start:
            return None
        if start < size:
            ranges.append(ByteRange(start, stop))
    if not ranges or len(ranges) > MAX_RANGES:
        raise Unsatisfiable(header)
    return ranges


class _Busy(Exception):
    """No slot came free within ``STREAM_WAIT`` (a 503)."""


@contextlib.asynccontextmanager
async def _slot(slots: asyncio.Semaphore) -> AsyncIterator[None]:
    """Hold one of ``slots``; raises _Busy after waiting ``STREAM_WAIT`` for it."""
    try:
        await asyncio.wait_for(slots.acquire(), STREAM_WAIT)
    except TimeoutError:
        raise _Busy from None
    try:
        yield
    finally:
        slots.release()


def _busy() -> web.Response:
    return web.Response(status=503, headers={"Retry-After": "5"}, text="gateway busy; try again\n")


def _message(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text.replace("\n", " ") + "\n")


class Gateway:
    """The aiohttp application over one ``Network`` (see the module docstring)."""

    def __init__(self, network: Network) -> None:
        self._network = network
        self._streams = asyncio.Semaphore(MAX_STREAMS)
        self._resolves = asyncio.Semaphore(MAX_RESOLVES)

    def app(self) -> web.Application:
        application = web.Application()
        application.router.add_get("/", self._index)
        application.router.add_get("/{tail:[\\s\\S]+}", self._handle)
        return application

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(
            text="dhtfs gateway: GET /REFERENCE[/PATH] (a read reference printed by publish)\n"
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        try:
            token, steps = split_path(tail)
            reference = parse_read_reference(token)
        except (InvalidReferenceError, InputError) as error:
            return _message(400, str(error))
        try:
            async with _slot(self._resolves):
                entry = (await self._network.resolve(reference, steps)).entry
        except _Busy:
            return _busy()
        except (PathNotFoundError, RootNotFoundError) as error:
            return _message(404, str(error))
        except ChunkNotFoundError as error:
            return _message(502, str(error))
        except DhtfsError as error:
            return _message(502, f"cannot read {tail}: {error}")
        if entry.kind is EntryKind.DIRECTORY:
            if not request.path.endswith("/"):
                # The raw path, still quoted: a name with '#', '?' or '%' stays a name.
                raise web.HTTPMovedPermanently(request.raw_path.partition("?")[0] + "/")
            return await self._listing(request, entry, tail)
        if entry.kind is EntryKind.SYMLINK:
            return _message(
                404, f"{tail} is a symbolic link to {entry.target!r}; the gateway follows no link"
            )
        return await self._file(request, entry, reference, steps)

    async def _listing(
        self, request: web.Request, entry: DirEntry, tail: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/html; charset=utf-8",
                "Cache-Control": "public, max-age=31536000, immutable",
                "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
            }
        )
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        title = html.escape("/" + tail.rstrip("/") + "/")
        await response.write(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
            f"<body><h1>{title}</h1><ul>\n<li><a href='../'>../</a></li>\n".encode()
        )
        count = 0
        try:
            async for child in self._network.list_directory(entry):
                name = html.escape(child.name)
                link = quote(child.name, safe="")
                if child.kind is EntryKind.DIRECTORY:
                    line = f"<li><a href='{link}/'>{name}/</a></li>\n"
                elif child.kind is EntryKind.SYMLINK:
                    line = f"<li>{name} -&gt; {html.escape(child.target or '')}</li>\n"
                else:
                    line = f"<li><a href='{link}'>{name}</a> ({child.size} bytes)</li>\n"
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await response.write(line.encode())
                count += 1
        except (DhtfsError, ConnectionError, TimeoutError) as error:
            log.info("gateway: listing of %s cut short: %s", tail, error or "client too slow")
            response.force_close()
            return response
        await response.write(f"</ul><p>{count} entries</p></body></html>\n".encode())
        await response.write_eof()
        return response

    async def _file(
        self,
        request: web.Request,
        entry: DirEntry,
        reference: ReadReference,
        steps: tuple[str, ...],
    ) -> web.StreamResponse:
        size = entry.size
        identity = hashlib.sha256(reference.root.digest + "/".join(steps).encode()).hexdigest()
        etag = f'"{identity[:32]}"'
        content_type = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
        headers = {
            "ETag": etag,
            "Accept-Ranges": "bytes",
            "Cache-Control": "public, max-age=31536000, immutable",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "sandbox",
        }
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        ranges: list[ByteRange] | None = None
        if "Range" in request.headers:
            try:
                ranges = parse_ranges(request.headers["Range"], size)
            except Unsatisfiable:
                headers["Content-Range"] = f"bytes */{size}"
                return web.Response(status=416, headers=headers, text="range not satisfiable\n")
        if request.method == "HEAD":
            return await self._respond(request, entry, headers, content_type, ranges)
        try:
            async with _slot(self._streams):
                return await self._respond(request, entry, headers, content_type, ranges)
        except _Busy:
            return _busy()

    async def _respond(
        self,
        request: web.Request,
        entry: DirEntry,
        headers: dict[str, str],
        content_type: str,
        ranges: list[ByteRange] | None,
    ) -> web.StreamResponse:
        size = entry.size
        try:
            if ranges is None:
                whole = [ByteRange(0, size)]
                return await self._send(request, entry, headers, content_type, whole)
            if len(ranges) == 1:
                headers["Content-Range"] = ranges[0].header(size)
                return await self._send(request, entry, headers, content_type, ranges, status=206)
            return await self._send_parts(request, entry, headers, content_type, ranges)
        except _CutShort as cut:
            return cut.response

    async def _send(
        self,
        request: web.Request,
        entry: DirEntry,
        headers: dict[str, str],
        content_type: str,
        ranges: list[ByteRange],
        *,
        status: int = 200,
    ) -> web.StreamResponse:
        (wanted,) = ranges
        response = web.StreamResponse(status=status, headers=headers)
        response.content_type = content_type
        response.content_length = wanted.stop - wanted.start
        await response.prepare(request)
        if request.method != "HEAD":
            await self._write(response, entry, wanted)
            await response.write_eof()
        return response

    async def _send_parts(
        self,
        request: web.Request,
        entry: DirEntry,
        headers: dict[str, str],
        content_type: str,
        ranges: list[ByteRange],
    ) -> web.StreamResponse:
        boundary = os.urandom(12).hex()
        heads = [
            f"--{boundary}\r\nContent-Type: {content_type}\r\n"
            f"Content-Range: {item.header(entry.size)}\r\n\r\n".encode()
            for item in ranges
        ]
        closing = f"\r\n--{boundary}--\r\n".encode()
        length = sum(len(h) for h in heads) + sum(r.stop - r.start for r in ranges)
        length += 2 * (len(ranges) - 1) + len(closing)
        response = web.StreamResponse(status=206, headers=headers)
        response.content_type = f"multipart/byteranges; boundary={boundary}"
        response.content_length = length
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        for index, (head, item) in enumerate(zip(heads, ranges, strict=True)):
            await response.write((b"\r\n" if index else b"") + head)
            await self._write(response, entry, item)
        await response.write(closing)
        await response.write_eof()
        return response

    async def _write(
        self, response: web.StreamResponse, entry: DirEntry, wanted: ByteRange
    ) -> None:
        """The bytes of one range. A failure now (a lost chunk, a client gone or not
        reading) closes the connection short of its Content-Length: never a body
        that looks whole."""
        try:
            async with contextlib.aclosing(self._pieces(entry, wanted)) as pieces:
                async for piece in pieces:
                    async with asyncio.timeout(WRITE_TIMEOUT):
                        await response.write(piece)
        except (DhtfsError, ConnectionError, TimeoutError) as error:
            reason = "the client stopped reading" if isinstance(error, TimeoutError) else error
            log.info("gateway: %s cut short: %s", entry.name, reason)
            response.force_close()
            raise _CutShort(response) from None

    def _pieces(self, entry: DirEntry, wanted: ByteRange) -> AsyncGenerator[bytes, None]:
        return self._network.stream_file(entry, start=wanted.start, stop=wanted.stop)


async def serve(network: Network, host: str, port: int) -> web.AppRunner:
    """Start the gateway on ``host:port`` (0: any free port); the caller cleans up the runner."""
    runner = web.AppRunner(Gateway(network).app(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as error:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port a started gateway listens on."""
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("the gateway is not listening")


__all__ = [
    "MAX_RANGES",
    "ByteRange",
    "Gateway",
    "Unsatisfiable",
    "bound_port",
    "parse_ranges",
    "serve",
]
