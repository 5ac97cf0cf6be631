"""Node.stop: every step runs, whichever fails, so the data dir is usable again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dht_dfs.core.errors import StoreError
from dht_dfs.node.control import CONTROL_SOCKET
from dht_dfs.node.node import Node

from .cluster import TEST_CONFIG


class Broken(Exception):
    pass


async def fail(**options: object) -> None:
    raise Broken("this step failed")


@pytest.mark.parametrize("step", ["hand_off", "control", "dht", "endpoint"])
async def test_a_failing_step_still_releases_the_lock_and_closes_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    node = await Node(tmp_path / "node", TEST_CONFIG, host="127.0.0.1").start()
    assert node.dht is not None and node.endpoint is not None and node.store is not None
    dht, endpoint, store, control = node.dht, node.endpoint, node.store, node._control
    assert control is not None
    if step == "hand_off":
        assert node.maintainer is not None
        monkeypatch.setattr(node.maintainer, "hand_off", fail)
    elif step == "control":
        monkeypatch.setattr(control, "close", fail)
    elif step == "dht":
        monkeypatch.setattr(dht, "stop", fail)
    else:
        monkeypatch.setattr(endpoint, "close", fail)
    with pytest.raises(Broken):
        await node.stop(leave=True)
    assert node.stopped.is_set()
    with pytest.raises(StoreError, match="not open"):
        _ = store.db
    # The lock is free: another node takes the same data dir.
    async with Node(tmp_path / "node", TEST_CONFIG, host="127.0.0.1") as again:
        assert (again.data_dir / CONTROL_SOCKET).exists()
    # What the failed step left open is closed now, so nothing leaks.
    monkeypatch.undo()
    await control.close()
    await dht.stop()
    await endpoint.close()


async def test_a_cancelled_stop_is_not_swallowed_and_still_cleans_up(tmp_path: Path) -> None:
    node = await Node(tmp_path / "node", TEST_CONFIG, host="127.0.0.1").start()
    assert node.maintainer is not None
    entered = asyncio.Event()

    async def slow_hand_off() -> None:
        entered.set()
        await asyncio.Event().wait()

    node.maintainer.hand_off = slow_hand_off  # type: ignore[method-assign]
    stopping = asyncio.create_task(node.stop(leave=True))
    await entered.wait()
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert node.stopped.is_set()
    async with Node(tmp_path / "node", TEST_CONFIG, host="127.0.0.1"):
        pass
