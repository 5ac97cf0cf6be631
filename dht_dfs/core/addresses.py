"""Where a peer is reached over TCP, and who it must prove to be.

A pure value shared by the transport (which dials it) and the transfer
engines (which choose whom to dial), so neither imports the other.

Pure: imports only the standard library and ``core.ids``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dht_dfs.core.ids import NodeId


@dataclass(frozen=True, slots=True)
class PeerAddress:
    """Where to reach a peer, and (when known) who it must prove to be."""

    host: str
    port: int
    node_id: NodeId | None = None

    def __str__(self) -> str:
        who = f" ({self.node_id})" if self.node_id else ""
        return f"{self.host}:{self.port}{who}"


__all__ = ["PeerAddress"]
