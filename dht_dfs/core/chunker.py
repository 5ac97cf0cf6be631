"""Fixed-size chunking of a byte stream. Pure: no I/O.

A file of ``size`` bytes is cut into ``ceil(size / chunk_size)`` chunks;
every chunk but the last is exactly ``chunk_size`` bytes. Fixed-size cuts
keep every chunk's offset computable from its index, which lets publish
read and fetch write chunks in parallel at their offsets and lets a fetch
resume by checking regions of a partial file. (Content-defined chunking
would dedup shifted content too, but needs a rolling hash over every byte,
too slow in pure Python for this project's throughput goals.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """Where one chunk lies in the file."""

    index: int
    offset: int
    length: int


def chunk_count(size: int, chunk_size: int) -> int:
    if size < 0 or chunk_size < 1:
        raise ValueError("size must be >= 0 and chunk_size >= 1")
    return (size + chunk_size - 1) // chunk_size


def chunk_spans(size: int, chunk_size: int) -> Iterator[ChunkSpan]:
    """The spans of a ``size``-byte file, in order, lazily."""
    for index in range(chunk_count(size, chunk_size)):
        offset = index * chunk_size
        yield ChunkSpan(index, offset, min(chunk_size, size - offset))
