"""Root references: the tokens a user copies between machines.

Two forms, both plain text safe for shells, URLs and e-mail:

- read reference ``dhtfs:r1:<base32>``: the root manifest's chunk id and
  the key that opens it. Enough to fetch and decrypt the file.
- root hash ``dhtfs:v1:<base32>`` (or the root chunk id as 64 hex digits):
  enough to check, repair or pin the file, not to read it (like Tahoe-LAFS's
  verify caps), because chunk ids and sizes are in the manifest's public part.

The base32 payload (RFC 4648 alphabet, lower case, no padding) is::

    read:  root id (32) | read key (32) | check (4)
    hash:  root id (32)                 | check (4)

``check`` is a 4-byte BLAKE2b of the form letter and the rest, so a mistyped
or truncated token is reported as such rather than as "not found" after a
network search.

Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from dht_dfs.core.errors import InvalidReferenceError
from dht_dfs.core.ids import CHUNK_ID_SIZE, ChunkId

READ_PREFIX = "dhtfs:r1:"
HASH_PREFIX = "dhtfs:v1:"
_CHECK_SIZE = 4
_B32_ALPHABET = set("abcdefghijklmnopqrstuvwxyz234567")


def _b32_len(n: int) -> int:
    return (n * 8 + 4) // 5


_READ_LEN = _b32_len(CHUNK_ID_SIZE + 32 + _CHECK_SIZE)
_HASH_LEN = _b32_len(CHUNK_ID_SIZE + _CHECK_SIZE)


def _check(form: bytes, payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=_CHECK_SIZE, person=b"dhtfs/ref/" + form).digest()


def _encode(form: bytes, payload: bytes) -> str:
    raw = payload + _check(form, payload)
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def _decode(body: str, form: bytes, expected_len: int, payload_size: int) -> bytes:
    if len(body) < expected_len:
        raise InvalidReferenceError(
            f"reference is truncated: {len(body)} characters after the prefix, "
            f"expected {expected_len}"
        )
    if len(body) > expected_len:
        raise InvalidReferenceError(
            f"reference is too long: {len(body)} characters after the prefix, "
            f"expected {expected_len}"
        )
    for position, char in enumerate(body.lower()):
        if char not in _B32_ALPHABET:
            raise InvalidReferenceError(
                f"reference has {char!r} at position {position + 1} after the prefix; "
                "only a-z and 2-7 occur in a reference"
            )
    padded = body.upper() + "=" * (-len(body) % 8)
    try:
        raw = base64.b32decode(padded)
    except binascii.Error:
        raise InvalidReferenceError("reference is not valid base32") from None
    payload, check = raw[:payload_size], raw[payload_size:]
    if _check(form, payload) != check:
        raise InvalidReferenceError(
            "reference checksum does not match: a character was mistyped or changed"
        )
    return payload


@dataclass(frozen=True, slots=True)
class RootHash:
    """Names a file without granting read access: check, repair, pin."""

    root: ChunkId
    """Chunk id of the root manifest node."""

    def __str__(self) -> str:
        return HASH_PREFIX + _encode(b"v", self.root.digest)


@dataclass(frozen=True, slots=True)
class ReadReference:
    """Names a file and grants reading it."""

    root: ChunkId
    """Chunk id of the root manifest node."""
    key: bytes
    """Key that opens the root node's encrypted part."""

    def __post_init__(self) -> None:
        if len(self.key) != 32:
            raise ValueError("a read key is 32 bytes")

    @property
    def root_hash(self) -> RootHash:
        return RootHash(self.root)

    def __str__(self) -> str:
        return READ_PREFIX + _encode(b"r", self.root.digest + self.key)

    def __repr__(self) -> str:
        # Never put the key in a log line by accident.
        return f"ReadReference(root={self.root.hex()[:16]}…)"


def _split_prefix(text: str) -> tuple[str, str]:
    cleaned = "".join(text.split())  # tolerate wrapped lines from e-mail
    if not cleaned:
        raise InvalidReferenceError("empty reference")
    lowered = cleaned.lower()
    for prefix in (READ_PREFIX, HASH_PREFIX):
        if lowered.startswith(prefix):
            return prefix, cleaned[len(prefix) :]
    if lowered.startswith("dhtfs:"):
        form = lowered[len("dhtfs:") :].split(":", 1)[0]
        raise InvalidReferenceError(
            f"reference form {form!r} is not known to this dhtfs "
            "(it reads 'r1' read references and 'v1' root hashes)"
        )
    return "", cleaned


def parse_read_reference(text: str) -> ReadReference:
    """Parse a ``dhtfs:r1:`` token, with a message that says what is wrong."""
    prefix, body = _split_prefix(text)
    if prefix == HASH_PREFIX or (prefix == "" and _looks_like_hex_root(body)):
        raise InvalidReferenceError(
            "this is a root hash: it can check and repair a file but not read it; "
            f"fetch needs the read reference ({READ_PREFIX}…) that publish printed"
        )
    if prefix != READ_PREFIX:
        raise InvalidReferenceError(
            f"not a dhtfs reference: a read reference starts with {READ_PREFIX!r}"
        )
    payload = _decode(body, b"r", _READ_LEN, CHUNK_ID_SIZE + 32)
    return ReadReference(ChunkId(payload[:CHUNK_ID_SIZE]), payload[CHUNK_ID_SIZE:])


def parse_root_hash(text: str) -> RootHash:
    """Parse any form that names a root: read reference, root hash, or hex id.

    A read reference is accepted (and its key dropped), because whoever can
    read a file may also check it.
    """
    prefix, body = _split_prefix(text)
    if prefix == READ_PREFIX:
        return parse_read_reference(text).root_hash
    if prefix == HASH_PREFIX:
        payload = _decode(body, b"v", _HASH_LEN, CHUNK_ID_SIZE)
        return RootHash(ChunkId(payload))
    if _looks_like_hex_root(body):
        return RootHash(ChunkId.from_hex(body))
    raise InvalidReferenceError(
        f"not a dhtfs reference: expected {HASH_PREFIX}…, {READ_PREFIX}… or a 64-digit hex root id"
    )


def _looks_like_hex_root(body: str) -> bool:
    return len(body) == CHUNK_ID_SIZE * 2 and all(c in "0123456789abcdefABCDEF" for c in body)
