"""A supervisor for child processes: ``dhtfs join`` nodes, or any command like one.

Used by ``dhtfs devnet``/``demo``, the benchmarks and the tests, so that
starting, watching and stopping node processes is done one way:

- ``start`` runs a command (behind an optional prefix such as
  ``ip netns exec HOST``), its stderr to a log file, and waits for its first
  stdout line, a JSON object (``join --json`` prints ``{"event": "ready",
  ...}``), with a deadline: no polling, no sleeps.
- ``exited`` reports a process that ended on its own (killed from outside,
  crashed), not one the supervisor stopped.
- ``stop`` sends SIGTERM (a node then hands off its chunks) and SIGKILL to
  whatever is still running after a grace period.

Only processes this supervisor started are ever signalled, and only while
not yet reaped (asyncio never signals a PID it has reaped, which another
process may have been given since).

Must not import: the rest of the package but ``core.errors`` and ``node.tasks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from dht_dfs.core.errors import DhtfsError
from dht_dfs.node.tasks import cancel_and_wait

READY_TIMEOUT = 60.0
"""Seconds a node may take to report ready (a rejoin may wait for DHT timeouts)."""
STOP_GRACE = 10.0
"""Seconds between SIGTERM and SIGKILL by default."""
_MAX_LINE = 1024 * 1024


def dhtfs_command() -> list[str]:
    """The ``dhtfs`` command of this interpreter's installation."""
    return [sys.executable, "-m", "dhtfs_cli.main"]


def join_command(
    data_dir: Path,
    *,
    port: int,
    host: str | None = "127.0.0.1",
    bootstrap: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> list[str]:
    """``dhtfs join --json`` for a node in ``data_dir`` (``host`` None: all addresses)."""
    command = [*dhtfs_command(), "join", "--port", str(port), "--data-dir", str(data_dir)]
    if host is not None:
        command += ["--host", host]
    command += ["--json", *extra]
    for address in bootstrap:
        command += ["--bootstrap", address]
    return command


@dataclass(eq=False)
class ManagedProcess:
    """One child process of a ``Supervisor``."""

    name: str
    """For messages: "node 3", say."""
    argv: tuple[str, ...]
    """The whole command line, prefix included."""
    log_path: Path | None
    """Where its stderr goes (None: discarded)."""
    process: asyncio.subprocess.Process
    ready: dict[str, Any] = field(default_factory=dict)
    """Its first stdout line (a node's status document)."""
    stopping: bool = False
    """Set once the supervisor stops it, so its exit is not reported as a death."""

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """None while running; negative: the signal that ended it."""
        return self.process.returncode

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    async def wait(self) -> int:
        return await self.process.wait()

    def send_signal(self, signum: int) -> None:
        """Signal it if it still runs (never a reaped PID)."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, as a crash would; ``wait`` for it to end."""
        self.send_signal(signal.SIGKILL)

    async def read_json(self, deadline: float) -> dict[str, Any]:
        """Its next stdout line, a JSON object, within ``deadline`` seconds."""
        stdout = self.process.stdout
        assert stdout is not None
        try:
            line = await asyncio.wait_for(stdout.readline(), deadline)
        except TimeoutError:
            raise DhtfsError(
                f"{self.name} wrote no line within {deadline:g} s{self._see_log()}"
            ) from None
        if not line:
            code = await self.process.wait()
            raise DhtfsError(
                f"{self.name} exited with code {code} before it was ready: {self.log_tail()}"
            )
        try:
            document = json.loads(line)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise DhtfsError(f"{self.name} wrote {line[:200]!r}, not a JSON object")
        return document

    def log_tail(self, lines: int = 1) -> str:
        if self.log_path is None:
            return "no log"
        try:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return f"see {self.log_path}"
        return " ".join(tail) or "no output"

    def _see_log(self) -> str:
        return f"; see {self.log_path}" if self.log_path is not None else ""


class Supervisor:
    """Starts, watches and stops child processes; ``async with`` stops them all."""

    def __init__(self, *, ready_timeout: float = READY_TIMEOUT, grace: float = STOP_GRACE) -> None:
        self.ready_timeout = ready_timeout
        self.grace = grace
        self.processes: list[ManagedProcess] = []
        """Every process started and not yet stopped by the supervisor."""
        self._exits: asyncio.Queue[ManagedProcess] = asyncio.Queue()
        self._watchers: set[asyncio.Task[None]] = set()

    async def start(
        self,
        argv: Sequence[str],
        *,
        name: str,
        log_path: Path | None = None,
        prefix: Sequence[str] = (),
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        ready_timeout: float | None = None,
    ) -> ManagedProcess:
        """Run ``prefix + argv``; return once its first stdout line (JSON) arrived.

        Raises ``DhtfsError`` (with the log's last line) if it exits first,
        writes something else, or says nothing within the deadline; it is
        killed then.
        """
        command = (*prefix, *argv)
        log: IO[bytes] | int = subprocess.DEVNULL
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = log_path.open("ab")
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=cwd,
                env=None if env is None else dict(env),
                limit=_MAX_LINE,
            )
        finally:
            if not isinstance(log, int):
                log.close()  # the child has its own copy
        managed = ManagedProcess(name, command, log_path, process)
        self.processes.append(managed)
        try:
            managed.ready = await managed.read_json(
                self.ready_timeout if ready_timeout is None else ready_timeout
            )
        except BaseException:
            await self._end(managed, grace=0)
            raise
        watcher = asyncio.create_task(self._watch(managed), name=f"watch {name}")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return managed

    async def _watch(self, managed: ManagedProcess) -> None:
        await managed.wait()
        if not managed.stopping:
            self._exits.put_nowait(managed)

    async def exited(self) -> ManagedProcess:
        """The next process that ended on its own (not stopped by this supervisor)."""
        return await self._exits.get()

    async def stop(
        self, processes: Iterable[ManagedProcess] | None = None, *, grace: float | None = None
    ) -> None:
        """SIGTERM, then SIGKILL what still runs after ``grace`` s; all by default."""
        chosen = list(self.processes if processes is None else processes)
        wait = self.grace if grace is None else grace
        await asyncio.gather(*(self._end(managed, grace=wait) for managed in chosen))

    async def _end(self, managed: ManagedProcess, *, grace: float) -> None:
        managed.stopping = True
        try:
            if grace > 0:
                managed.send_signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(managed.wait()), grace)
            managed.kill()
            await managed.wait()
        except BaseException:
            # Cancelled while waiting: leave no child behind.
            managed.kill()
            raise
        finally:
            if managed in self.processes and not managed.running:
                self.processes.remove(managed)

    async def __aenter__(self) -> Supervisor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.stop()
        finally:
            await cancel_and_wait(self._watchers)
