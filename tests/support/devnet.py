"""A ``dhtfs devnet`` subprocess for tests that run the real command against it."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dhtfs_cli.devnet import find_free_ports

from tests.support.processes import dhtfs_command, read_until, stop

TIMEOUT = 120
"""Seconds one ``dhtfs`` command may take in a test."""


@dataclass
class Devnet:
    process: subprocess.Popen[str]
    directory: Path
    base_port: int
    env: dict[str, str]
    banner: list[str]

    def node_dir(self, index: int) -> Path:
        return self.directory / f"node-{index}"

    def run(
        self, *args: str, check: bool = True, cwd: Path | None = None, timeout: float = TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*dhtfs_command(), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=cwd,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"dhtfs {' '.join(args)} exited {done.returncode}: {done.stderr}")
        return done


@contextmanager
def running_devnet(directory: Path, nodes: int, *options: str) -> Iterator[Devnet]:
    """``dhtfs devnet --nodes N [OPTIONS]`` in ``directory``, stopped with Ctrl-C at the end."""
    base = find_free_ports(nodes)
    env = {**os.environ, "DHTFS_DATA_DIR": str(directory / "default-home")}
    command = ["devnet", "--nodes", str(nodes), "--port", str(base), "--dir", str(directory)]
    command += options
    process = subprocess.Popen(
        [*dhtfs_command(), *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        banner = read_until(process.stdout, "Ctrl-C stops the network", 90)
        yield Devnet(process, directory, base, env, banner)
    finally:
        stop([process], signal.SIGINT)
