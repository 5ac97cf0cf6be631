"""The HTTP gateway over real nodes on 127.0.0.1, asked by a real HTTP client."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from dht_dfs.gateway.http import MAX_RANGES, bound_port, parse_ranges, serve

from .cluster import TEST_CONFIG, Cluster, cluster
from .dht_harness import WAIT

CHUNK = TEST_CONFIG.chunk_size


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with cluster(tmp_path / "net", 4) as started:
        yield started


@pytest.fixture
async def tree(net: Cluster, tmp_path: Path) -> tuple[str, dict[str, bytes]]:
    root = tmp_path / "site"
    (root / "docs").mkdir(parents=True)
    files = {
        "big.bin": os.urandom(5 * CHUNK + 123),
        "index.html": b"<html><script>alert(1)</script>hi</html>",
        "docs/<b>&odd name.txt": b"escaped\n",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "link").symlink_to("big.bin")
    node = net.live[0]
    assert node.network is not None
    result = await node.network.publish(root)
    return str(result.reference), files


@pytest.fixture
async def base(net: Cluster) -> AsyncIterator[str]:
    async with net.client() as network:
        runner = await serve(network, "127.0.0.1", 0)
        try:
            yield f"http://127.0.0.1:{bound_port(runner)}"
        finally:
            await runner.cleanup()


async def get(url: str, **headers: str) -> tuple[int, CIMultiDict[str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=headers, allow_redirects=False) as response,
    ):
        return response.status, CIMultiDict(response.headers), await response.read()


async def test_a_whole_file_and_its_headers(tree: tuple[str, dict[str, bytes]], base: str) -> None:
    reference, files = tree
    status, headers, body = await get(f"{base}/{reference}/big.bin")
    assert status == 200 and body == files["big.bin"]
    assert headers["Content-Length"] == str(len(files["big.bin"]))
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Accept-Ranges"] == "bytes"
    etag = headers["ETag"]
    assert (await get(f"{base}/{reference}/big.bin", **{"If-None-Match": etag}))[0] == 304
    # An HTML page renders, sandboxed: no script runs with the gateway's origin.
    status, headers, body = await get(f"{base}/{reference}/index.html")
    assert status == 200 and body == files["index.html"]
    assert headers["Content-Type"].startswith("text/html")
    assert headers["Content-Security-Policy"] == "sandbox"
    assert headers["X-Content-Type-Options"] == "nosniff"


async def test_ranges_at_and_across_chunk_boundaries(
    tree: tuple[str, dict[str, bytes]], base: str
) -> None:
    reference, files = tree
    data = files["big.bin"]
    size = len(data)
    url = f"{base}/{reference}/big.bin"
    for spec, start, stop in [
        (f"0-{CHUNK - 1}", 0, CHUNK),  # exactly the first chunk
        (f"{CHUNK - 1}-{CHUNK}", CHUNK - 1, CHUNK + 1),  # across a boundary
        (f"{CHUNK + 5}-{3 * CHUNK + 7}", CHUNK + 5, 3 * CHUNK + 8),  # over whole chunks
        ("-1000", size - 1000, size),  # a suffix
        (f"{4 * CHUNK}-", 4 * CHUNK, size),  # to the end
        (f"{size - 1}-{size + 5000}", size - 1, size),  # past the end: clipped
    ]:
        status, headers, body = await get(url, Range=f"bytes={spec}")
        assert status == 206, spec
        assert body == data[start:stop], spec
        assert headers["Content-Range"] == f"bytes {start}-{stop - 1}/{size}", spec


async def test_several_ranges_come_as_multipart_byteranges(
    tree: tuple[str, dict[str, bytes]], base: str
) -> None:
    reference, files = tree
    data = files["big.bin"]
    status, headers, body = await get(
        f"{base}/{reference}/big.bin", Range=f"bytes=0-9, {2 * CHUNK - 3}-{2 * CHUNK + 2}, -4"
    )
    assert status == 206
    assert headers["Content-Type"].startswith("multipart/byteranges; boundary=")
    assert headers["Content-Length"] == str(len(body))
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + headers["Content-Type"].encode() + b"\r\n\r\n" + body
    )
    parts = [
        (part["Content-Range"], part.get_payload(decode=True)) for part in message.iter_parts()
    ]
    size = len(data)
    assert parts == [
        (f"bytes 0-9/{size}", data[:10]),
        (f"bytes {2 * CHUNK - 3}-{2 * CHUNK + 2}/{size}", data[2 * CHUNK - 3 : 2 * CHUNK + 3]),
        (f"bytes {size - 4}-{size - 1}/{size}", data[-4:]),
    ]


async def test_unsatisfiable_ranges_and_head(tree: tuple[str, dict[str, bytes]], base: str) -> None:
    reference, files = tree
    size = len(files["big.bin"])
    url = f"{base}/{reference}/big.bin"
    status, headers, _ = await get(url, Range=f"bytes={size}-{size + 10}")
    assert status == 416 and headers["Content-Range"] == f"bytes */{size}"
    many = ",".join(f"{i}-{i}" for i in range(MAX_RANGES + 1))
    assert (await get(url, Range=f"bytes={many}"))[0] == 416
    # Not a byte range this gateway reads: ignored, the whole file comes.
    status, _, body = await get(url, Range="lines=1-2")
    assert status == 200 and len(body) == size
    async with aiohttp.ClientSession() as session, session.head(url) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(size)
        assert await response.read() == b""


async def test_a_directory_is_a_listing_with_escaped_links(
    tree: tuple[str, dict[str, bytes]], base: str
) -> None:
    reference, files = tree
    status, headers, _ = await get(f"{base}/{reference}/docs")
    assert status == 301 and headers["Location"].endswith(f"/{reference}/docs/")
    status, headers, body = await get(f"{base}/{reference}/docs/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    assert "&lt;b&gt;&amp;odd name.txt" in page and "<b>" not in page
    assert "href='%3Cb%3E%26odd%20name.txt'" in page
    status, _, body = await get(f"{base}/{reference}/docs/%3Cb%3E%26odd%20name.txt")
    assert status == 200 and body == files["docs/<b>&odd name.txt"]
    status, _, body = await get(f"{base}/{reference}/")
    assert status == 200
    assert "href='docs/'" in body.decode() and "link -&gt; big.bin" in body.decode()


async def test_bad_references_and_paths_are_one_line_errors(
    tree: tuple[str, dict[str, bytes]], base: str
) -> None:
    reference, _ = tree
    for path, code, text in [
        ("garbage", 400, "not a dhtfs reference"),
        (f"{reference}/nope/deeper", 404, "no 'nope'"),
        (f"{reference}/link", 404, "symbolic link to 'big.bin'"),
    ]:
        status, _, body = await get(f"{base}/{path}")
        assert status == code, (path, body)
        assert text in body.decode() and body.decode().count("\n") == 1, body


def test_range_headers_parse_as_rfc_9110_says() -> None:
    assert parse_ranges("bytes=0-0", 10)[0].stop == 1  # type: ignore[index]
    assert parse_ranges("bytes=5-2", 10) is None  # invalid: ignored
    assert parse_ranges("bytes=-0,9-", 10) == parse_ranges("bytes=9-9", 10)
    assert parse_ranges("items=0-1", 10) is None


async def test_edge_ranges_and_names_that_look_like_url_syntax(
    net: Cluster, tmp_path: Path, base: str
) -> None:
    root = tmp_path / "edge"
    (root / "a#b?c%d").mkdir(parents=True)
    (root / "a#b?c%d" / "in.txt").write_bytes(b"inside\n")
    (root / "empty.bin").write_bytes(b"")
    (root / "small.bin").write_bytes(b"0123456789")
    node = net.live[0]
    assert node.network is not None
    reference = str((await node.network.publish(root)).reference)
    # An empty file has no range to give: it comes whole (and empty).
    status, headers, body = await get(f"{base}/{reference}/empty.bin", Range="bytes=-5")
    assert (status, body) == (200, b"") and "Content-Range" not in headers
    # Numbers no file could reach are not a range this gateway reads: ignored.
    status, _, body = await get(f"{base}/{reference}/small.bin", Range="bytes=" + "9" * 5000 + "-")
    assert (status, body) == (200, b"0123456789")
    # A directory whose name holds '#', '?' and '%' redirects to itself, quoted.
    quoted = "a%23b%3Fc%25d"
    status, headers, _ = await get(f"{base}/{reference}/{quoted}")
    assert status == 301 and headers["Location"] == f"/{reference}/{quoted}/"
    status, _, body = await get(f"{base}/{reference}/{quoted}/in.txt")
    assert (status, body) == (200, b"inside\n")


async def test_a_client_that_stops_reading_cannot_hold_the_gateway(
    net: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dht_dfs.gateway import http

    monkeypatch.setattr(http, "MAX_STREAMS", 1)
    monkeypatch.setattr(http, "WRITE_TIMEOUT", 1.0)
    monkeypatch.setattr(http, "STREAM_WAIT", 20.0)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(100 * CHUNK))  # more than the sockets' buffers hold
    node = net.live[0]
    assert node.network is not None
    reference = str((await node.network.publish(big)).reference)
    async with net.client() as network:
        runner = await serve(network, "127.0.0.1", 0)
        port = bound_port(runner)
        try:
            idle = socket.socket()
            idle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            idle.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(idle, ("127.0.0.1", port))
            await loop.sock_sendall(idle, f"GET /{reference} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await asyncio.wait_for(loop.sock_recv(idle, 1), WAIT)  # it started, then stops reading
            # The only stream slot is held by the idle client until it is cut off.
            status, _, body = await get(f"http://127.0.0.1:{port}/{reference}", Range="bytes=10-19")
            assert status == 206 and body == big.read_bytes()[10:20]
            # The idle connection was closed short of the file.
            received = 1
            while chunk := await asyncio.wait_for(loop.sock_recv(idle, 1 << 16), WAIT):
                received += len(chunk)
            assert received < 100 * CHUNK
            idle.close()
        finally:
            await runner.cleanup()
