"""The process supervisor: ready lines with a deadline, deaths reported, own PIDs only."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from dht_dfs.core.errors import DhtfsError
from dht_dfs.node.operations import StatusRequest
from dht_dfs.node.processes import Supervisor, join_command
from dht_dfs.node.session import LocalNodeSession

READY = json.dumps({"event": "ready"})


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


async def test_reports_a_node_that_dies_and_stops_only_its_own(tmp_path: Path) -> None:
    # A process of this test, not of the supervisor: it must survive close.
    outsider = await asyncio.create_subprocess_exec(
        *python(f"print({READY!r}, flush=True); import time; time.sleep(120)"),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        async with Supervisor(grace=30) as supervisor:
            first = await supervisor.start(
                join_command(tmp_path / "a", port=0),
                name="node a",
                log_path=tmp_path / "a.log",
            )
            assert first.ready["event"] == "ready" and len(first.ready["node_id"]) == 40
            status = await LocalNodeSession(tmp_path / "a").run(StatusRequest())
            assert status.pid == first.pid
            second = await supervisor.start(
                join_command(tmp_path / "b", port=0, bootstrap=[first.ready["address"]]),
                name="node b",
                log_path=tmp_path / "b.log",
            )
            os.kill(second.pid, signal.SIGKILL)  # a crash, from outside the supervisor
            died = await asyncio.wait_for(supervisor.exited(), 30)
            assert died is second and died.returncode == -signal.SIGKILL
            assert first.running
        # Stopped by SIGTERM: the node left cleanly, and was not reported as a death.
        assert first.returncode == 0
        assert supervisor.processes == []
        assert supervisor._exits.empty()
        assert outsider.returncode is None
        os.kill(outsider.pid, 0)  # still there
    finally:
        outsider.kill()
        await outsider.wait()


async def test_a_process_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"print({READY!r}, flush=True); time.sleep(120)"
    )
    async with Supervisor() as supervisor:
        process = await supervisor.start(python(stubborn), name="stubborn")
        await supervisor.stop(grace=0.5)
        assert process.returncode == -signal.SIGKILL


async def test_exiting_before_ready_is_an_error_with_the_log(tmp_path: Path) -> None:
    failing = "import sys; print('cannot listen on UDP', file=sys.stderr); sys.exit(2)"
    async with Supervisor() as supervisor:
        with pytest.raises(DhtfsError, match="exited with code 2 before it was ready: cannot"):
            await supervisor.start(python(failing), name="node 0", log_path=tmp_path / "log")
        assert supervisor.processes == []


async def test_silence_past_the_deadline_is_an_error_and_the_process_is_killed() -> None:
    async with Supervisor(ready_timeout=0.5) as supervisor:
        with pytest.raises(DhtfsError, match=r"wrote no line within 0\.5 s"):
            await supervisor.start(python("import time; time.sleep(120)"), name="silent")
        assert supervisor.processes == []


async def test_a_prefix_runs_before_the_command(tmp_path: Path) -> None:
    # As "ip netns exec HOST" would: env(1) runs the command it is given.
    async with Supervisor() as supervisor:
        process = await supervisor.start(
            python("import os, json; print(json.dumps({'host': os.environ['HOST']}))"),
            name="prefixed",
            prefix=["env", "HOST=h1"],
        )
        assert process.ready == {"host": "h1"}
        assert process.argv[:2] == ("env", "HOST=h1")
