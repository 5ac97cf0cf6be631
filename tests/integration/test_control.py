"""The node's control socket: bad requests get one error line, the node goes on."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from dht_dfs.core.errors import ControlError, NodeNotRunningError
from dht_dfs.node import control as api
from dht_dfs.node.node import CONTROL_SOCKET, Node

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
        status = await api.call(socket_path, {"op": "status"})
        assert status["node_id"] == node.identity.node_id.hex()  # type: ignore[union-attr]


async def test_an_oversized_request_is_refused_and_the_node_goes_on(tmp_path: Path) -> None:
    async with Node(tmp_path / "node", TEST_CONFIG, host="127.0.0.1") as node:
        socket_path = node.data_dir / CONTROL_SOCKET
        try:
            events = await raw_request(socket_path, b"x" * (2 * 1024 * 1024) + b"\n")
        except ConnectionResetError:
            events = []  # refused while we were still sending: the error line is lost
        assert all(event["event"] == "error" for event in events)
        status = await api.call(socket_path, {"op": "status"})
        assert status["node_id"] == node.identity.node_id.hex()  # type: ignore[union-attr]


async def test_errors_come_back_as_the_library_error(tmp_path: Path) -> None:
    async with Node(tmp_path / "node", TEST_CONFIG, host="127.0.0.1") as node:
        with pytest.raises(ControlError, match="unknown operation"):
            await api.call(node.data_dir / CONTROL_SOCKET, {"op": "dance"})
    with pytest.raises(NodeNotRunningError, match="no dhtfs node is running"):
        await api.call(tmp_path / "node" / CONTROL_SOCKET, {"op": "status"})
