"""The handshake of the chunk protocol: mutual authentication, session keys.

Each side proves the Ed25519 key behind its node id by signing a transcript
bound to fresh X25519 keys::

    initiator -> HELLO  min version | max version | initiator ephemeral (32)
                        | flags
    responder -> WELCOME version | responder ephemeral (32) | responder
                        static key (32) | signature (64)
    initiator -> AUTH   initiator static key (32) | signature (64)

The responder signs ``"dhtfs/handshake/responder" | H(HELLO | WELCOME
without signature)``; the initiator signs ``"dhtfs/handshake/initiator" |
H(HELLO | WELCOME)``, where H hashes each part with its length. Session keys
come from the X25519 secret and the hash of the whole transcript. The
initiator may send requests right after AUTH.

``Handshake`` holds one side's state: bodies in, bodies out, and at the end
an ``Established`` with the peer's proven id and the two session keys. It
frames nothing and holds no socket; ``connection.Connection`` does the
framing. Imports nothing but ``dht_dfs.core``.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from dht_dfs.core.crypto import EphemeralKey, Identity, derive_session_keys, verify_signature
from dht_dfs.core.errors import RemoteProtocolError
from dht_dfs.core.ids import NodeId

_HELLO = struct.Struct(">BB32sB")
_WELCOME = struct.Struct(">B32s32s64s")
_AUTH = struct.Struct(">32s64s")
_FLAG_CLIENT = 0x01
_RESPONDER_CONTEXT = b"dhtfs/handshake/responder"
_INITIATOR_CONTEXT = b"dhtfs/handshake/initiator"


def transcript_hash(*parts: bytes) -> bytes:
    """SHA-256 over the parts, each prefixed with its length (no ambiguity)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(4, "big"))
        digest.update(part)
    return digest.digest()


class NoCommonVersion(RemoteProtocolError):
    """The peer speaks no protocol version this side does; tell it before closing."""


@dataclass(frozen=True, slots=True)
class Established:
    """What a completed handshake proved and agreed."""

    peer_id: NodeId
    """Node id of the peer, derived from the key it proved."""
    peer_static: bytes
    version: int
    peer_is_client: bool
    send_key: bytes
    receive_key: bytes


class Handshake:
    """One side's handshake state: ``hello`` / ``on_hello`` / ``on_welcome`` / ``on_auth``."""

    def __init__(
        self,
        identity: Identity,
        *,
        expected_peer: NodeId | None,
        versions: tuple[int, int],
        client_mode: bool,
    ) -> None:
        self._identity = identity
        self._expected_peer = expected_peer
        self._versions = versions
        self._client_mode = client_mode
        self._ephemeral = EphemeralKey()
        self._hello = b""
        self._welcome = b""
        self._peer_ephemeral = b""
        self._version = 0
        self._peer_is_client = False

    # --- initiator ------------------------------------------------------------------

    def hello(self) -> bytes:
        """The initiator's first body."""
        flags = _FLAG_CLIENT if self._client_mode else 0
        self._hello = _HELLO.pack(
            self._versions[0], self._versions[1], self._ephemeral.public, flags
        )
        return self._hello

    def on_welcome(self, body: bytes) -> tuple[bytes, Established]:
        """Check the responder's proof; returns the AUTH body and the session."""
        if len(body) != _WELCOME.size:
            raise RemoteProtocolError(
                f"WELCOME body is {len(body)} bytes, expected {_WELCOME.size}"
            )
        version, peer_ephemeral, peer_static, signature = _WELCOME.unpack(body)
        if not self._versions[0] <= version <= self._versions[1]:
            raise RemoteProtocolError(
                f"peer chose protocol version {version}, which was not offered"
            )
        if not verify_signature(
            peer_static, _RESPONDER_CONTEXT + transcript_hash(self._hello, body[:-64]), signature
        ):
            raise RemoteProtocolError("peer's handshake signature is invalid")
        peer_id = self._proven(peer_static)
        auth_signature = self._identity.sign(
            _INITIATOR_CONTEXT + transcript_hash(self._hello, body)
        )
        auth = _AUTH.pack(self._identity.public_key, auth_signature)
        shared = self._shared(_checked_ephemeral(peer_ephemeral))
        to_responder, to_initiator = derive_session_keys(
            shared, transcript_hash(self._hello, body, auth)
        )
        return auth, Established(peer_id, peer_static, version, False, to_responder, to_initiator)

    # --- responder ------------------------------------------------------------------

    def on_hello(self, body: bytes) -> bytes:
        """Answer the initiator's HELLO; returns the WELCOME body.

        Raises NoCommonVersion (a RemoteProtocolError) when the version ranges
        do not meet, so the caller can tell the peer before closing.
        """
        if len(body) != _HELLO.size:
            raise RemoteProtocolError(f"HELLO body is {len(body)} bytes, expected {_HELLO.size}")
        low, high, peer_ephemeral, flags = _HELLO.unpack(body)
        version = min(high, self._versions[1])
        if version < max(low, self._versions[0]):
            raise NoCommonVersion(
                f"no common protocol version: peer speaks {low}-{high}, "
                f"this node {self._versions[0]}-{self._versions[1]}"
            )
        self._version = version
        self._peer_is_client = bool(flags & _FLAG_CLIENT)
        self._hello = body
        unsigned = _WELCOME.pack(
            version, self._ephemeral.public, self._identity.public_key, bytes(64)
        )[:-64]
        signature = self._identity.sign(_RESPONDER_CONTEXT + transcript_hash(body, unsigned))
        self._welcome = unsigned + signature
        self._peer_ephemeral = _checked_ephemeral(peer_ephemeral)
        return self._welcome

    def on_auth(self, body: bytes) -> Established:
        """Check the initiator's proof; returns the session."""
        if len(body) != _AUTH.size:
            raise RemoteProtocolError(f"AUTH body is {len(body)} bytes, expected {_AUTH.size}")
        peer_static, signature = _AUTH.unpack(body)
        if not verify_signature(
            peer_static,
            _INITIATOR_CONTEXT + transcript_hash(self._hello, self._welcome),
            signature,
        ):
            raise RemoteProtocolError("peer's handshake signature is invalid")
        peer_id = self._proven(peer_static)
        shared = self._shared(self._peer_ephemeral)
        to_responder, to_initiator = derive_session_keys(
            shared, transcript_hash(self._hello, self._welcome, body)
        )
        return Established(
            peer_id, peer_static, self._version, self._peer_is_client, to_initiator, to_responder
        )

    # --- shared -----------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The version the responder chose in its WELCOME (0 before it)."""
        return self._version

    @property
    def peer_is_client(self) -> bool:
        """What the initiator's HELLO said (responder side; False before it)."""
        return self._peer_is_client

    def _proven(self, peer_static: bytes) -> NodeId:
        peer_id = NodeId.for_public_key(peer_static)
        if self._expected_peer is not None and peer_id != self._expected_peer:
            raise RemoteProtocolError(
                f"peer proved node id {peer_id.hex()}, expected {self._expected_peer.hex()}"
            )
        return peer_id

    def _shared(self, peer_ephemeral: bytes) -> bytes:
        try:
            return self._ephemeral.shared_secret(peer_ephemeral)
        except ValueError:
            raise RemoteProtocolError("peer sent a degenerate ephemeral key") from None


def _checked_ephemeral(key: bytes) -> bytes:
    if key == bytes(32):
        raise RemoteProtocolError("peer sent an all-zero ephemeral key")
    return key
