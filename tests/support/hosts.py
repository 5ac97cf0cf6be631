"""Hosts in network namespaces for the multi-host tests.

Each host is a namespace with one address on a bridge that lives in a
namespace of its own, so this machine's own network is never touched.
Processes run on a host behind ``Hosts.command(host)``, a prefix the
library's process supervisor takes. Needs root and iproute2. bench/hosts.py
adds link shaping on top of this for the benchmarks (tests never import
bench/).
"""

from __future__ import annotations

import os
import shutil
import subprocess


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    probe = f"dhtfs-probe-{os.getpid()}"
    made = subprocess.run(
        ["ip", "netns", "add", probe], check=False, capture_output=True, text=True
    )
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    ip("netns", "del", probe)
    return None


class Hosts:
    """``count`` hosts at 10.<net>.<pid % 250>.1.. on one bridge.

    The subnet holds this process's id, so parallel runs cannot collide.
    """

    def __init__(self, count: int, tag: str, net: int) -> None:
        prefix = f"dhtfs-{tag}-{os.getpid()}"
        self.switch = f"{prefix}-sw"
        self.names = [f"{prefix}-h{i}" for i in range(count)]
        self.addresses = [f"10.{net}.{os.getpid() % 250}.{i + 1}" for i in range(count)]
        self._made: list[str] = []

    def create(self) -> None:
        for name in (self.switch, *self.names):
            ip("netns", "add", name)
            self._made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for index, name in enumerate(self.names):
            port = f"p{index}"
            ip(
                "-n",
                self.switch,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "eth0",
                "netns",
                name,
            )
            ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            ip("-n", name, "addr", "add", f"{self.addresses[index]}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")

    def destroy(self) -> None:
        for name in self._made:
            subprocess.run(
                ["ip", "netns", "del", name], check=False, capture_output=True, timeout=30
            )
        self._made.clear()

    def command(self, host: int, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.names[host], *args]
