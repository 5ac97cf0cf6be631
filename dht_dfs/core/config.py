"""Every tunable of dhtfs and its default, in one place.

Modules take a ``Config`` (or read the fields they need from one); the CLI
builds one from its options. Nothing else defines a default for these.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dht_dfs.core.errors import ConfigError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

DEFAULT_PORT = 4000


@dataclass(frozen=True, slots=True)
class Config:
    # --- data path -------------------------------------------------------------------
    chunk_size: int = 1 * MiB
    """Plaintext bytes per data chunk."""
    manifest_fanout: int = 4096
    """Entries per manifest node before the manifest becomes a tree (~280 KiB nodes)."""
    convergence_secret: bytes = b""
    """Empty: public convergence (dedup with everyone). See crypto.py."""

    # --- replication and placement -------------------------------------------------------
    replicas: int = 3
    """Copies of each chunk, on the live nodes closest to its id."""

    # --- the node's store ---------------------------------------------------------------
    max_storage: int | None = None
    """Quota in bytes for stored chunks; None means only the disk limits it."""
    fsync: bool = True
    """fsync each chunk before it becomes visible (crash safety)."""
    min_free_disk: int = 1 * GiB
    """Bytes of the store's file system kept free, quota or not (capped by
    ``min_free_disk_fraction``): a node without ``max_storage`` answers FULL
    before its disk is full, not after the disk broke everything else on it."""
    min_free_disk_fraction: float = 0.05
    """The free-disk floor is at most this fraction of the file system's size,
    so a small disk is not refused outright by a floor meant for a big one."""

    # --- storage admission: what a node keeps for others --------------------------------
    store_closeness_slack: int = 2
    """A node takes a chunk as a rightful holder only if fewer than this many times
    ``replicas`` of its known contacts are closer to the chunk's key than itself
    (or it knows fewer contacts than that): "among the ``replicas`` closest" by
    its own view, with slack for a publisher's slightly different view and for
    copies placed past full or dead nodes."""
    guest_bytes_per_peer: int = 64 * MiB
    """Bytes of chunks this node is not a rightful holder of (guests) that one
    peer may have it keep, counted per identity and per IP address alike."""
    max_guest_bytes: int = 1 * GiB
    """Bytes of guest chunks the node keeps from all peers together. Guests are
    never copied on by repair, and are evicted first when a rightful chunk
    needs their room."""
    guest_ttl: float = 24 * 3600.0
    """Seconds a guest chunk is kept at most (unless it becomes rightful)."""

    # --- DHT (UDP) ----------------------------------------------------------------------
    ksize: int = 20
    """k of the Kademlia paper: bucket size and replication of provider records."""
    alpha: int = 3
    """Parallel requests per lookup."""
    dht_rpc_timeout: float = 1.0
    """Seconds one DHT request may take before the lookup moves on."""
    dht_lookup_timeout: float = 10.0
    """Seconds a whole lookup may take."""
    contact_failures_before_eviction: int = 3
    provider_ttl: float = 6 * 3600.0
    """Lifetime of a provider record."""
    max_providers_per_key: int = 32
    max_provider_records: int = 500_000
    bootstrap_attempts: int = 10
    """Tries (with backoff, about 40 s in all) before a node gives up joining."""
    client_bootstrap_attempts: int = 3
    """The same for a short-lived client (publish/fetch --bootstrap): a few seconds."""

    # --- TCP transport --------------------------------------------------------------------
    max_chunk_size: int = 16 * MiB
    """Largest chunk body a node accepts on the wire."""
    connect_timeout: float = 5.0
    handshake_timeout: float = 5.0
    request_timeout: float = 30.0
    """Seconds a chunk request may take, bodies included."""
    idle_connection_timeout: float = 300.0
    max_connections: int = 1024
    """Accepted connections at once (also capped by the fd limit, see below).

    When full, a newcomer takes the slot of the longest-idle accepted
    connection; it is refused only if none is idle."""
    max_connections_per_address: int = 16
    """Accepted connections from one IP address at once, handshakes included."""
    max_connections_per_identity: int = 4
    """Authenticated accepted connections of one node id at once."""
    reserved_connections: int = 64
    """Accepted slots kept for known-good peers (ones this node dialed itself),
    at most a quarter of the connection limit.

    Other peers may hold at most ``max_connections - reserved_connections``
    authenticated connections."""
    reserved_file_descriptors: int = 256
    """File descriptors kept free of connections (chunk files, store, DHT, logs):
    the accepted-connection limit never exceeds RLIMIT_NOFILE minus this."""
    max_concurrent_requests: int = 64
    """Requests served at once per connection; beyond it the socket is paused."""
    max_write_buffer: int = 4 * MiB
    """Bytes a connection may have queued for its socket before it waits to
    send more; a message is queued only below this (so at most this plus one
    message is ever queued)."""
    send_stall_timeout: float = 30.0
    """Seconds a send may make no progress before the connection is closed."""
    body_timeout: float = 30.0
    """Seconds a chunk body may take to arrive once its header came."""
    max_body_memory: int = 128 * MiB
    """Bytes of incoming chunk bodies buffered at once in the whole node
    (reserved when a header arrives, released when the body is handled);
    a connection whose body does not fit stops being read until one does."""
    max_body_memory_per_address: int = 48 * MiB
    """The same, for the connections of one IP address together."""

    # --- publish / fetch engines ------------------------------------------------------
    transfer_window: int = 16
    """Chunks in flight in one publish or fetch."""
    workers: int = max(2, os.cpu_count() or 2)
    tree_files_in_flight: int = 4
    """Files of a directory tree published at once (each with its own transfer window)."""
    inline_limit: int = 4096
    """Files up to this many bytes are inlined into their directory node (at most 64 KiB)."""
    """Threads for hashing, encryption and file I/O."""
    verify_file_hash: bool = False
    """Fetch also recomputes the whole file's SHA-256 (every chunk is checked anyway)."""
    hedge_delay: float = 0.5
    """Seconds a chunk request may go unanswered before the next holder is asked too
    (at least; a fetch waits longer on links it has seen to be slower)."""
    max_holders_per_chunk: int = 16
    """Holders one fetch tries per chunk from each source (hints, provider records,
    closest nodes): a flood of fake records costs at most this many attempts."""

    # --- maintenance --------------------------------------------------------------------
    repair_interval: float = 60.0
    """Seconds between two repair passes over the local store (0: no repair loop)."""
    repair_rate: float = 50.0
    """Chunks per second a repair pass examines at most."""
    scrub_interval: float = 24 * 3600.0
    """Each stored chunk is re-verified once per this many seconds (0: no scrub loop)."""
    scrub_rate: float = 32 * MiB
    """Bytes per second the background scrub re-hashes at most."""
    leave_timeout: float = 30.0
    """Seconds a leaving node spends handing off chunks it alone holds."""

    # --- leases: what keeps a chunk stored ------------------------------------------------
    lease_ttl: float = 30 * 24 * 3600.0
    """Seconds a lease this node asks for lasts (on what it publishes and pins). It
    renews its pins' leases every third of this, and as a holder drops a chunk a
    third of this after its last lease ran out (the grace period)."""
    max_lease_ttl: float = 90 * 24 * 3600.0
    """The longest lease this node grants a peer, however long the peer asks for
    (three default TTLs: room for publishers with longer leases, not for a peer
    holding quota for a year with one STORE)."""

    # --- DHT under hostile peers: claims checked, every resource bounded -------------------
    max_provider_records_per_provider: int = 50_000
    """Records of one provider (node id) a node holds for others at most. A node
    is a rightful holder of about k/N of each provider's records; the cap keeps
    one identity from filling ``max_provider_records``."""
    max_provider_records_per_host: int = 100_000
    """Records pointing at one provider host a node holds at most, so many
    identities behind one address cannot fill the store either."""
    provider_closeness_slack: int = 2
    """A node accepts a record only if fewer than this many times k contacts of
    its routing table are closer to the record's key than itself: "among the k
    closest" by its own view, with slack for views that differ."""
    dht_challenge_interval: float = 60.0
    """Seconds between two identity-proof pings to one address, however many
    node ids requests from it claim (no amplification through our pings)."""

    @property
    def lease_renewal_interval(self) -> float:
        """Seconds between two renewals of a pin's leases: two may fail before one expires."""
        return self.lease_ttl / 3

    @property
    def lease_grace(self) -> float:
        """Seconds a holder keeps a chunk after its last lease expired."""
        return self.lease_ttl / 3

    def replace(self, **changes: object) -> Config:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def validate(self) -> Config:
        if self.chunk_size < 1 or self.chunk_size + 64 > self.max_chunk_size:
            raise ConfigError(f"chunk size must be between 1 byte and {self.max_chunk_size - 64}")
        if self.replicas < 1:
            raise ConfigError("replicas must be at least 1")
        if self.replicas > self.ksize:
            raise ConfigError(f"replicas cannot exceed k ({self.ksize})")
        if self.max_storage is not None and self.max_storage < 0:
            raise ConfigError("max storage cannot be negative")
        if self.min_free_disk < 0 or not 0 <= self.min_free_disk_fraction < 1:
            raise ConfigError("the free-disk floor must be >= 0 and its fraction in [0, 1)")
        if self.store_closeness_slack < 1:
            raise ConfigError("store closeness slack must be at least 1")
        if self.guest_bytes_per_peer < 0 or self.max_guest_bytes < 0 or self.guest_ttl < 0:
            raise ConfigError("guest budgets and guest TTL cannot be negative")
        if self.hedge_delay <= 0 or self.max_holders_per_chunk < 1:
            raise ConfigError("hedge delay must be positive, holders per chunk at least 1")
        if self.transfer_window < 1:
            raise ConfigError("transfer window must be at least 1")
        if self.tree_files_in_flight < 1:
            raise ConfigError("tree files in flight must be at least 1")
        if not 0 <= self.inline_limit <= 64 * 1024:
            raise ConfigError("inline limit must be between 0 and 64 KiB")
        largest = self.max_chunk_size
        if self.max_body_memory < largest or self.max_body_memory_per_address < largest:
            raise ConfigError("body memory budgets must hold at least one chunk of max size")
        if self.reserved_connections >= self.max_connections:
            raise ConfigError("reserved connections must be fewer than max connections")
        if not 1 <= self.lease_ttl <= self.max_lease_ttl:
            raise ConfigError(
                f"lease TTL must be between 1 s and {self.max_lease_ttl:g} s (--lease-ttl)"
            )
        if len(self.convergence_secret) > 64:
            raise ConfigError("a convergence secret is at most 64 bytes")
        return self


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'500M', '1.5GiB', '4096' -> bytes (powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"not a size: {text!r} (examples: 4096, 500M, 2GiB)")
    number, unit = float(match.group(1)), match.group(2).lower()
    factor = 1024 ** " kmgtp".index(unit or " ")
    return int(number * factor)


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def default_data_dir() -> Path:
    """``$DHTFS_DATA_DIR`` or ``~/.dhtfs``."""
    env = os.environ.get("DHTFS_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".dhtfs"
