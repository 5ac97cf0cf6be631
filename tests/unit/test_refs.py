"""Root references: round trips and the messages users see for bad tokens."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dht_dfs.core.errors import InvalidReferenceError
from dht_dfs.core.ids import ChunkId
from dht_dfs.core.refs import (
    HASH_PREFIX,
    READ_PREFIX,
    ReadReference,
    RootHash,
    parse_read_reference,
    parse_root_hash,
)


def make_reference() -> ReadReference:
    return ReadReference(ChunkId(os.urandom(32)), os.urandom(32))


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_read_reference_round_trips(root: bytes, key: bytes) -> None:
    reference = ReadReference(ChunkId(root), key)
    token = str(reference)
    assert token.startswith(READ_PREFIX)
    assert parse_read_reference(token) == reference
    assert parse_read_reference(token.upper().replace("DHTFS:R1:", READ_PREFIX)) == reference


def test_root_hash_round_trips_and_has_no_key() -> None:
    reference = make_reference()
    root_hash = reference.root_hash
    token = str(root_hash)
    assert token.startswith(HASH_PREFIX)
    assert parse_root_hash(token) == root_hash
    assert reference.key.hex() not in token
    # Any form that names the root is accepted where only the root is needed.
    assert parse_root_hash(str(reference)) == root_hash
    assert parse_root_hash(root_hash.root.hex()) == root_hash


def test_wrapped_token_is_accepted() -> None:
    reference = make_reference()
    token = str(reference)
    assert parse_read_reference(token[:40] + "\n  " + token[40:]) == reference


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda t: "", "empty reference"),
        (lambda t: t[:-5], "truncated: 104 characters after the prefix, expected 109"),
        (lambda t: t + "aa", "too long"),
        (lambda t: t[:20] + "1" + t[21:], "'1' at position 12"),
        (lambda t: "hello world", "not a dhtfs reference"),
        (lambda t: t.replace("r1", "r9", 1), "form 'r9' is not known"),
    ],
)
def test_bad_read_reference_says_what_is_wrong(mangle, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidReferenceError, match=message):
        parse_read_reference(mangle(str(make_reference())))


def test_mistyped_character_fails_the_checksum() -> None:
    token = str(make_reference())
    position = len(READ_PREFIX) + 30
    swapped = "b" if token[position] != "b" else "c"
    with pytest.raises(InvalidReferenceError, match="checksum does not match"):
        parse_read_reference(token[:position] + swapped + token[position + 1 :])


def test_root_hash_given_to_fetch_explains_it_cannot_read() -> None:
    root_hash = make_reference().root_hash
    with pytest.raises(InvalidReferenceError, match="not read it"):
        parse_read_reference(str(root_hash))
    with pytest.raises(InvalidReferenceError, match="not read it"):
        parse_read_reference(root_hash.root.hex())


def test_repr_never_shows_the_key() -> None:
    reference = make_reference()
    assert reference.key.hex() not in repr(reference)
    assert str(RootHash(reference.root)) not in repr(reference)


@given(st.text(max_size=200))
def test_any_text_parses_or_raises_invalid_reference(text: str) -> None:
    for parse in (parse_read_reference, parse_root_hash):
        with contextlib.suppress(InvalidReferenceError):
            parse(text)
