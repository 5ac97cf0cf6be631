"""Commands a test runs as child processes: ``dhtfs`` itself, and reading its output.

Node processes go through the library's ``Supervisor``
(``dht_dfs.node.processes``); these helpers are for the other commands a
test starts and talks to line by line, such as ``dhtfs devnet``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import IO


def dhtfs_command() -> list[str]:
    """The installed ``dhtfs`` next to this interpreter (what a user runs)."""
    script = Path(sys.executable).parent / "dhtfs"
    return [str(script)] if script.exists() else [sys.executable, "-m", "dhtfs_cli.main"]


def read_until(stream: IO[str], text: str, timeout: float) -> list[str]:
    """Lines of ``stream`` up to the first that contains ``text``, at most ``timeout`` s.

    ``text=""`` reads one line. Raises TimeoutError with what was read when no
    such line comes in time, or the stream ends first.
    """
    lines: list[str] = []
    found = threading.Event()

    def reader() -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))
            if text in line:
                found.set()
                return

    threading.Thread(target=reader, daemon=True).start()
    if not found.wait(timeout):
        raise TimeoutError(f"no line with {text!r} within {timeout} s: {lines[-5:]}")
    return lines


def stop(
    processes: Iterable[subprocess.Popen[str]], signum: int = signal.SIGTERM, grace: float = 60
) -> None:
    """Signal the processes still running, wait ``grace`` s each, kill what stays; close pipes."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.send_signal(signum)
    for process in processes:
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
