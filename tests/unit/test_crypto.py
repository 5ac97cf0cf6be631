"""Chunk encryption, convergence, and identity signatures."""

from __future__ import annotations

import hashlib
import os

import pytest

from dht_dfs.core.crypto import (
    PUBLIC_CONVERGENCE_SECRET,
    TAG_SIZE,
    Identity,
    decrypt_with_key,
    open_chunk,
    seal_chunk,
    verify_signature,
)
from dht_dfs.core.errors import IntegrityError
from dht_dfs.core.ids import ChunkId, NodeId


def test_same_plaintext_same_secret_gives_same_chunk() -> None:
    plain = os.urandom(1000)
    a, b = seal_chunk(plain), seal_chunk(plain)
    assert a.chunk_id == b.chunk_id
    assert a.data == b.data
    assert len(a.data) == len(plain) + TAG_SIZE
    assert a.chunk_id == ChunkId.of(a.data)


def test_private_secret_changes_the_chunk() -> None:
    plain = os.urandom(1000)
    public = seal_chunk(plain)
    private = seal_chunk(plain, b"our team secret")
    assert public.chunk_id != private.chunk_id
    assert open_chunk(private.chunk_id, private.key, private.data) == plain


def test_ciphertext_does_not_contain_the_plaintext() -> None:
    plain = b"MARKER" * 1000
    sealed = seal_chunk(plain)
    assert b"MARKER" not in sealed.data


def test_flipped_byte_is_detected_and_named() -> None:
    sealed = seal_chunk(os.urandom(4096))
    damaged = bytearray(sealed.data)
    damaged[100] ^= 1
    with pytest.raises(IntegrityError, match=sealed.chunk_id.hex()) as info:
        open_chunk(sealed.chunk_id, sealed.key, bytes(damaged))
    assert info.value.chunk_hex == sealed.chunk_id.hex()


def test_wrong_key_is_detected() -> None:
    sealed = seal_chunk(os.urandom(4096))
    with pytest.raises(IntegrityError, match="does not decrypt"):
        open_chunk(sealed.chunk_id, os.urandom(32), sealed.data)


def test_node_id_is_hash_of_public_key_and_signatures_verify() -> None:
    identity = Identity.generate()
    assert identity.node_id == NodeId.for_public_key(identity.public_key)
    signature = identity.sign(b"hello")
    assert verify_signature(identity.public_key, b"hello", signature)
    assert not verify_signature(identity.public_key, b"hellO", signature)
    other = Identity.generate()
    assert not verify_signature(other.public_key, b"hello", signature)
    assert not verify_signature(b"short", b"hello", signature)
    assert Identity(identity.seed).node_id == identity.node_id


def test_decrypt_into_a_reused_buffer_matches_and_checks() -> None:
    from dht_dfs.core.crypto import decrypt_into

    buffer = bytearray(5000)
    for size in (0, 1, 4096):
        plain = os.urandom(size)
        sealed = seal_chunk(plain)
        length = decrypt_into(bytearray(sealed.data), sealed.key, buffer, sealed.chunk_id)
        assert bytes(buffer[:length]) == plain
    sealed = seal_chunk(os.urandom(100))
    damaged = bytearray(sealed.data)
    damaged[3] ^= 1
    with pytest.raises(IntegrityError, match=sealed.chunk_id.hex()):
        decrypt_into(damaged, sealed.key, buffer, sealed.chunk_id)
    with pytest.raises(IntegrityError, match="does not decrypt"):
        decrypt_into(sealed.data, os.urandom(32), buffer)
    with pytest.raises(IntegrityError, match="shorter than its tag"):
        decrypt_into(b"short", sealed.key, buffer)
    with pytest.raises(ValueError, match="too small"):
        decrypt_into(sealed.data, sealed.key, bytearray(10))


def test_a_published_sha256_does_not_give_away_the_chunk_key() -> None:
    """A one-chunk file's ``sha256sum`` (often published next to it) and its
    chunk must not be enough to read it under the default secret.

    Format 1 derived the key as BLAKE2b(SHA-256(plaintext)) keyed with the
    secret; that derivation is rebuilt here as an attacker would.
    """
    plaintext = b"the whole of a small secret file\n" * 100
    sealed = seal_chunk(plaintext, PUBLIC_CONVERGENCE_SECRET)
    published_digest = hashlib.sha256(plaintext).digest()
    guesses = [
        hashlib.blake2b(
            published_digest,
            key=PUBLIC_CONVERGENCE_SECRET,
            digest_size=32,
            person=person,
        ).digest()
        for person in (b"dhtfs/chunk-key", b"dhtfs/ckey/v2")
    ]
    guesses.append(published_digest)
    for guess in guesses:
        assert guess != sealed.key
        with pytest.raises(IntegrityError):
            decrypt_with_key(sealed.data, guess)
    # Dedup is kept: same plaintext and secret, same chunk.
    assert seal_chunk(plaintext, PUBLIC_CONVERGENCE_SECRET) == sealed
