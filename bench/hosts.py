"""Hosts in network namespaces for the benchmarks (bench.wan), with capped links.

The namespaces themselves are the tests' (tests/support/hosts.py: a bridge
in a namespace of its own, one address per host, processes behind
``Hosts.command(host)``); the benchmarks add ``shape``, which caps each
host's links with ``tc tbf``. Needs root and iproute2.
"""

from __future__ import annotations

import subprocess

from tests.support import hosts as test_hosts

unavailable = test_hosts.unavailable


class Hosts(test_hosts.Hosts):
    def shape(self, uplink_mbit: float, downlink_mbit: float) -> None:
        """Cap every host's uplink (what it sends) and downlink (what the bridge sends it)."""
        for index, name in enumerate(self.names):
            _tbf(name, "eth0", uplink_mbit)
            _tbf(self.switch, f"p{index}", downlink_mbit)


def _tbf(namespace: str, device: str, mbit: float) -> None:
    # The burst must hold at least one timer tick of traffic at this rate.
    burst = max(64 * 1024, int(mbit * 1e6 / 8 / 250))
    subprocess.run(
        [
            *("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "root"),
            *("tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", "100ms"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
