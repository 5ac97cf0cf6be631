"""The node's control socket: bad requests get one error line, the node goes on;
errors come back as their own class with their fields."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from dht_dfs.core.errors import (
    ControlError,
    IntegrityError,
    NodeNotRunningError,
    PeerRefusedError,
    RootNotFoundError,
)
from dht_dfs.core.ids import ChunkId
from dht_dfs.core.refs import ReadReference, RootHash
from dht_dfs.node import control as api
from dht_dfs.node.control import CONTROL_SOCKET
from dht_dfs.node.node import Node
from dht_dfs.node.operations import CheckRequest, FetchRequest, RepairRequest, StatusRequest

from .cluster import TEST_CONFIG


async def raw_request(socket_path: Path, line: bytes) -> list[dict[str, object]]:
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    try:
        writer.write(line)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return [json.loads(part) for part in answer.splitlines()]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"not json\n", "bad request"),
        (b"[1, 2]\n", "a control request is a JSON object"),
        (b'{"op": "dance"}\n', "unknown operation 'dance'"),
        (b'{"op": "fetch", "reference": "nope"}\n', "not a dhtfs reference"),
        (b'{"op": "fetch"}\n', "bad request"),
    ],
)
async def test_bad_requests_get_one_error_and_the_node_goes_on(
    tmp_path: Path, line: bytes, message: str
) -> None:
    async with Node(tmp_path / "node", TEST_CONFIG, host="127.0.0.1") as node:
        socket_path = node.data_dir / CONTROL_SOCKET
        events = await raw_request(socket_path, line)
        assert len(events) == 1 and events[0]["event"] == "error"
        assert message in str(events[0]["message"])
        status = await api.call(socket_path, StatusRequest())
        assert status.node_id == node.identity.node_id  # type: ignore[union-attr]


async def test_an_oversized_request_is_refused_and_the_node_goes_on(tmp_path: Path) -> None:
    async with Node(tmp_path / "node", TEST_CONFIG, host="127.0.0.1") as node:
        socket_path = node.data_dir / CONTROL_SOCKET
        try:
            events = await raw_request(socket_path, b"x" * (2 * 1024 * 1024) + b"\n")
        except ConnectionResetError:
            events = []  # refused while we were still sending: the error line is lost
        assert all(event["event"] == "error" for event in events)
        status = await api.call(socket_path, StatusRequest())
        assert status.node_id == node.identity.node_id  # type: ignore[union-attr]


async def test_errors_come_back_as_the_library_error(tmp_path: Path) -> None:
    async with Node(tmp_path / "node", TEST_CONFIG, host="127.0.0.1") as node:
        events = await raw_request(node.data_dir / CONTROL_SOCKET, b'{"op": "dance"}\n')
        with pytest.raises(ControlError, match="unknown operation"):
            raise api.error_from_event(events[0])
    with pytest.raises(NodeNotRunningError, match="no dhtfs node is running"):
        await api.call(tmp_path / "node" / CONTROL_SOCKET, StatusRequest())


async def test_an_error_keeps_its_chunk_id_across_the_socket(tmp_path: Path) -> None:
    never_published = ReadReference(ChunkId(os.urandom(32)), os.urandom(32))
    async with Node(tmp_path / "node", TEST_CONFIG, host="127.0.0.1") as node:
        with pytest.raises(RootNotFoundError, match="no node has root") as caught:
            await api.call(
                node.data_dir / CONTROL_SOCKET,
                FetchRequest(never_published, output=tmp_path / "out"),
            )
    assert caught.value.chunk_hex == never_published.root.hex()


async def test_an_error_keeps_its_code_and_chunk_id_across_the_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunk = ChunkId(os.urandom(32))

    async def refused(*args: Any, **kwargs: Any) -> None:
        raise PeerRefusedError("peer refused: store full", code=7)

    async def corrupt(*args: Any, **kwargs: Any) -> None:
        raise IntegrityError("chunk does not match its id", chunk.hex())

    async with Node(tmp_path / "node", TEST_CONFIG, host="127.0.0.1") as node:
        assert node.network is not None
        monkeypatch.setattr(node.network, "repair", refused)
        monkeypatch.setattr(node.network, "check", corrupt)
        socket_path = node.data_dir / CONTROL_SOCKET
        with pytest.raises(PeerRefusedError, match="store full") as refusal:
            await api.call(socket_path, RepairRequest(RootHash(chunk)))
        assert refusal.value.code == 7
        with pytest.raises(IntegrityError, match="does not match") as integrity:
            await api.call(socket_path, CheckRequest(RootHash(chunk)))
        assert integrity.value.chunk_hex == chunk.hex()
        assert type(integrity.value) is IntegrityError
