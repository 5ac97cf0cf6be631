"""The output side of a tree fetch: what the target file system can hold, and
writing there without ever following a link.

Every step below the output directory is opened with ``O_NOFOLLOW``, and
files are created with ``O_EXCL | O_NOFOLLOW`` relative to their
directory's descriptor, so a symbolic link found on the way (planted, or
left by an earlier fetch) makes the write fail instead of landing
elsewhere. The output directory itself is the user's choice and may be a
link.

Must not import: dht, transport, node, or the network side of transfer.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dht_dfs.core.direntry import DirEntry, EntryKind
from dht_dfs.core.errors import OutputError
from dht_dfs.transfer.fetch import PART_SUFFIX

DIRECTORY_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FOREIGN_CHARACTERS = frozenset('\\:*?"<>|') | {chr(code) for code in range(32)}
"""Refused in names on a case-insensitive target (FAT, exFAT, NTFS, SMB refuse them)."""


@dataclass(frozen=True, slots=True)
class TargetRules:
    """What the file system at the output can hold."""

    case_insensitive: bool
    name_max: int

    def name_problem(self, name: str) -> str | None:
        if len(os.fsencode(name)) > self.name_max:
            return f"is longer than the {self.name_max} bytes a name may have here"
        if self.case_insensitive and _FOREIGN_CHARACTERS.intersection(name):
            return "has a character a case-insensitive file system refuses"
        return None

    def fold(self, name: str) -> str:
        if not self.case_insensitive:
            return name
        return unicodedata.normalize("NFC", name).casefold()


def probe_target(directory: Path) -> TargetRules:
    """The rules of the file system holding ``directory`` (which must exist).

    Case sensitivity is tried, not guessed: a uniquely named empty file is
    created and looked up with its name's case swapped, then removed.
    """
    try:
        name_max = os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    probe = f".dhtfs-case-probe-{uuid.uuid4().hex}"
    try:
        fd = os.open(directory / probe, FILE_CREATE, 0o600)
    except OSError as exc:
        raise OutputError(f"cannot write into {directory}: {exc.strerror or exc}") from None
    try:
        os.close(fd)
        folded = os.path.lexists(directory / probe.upper())
    finally:
        with contextlib.suppress(OSError):
            os.unlink(directory / probe)
    return TargetRules(case_insensitive=folded, name_max=name_max or 255)


def disk_states(output: Path, path: tuple[str, ...], entries: Sequence[DirEntry]) -> list[str]:
    """In a worker: what is on disk at each entry's place (never through a link).

    "absent"; "same" (a file with the published size and mtime, or the same
    link); "directory"; "link", "file", "other": something else.
    """
    try:
        fd = open_below(output, path, create=False)
    except FileNotFoundError:
        return ["absent"] * len(entries)
    try:
        return [state_of(fd, entry) for entry in entries]
    finally:
        os.close(fd)


def state_of(directory_fd: int, entry: DirEntry) -> str:
    try:
        info = os.stat(entry.name, dir_fd=directory_fd, follow_symlinks=False)
    except FileNotFoundError:
        return "absent"
    except OSError as exc:
        raise OutputError(f"cannot look at {entry.name}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        return "directory"
    if stat.S_ISLNK(info.st_mode):
        if entry.kind is EntryKind.SYMLINK:
            same = os.readlink(entry.name, dir_fd=directory_fd) == entry.target
            return "same" if same else "link"
        return "link"
    if stat.S_ISREG(info.st_mode):
        same = entry.kind is EntryKind.FILE and (info.st_size, info.st_mtime_ns) == (
            entry.size,
            entry.mtime_ns,
        )
        return "same" if same else "file"
    return "other"


def open_below(output: Path, path: Sequence[str], *, create: bool) -> int:
    """A descriptor of ``output/path``, each step opened without following a link.

    ``create`` makes missing steps (mode 0700 until their own mode is set).
    Raises FileNotFoundError for a missing step when not creating.
    """
    try:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(output, 0o700)
        # The output itself is the user's choice: a link to a directory is fine there.
        fd = os.open(output, DIRECTORY_OPEN & ~os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise not_a_directory(output, exc) from None
    try:
        for step in path:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(step, 0o700, dir_fd=fd)
            try:
                next_fd = os.open(step, DIRECTORY_OPEN, dir_fd=fd)
            except FileNotFoundError:
                raise
            except OSError as exc:
                raise not_a_directory(output.joinpath(*path), exc) from None
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def not_a_directory(where: Path, exc: OSError) -> OutputError:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return OutputError(f"cannot fetch into {where}: it is not a directory (a link?)")
    return OutputError(f"cannot fetch into {where}: {exc.strerror or exc}")


def holds(directory_fd: int, entry: DirEntry) -> bool:
    """Whether the file there holds exactly the inlined bytes."""
    assert entry.inline is not None
    try:
        fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory_fd)
    except OSError:
        return False
    try:
        return os.read(fd, len(entry.inline) + 1) == entry.inline
    finally:
        os.close(fd)


def to_part(target: Path, entry: DirEntry) -> None:
    """In a worker: a file there with the published size and mtime becomes the part
    file, for ``FileFetch`` to verify chunk by chunk (and fetch what differs)."""
    part = target.with_name(target.name + PART_SUFFIX)
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode) or (info.st_size, info.st_mtime_ns) != (
        entry.size,
        entry.mtime_ns,
    ):
        return  # in the way, and the plan allowed it (overwrite): replaced at the end
    if os.path.lexists(part):
        return  # an earlier try's part: FileFetch resumes it
    os.rename(target, part)


def set_mtime(directory_fd: int, entry: DirEntry) -> None:
    os.utime(
        entry.name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=directory_fd,
        follow_symlinks=False,
    )  # fmt: skip


def set_mtime_at(target: Path, entry: DirEntry) -> None:
    try:
        os.utime(target, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
    except OSError as exc:
        raise OutputError(f"cannot set the time of {target}: {exc.strerror or exc}") from None


def sync_tree(output: Path) -> None:
    """Make what was written durable: one ``syncfs`` for the whole tree, not one fsync a file."""
    fd = os.open(output, DIRECTORY_OPEN & ~os.O_NOFOLLOW)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OutputError(f"cannot sync {output}: {os.strerror(code)}")
    except AttributeError:
        os.sync()  # no syncfs in this libc
    finally:
        os.close(fd)


def free_space(directory: Path) -> tuple[int, int]:
    """(bytes, inodes) available to us where ``directory`` is."""
    try:
        space = os.statvfs(directory)
    except OSError:
        return (1 << 62, 1 << 62)
    inodes = space.f_favail if space.f_files else 1 << 62  # some file systems have no count
    return space.f_bavail * space.f_frsize, inodes


def write_inline_files(directory_fd: int, entries: Sequence[DirEntry], umask: int) -> int:
    """Write inlined files into a directory; returns how many were written.

    One already there with the published size, mtime and bytes is kept.
    Each is written to its part file, then renamed over the name (which
    replaces a link there, never writes through it).
    """
    written = 0
    for entry in entries:
        assert entry.inline is not None
        if state_of(directory_fd, entry) == "same" and holds(directory_fd, entry):
            continue
        part = entry.name + PART_SUFFIX
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part, dir_fd=directory_fd)
            fd = os.open(part, FILE_CREATE, 0o600, dir_fd=directory_fd)
            try:
                view = memoryview(entry.inline)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, (entry.mode or 0o644) & ~umask)
            finally:
                os.close(fd)
            os.replace(part, entry.name, src_dir_fd=directory_fd, dst_dir_fd=directory_fd)
            set_mtime(directory_fd, entry)
        except OSError as exc:
            raise OutputError(f"cannot write {entry.name}: {exc.strerror or exc}") from None
        written += 1
    return written


def make_link(directory_fd: int, link: DirEntry) -> bool:
    """Create a symbolic link as published (replacing what is at its name); False if
    the same link is already there."""
    assert link.target is not None
    if state_of(directory_fd, link) == "same":
        return False
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link.name, dir_fd=directory_fd)
        os.symlink(link.target, link.name, dir_fd=directory_fd)
        set_mtime(directory_fd, link)
    except OSError as exc:
        raise OutputError(f"cannot create link {link.name}: {exc.strerror or exc}") from None
    return True


__all__ = [
    "DIRECTORY_OPEN",
    "TargetRules",
    "disk_states",
    "free_space",
    "make_link",
    "open_below",
    "probe_target",
    "set_mtime_at",
    "state_of",
    "sync_tree",
    "to_part",
    "write_inline_files",
]
