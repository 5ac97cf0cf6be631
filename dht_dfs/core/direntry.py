"""Directory entries: one name in a directory and what it may be. Pure, no I/O.

The values the directory node codec (dirnode.py) reads and writes, with
the rules both sides share: a name is 1 to MAX_NAME_BYTES of UTF-8, not
"." or "..", without "/" or NUL (so an entry can never name a path, only a
child); a mode is permission bits only (setuid, setgid, sticky and file
type bits are refused, not stripped: no honest publisher writes them); a
symlink target is 1 to MAX_TARGET_BYTES without NUL, kept as written (a
fetcher decides what to do with it, and never follows one); an inlined file
is at most MAX_INLINE_SIZE bytes. Names may hold control characters, as
POSIX allows: escaping them on a terminal is the printer's job.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dht_dfs.core.manifest import MAX_STORED_SIZE
from dht_dfs.core.refs import ReadReference

MAX_NAME_BYTES = 255
"""Linux's NAME_MAX: a longer name could not be written by most fetchers."""
MAX_TARGET_BYTES = 4095
"""PATH_MAX less its NUL."""
MAX_INLINE_SIZE = 64 * 1024
"""Most bytes a file may have inlined; a builder's ``inline_limit`` is at most this."""
PERMISSION_BITS = 0o777


class EntryKind(enum.Enum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"


def name_problem(name: bytes) -> str | None:
    """What is wrong with an entry name, or None; shared by builder and decoder."""
    if not name:
        return "is empty"
    if len(name) > MAX_NAME_BYTES:
        return f"is {len(name)} bytes, more than {MAX_NAME_BYTES}"
    if name in (b".", b".."):
        return "is a path step, not a name"
    if b"/" in name:
        return "contains '/'"
    if b"\x00" in name:
        return "contains NUL"
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return "is not UTF-8"
    return None


def _encode_name(name: str) -> bytes:
    try:
        return name.encode("utf-8")
    except UnicodeEncodeError:
        # A surrogate-escaped file name (os.fsdecode of non-UTF-8 bytes).
        raise ValueError(f"directory entry name {name!r} is not UTF-8") from None


@dataclass(frozen=True, slots=True)
class DirTotals:
    """What a directory's root says of the whole directory (checked against it by walks)."""

    entry_count: int
    """Entries in this directory (not below its subdirectories)."""
    total_size: int
    """Sum of its entries' sizes; a subdirectory's size is its own total."""


@dataclass(frozen=True, slots=True)
class BuiltDirectory:
    """A directory tree just sealed: what its parent's entry needs."""

    reference: ReadReference
    stored_size: int
    """Bytes of the stored root node."""
    totals: DirTotals


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One name in a directory. Build with the ``file``, ``inline_file``,
    ``directory`` and ``symlink`` constructors; raises ValueError on a
    value no reader would accept."""

    name: str
    kind: EntryKind
    size: int
    """A file's bytes, a symlink target's bytes, a directory's total size."""
    mode: int
    """Permission bits only (0o777)."""
    mtime_ns: int
    reference: ReadReference | None = None
    """A file's root manifest or a directory's root node; None inline and for symlinks."""
    stored_size: int = 0
    """Bytes of the stored child root, 0 when unknown or there is none."""
    target: str | None = None
    """A symlink's target, as written (never followed by dhtfs)."""
    inline: bytes | None = None
    """An inlined file's bytes."""

    def __post_init__(self) -> None:
        problem = _entry_problem(self)
        if problem is not None:
            raise ValueError(f"directory entry {self.name!r} {problem}")

    @classmethod
    def file(
        cls, name: str, reference: ReadReference, size: int, stored_size: int = 0, *,
        mode: int = 0o644, mtime_ns: int = 0,
    ) -> DirEntry:  # fmt: skip
        return cls(name, EntryKind.FILE, size, mode, mtime_ns, reference, stored_size)

    @classmethod
    def inline_file(
        cls, name: str, data: bytes, *, mode: int = 0o644, mtime_ns: int = 0
    ) -> DirEntry:
        return cls(name, EntryKind.FILE, len(data), mode, mtime_ns, inline=bytes(data))

    @classmethod
    def directory(
        cls, name: str, built: BuiltDirectory, *, mode: int = 0o755, mtime_ns: int = 0
    ) -> DirEntry:
        return cls(
            name, EntryKind.DIRECTORY, built.totals.total_size, mode, mtime_ns,
            built.reference, built.stored_size,
        )  # fmt: skip

    @classmethod
    def symlink(cls, name: str, target: str, *, mode: int = 0o777, mtime_ns: int = 0) -> DirEntry:
        size = len(target.encode("utf-8", "surrogatepass"))
        return cls(name, EntryKind.SYMLINK, size, mode, mtime_ns, target=target)


def _entry_problem(entry: DirEntry) -> str | None:
    problem = name_problem(_encode_name(entry.name))
    if problem is not None:
        return f"name {problem}"
    if entry.mode & ~PERMISSION_BITS or entry.mode < 0:
        return f"has mode {entry.mode:#o}: only permission bits ({PERMISSION_BITS:#o}) may be set"
    if not -(1 << 63) <= entry.mtime_ns < 1 << 63:
        return f"has an mtime of {entry.mtime_ns} ns, outside 64 bits"
    if not 0 <= entry.size < 1 << 64:
        return f"has a size of {entry.size}, outside 64 bits"
    if not 0 <= entry.stored_size <= MAX_STORED_SIZE:
        return f"has a child root of impossible stored size {entry.stored_size}"
    has_body = (entry.reference is not None, entry.target is not None, entry.inline is not None)
    if entry.kind is EntryKind.FILE and has_body not in (
        (True, False, False),
        (False, False, True),
    ):
        return "is a file: it has either a reference or inlined bytes, nothing else"
    if entry.kind is EntryKind.DIRECTORY and has_body != (True, False, False):
        return "is a directory: it has a reference and nothing else"
    if entry.kind is EntryKind.SYMLINK and has_body != (False, True, False):
        return "is a symlink: it has a target and nothing else"
    if entry.reference is None and entry.stored_size:
        return "has a stored size but no child"
    if entry.inline is not None:
        if len(entry.inline) > MAX_INLINE_SIZE:
            return f"inlines {len(entry.inline)} bytes, more than {MAX_INLINE_SIZE}"
        if len(entry.inline) != entry.size:
            return f"inlines {len(entry.inline)} bytes but has a size of {entry.size}"
    if entry.target is not None:
        target = _encode_name(entry.target)
        if not 0 < len(target) <= MAX_TARGET_BYTES:
            return f"has a symlink target of {len(target)} bytes (1 to {MAX_TARGET_BYTES})"
        if b"\x00" in target:
            return "has a symlink target containing NUL"
        if len(target) != entry.size:
            return f"has a target of {len(target)} bytes but a size of {entry.size}"
    return None
