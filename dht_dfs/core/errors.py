"""The one exception hierarchy of dhtfs.

Library code raises these and never prints or exits; the CLI maps them to
one-line messages and exit codes. Every error carries a message written for
the person who will read it, with the detail they need to act (which chunk,
which peer, which limit).

Imports nothing from the rest of the package.
"""

from __future__ import annotations


class DhtfsError(Exception):
    """Base of every error dhtfs raises on purpose."""


# --- input from the user ---------------------------------------------------


class ConfigError(DhtfsError):
    """A setting is unusable (a size, a replica count, a port, the data dir's key)."""


class InputError(DhtfsError):
    """What the user asked for cannot work as given, before any network work.

    A missing, unreadable or non-regular file to publish; an output that
    already exists; a directory that does not exist or cannot be written.
    """


class PathNotFoundError(InputError):
    """A path inside a tree names something that is not there (bad input: exit 2)."""


class SourceChangedError(InputError):
    """A file to publish could not be read to its end, or changed while it was read."""


class InvalidReferenceError(DhtfsError):
    """A root reference token (read or verify form) does not parse."""


# --- data integrity ---------------------------------------------------------


class IntegrityError(DhtfsError):
    """Bytes do not match the content hash (or authentication tag) they claim.

    A chunk that raises this is never written to a store or to a user's file.
    """

    def __init__(self, message: str, chunk_hex: str | None = None) -> None:
        super().__init__(message)
        self.chunk_hex = chunk_hex
        """Hex id of the chunk that failed, when there is one."""


class WrongKeyError(IntegrityError):
    """The read key does not open this root (a token for another file)."""


class ManifestError(DhtfsError):
    """A manifest chunk is well-hashed but its layout is invalid."""


class DirectoryError(ManifestError):
    """A directory node is well-hashed but its layout or an entry is invalid.

    A kind of ManifestError: directory and manifest nodes are both the
    metadata of a tree, and whoever handles a broken one handles both.
    """


# --- storage -------------------------------------------------------------------


class StoreError(DhtfsError):
    """The local chunk store cannot do what was asked."""


class StoreFullError(StoreError):
    """Keeping this chunk would exceed the store's quota (or the disk is full)."""


class GuestRefusedError(StoreError):
    """A chunk this node is not a rightful holder of exceeds a guest budget."""


class OutputError(DhtfsError):
    """A fetched file cannot be written (disk full, permissions, I/O error).

    The partial file is kept, so the fetch resumes once the cause is fixed.
    """


class ChunkNotFoundError(DhtfsError):
    """No reachable holder has this chunk."""

    def __init__(self, message: str, chunk_hex: str | None = None) -> None:
        super().__init__(message)
        self.chunk_hex = chunk_hex


class RootNotFoundError(ChunkNotFoundError):
    """The root chunk of a reference cannot be found anywhere."""


class ChunkUnavailableError(ChunkNotFoundError):
    """No holder gave a good copy of a chunk within a reader's deadline (a mount's read)."""


# --- the wire protocol -------------------------------------------------------


class ProtocolError(DhtfsError):
    """Base of the two directions of protocol misuse."""


class LocalProtocolError(ProtocolError):
    """We used the wire API wrongly (a bug on this side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids; close that connection."""


# --- peers and the network ---------------------------------------------------


class NetworkError(DhtfsError):
    """Talking to another node failed."""


class PeerUnavailableError(NetworkError):
    """A peer could not be reached, hung up, or did not answer in time."""


class HandshakeError(NetworkError):
    """A peer failed to prove its identity or speaks no common version."""


class RequestTimeoutError(PeerUnavailableError):
    """A request got no answer within its deadline."""


class PeerRefusedError(NetworkError):
    """A peer answered with an error (store full, bad request, ...)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class NotEnoughNodesError(NetworkError):
    """Fewer live nodes than needed to place a chunk were found."""


class ControlError(DhtfsError):
    """The local control endpoint of a node is missing or misbehaved."""


class NodeNotRunningError(ControlError):
    """No node answers on the data dir's control socket."""
