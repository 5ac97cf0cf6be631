"""The FUSE operations of a read-only mount (pyfuse3 in asyncio mode).

The only module that imports pyfuse3. Each handler answers from the
``Tree`` (metadata: directory and manifest nodes) or a ``FileView``
(bytes: only the chunks a read touches) and never blocks the event loop:
hashing, decryption and file I/O run in the network's worker threads.

Every error inside a handler becomes an errno here, never an exception
that would end pyfuse3's main loop and leave a dead mount: a chunk no
holder can supply is EIO with a log line naming it, a name that is not
there ENOENT, a write attempt EROFS, and anything unexpected EIO with its
trace in the log.

Attributes: modes as published (permission bits only, write bits removed:
the mount is read-only), owned by the user who mounted, sizes and mtimes as
published; ``st_blksize`` is the chunk size, so readers ask for whole
chunks. The content never changes, so the kernel may cache attributes,
entries and pages for as long as it likes (``keep_cache``).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from dht_dfs.core.direntry import EntryKind
from dht_dfs.core.errors import ChunkNotFoundError, DhtfsError
from dht_dfs.fs.files import ReadState
from dht_dfs.fs.tree import ROOT_INODE, Inode, Tree

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

CACHE_SECONDS = 3600.0
"""How long the kernel may keep attributes and entries (the tree never changes)."""
_NAME_MAX = 255
_MAX_SIZE = (1 << 63) - 1
"""st_size is signed: a publisher's larger size is shown clamped (reads stop at the real end)."""


def _errno(
    handler: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turn whatever ``handler`` raises into a ``FUSEError`` with an errno."""

    @functools.wraps(handler)
    async def wrapped(*args: P.args, **kwargs: P.kwargs) -> T:
        active: set[asyncio.Task[Any]] = args[0]._active  # type: ignore[attr-defined]
        task = asyncio.current_task()
        if task is not None:
            active.add(task)
        try:
            return await handler(*args, **kwargs)
        except asyncio.CancelledError:
            # The mount is ending (``end_handlers``): answer now, while the
            # FUSE session still exists; a late answer would use a freed one.
            raise pyfuse3.FUSEError(errno.EINTR) from None
        except pyfuse3.FUSEError:
            raise
        except ChunkNotFoundError as error:
            problem = f"{error} (the read fails with EIO)"
        except DhtfsError as error:
            problem = f"{handler.__name__}: {error}"
        except Exception:
            log.exception("mount: %s failed unexpectedly", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            if task is not None:
                active.discard(task)
        log.error("mount: %s", problem)
        raise pyfuse3.FUSEError(errno.EIO)

    return wrapped


class MountOperations(pyfuse3.Operations):
    """pyfuse3's handlers over a ``Tree`` (see the module docstring)."""

    enable_writeback_cache = False

    def __init__(self, tree: Tree, *, block_size: int) -> None:
        super().__init__()
        self._tree = tree
        self._block_size = block_size
        self._uid, self._gid = os.getuid(), os.getgid()
        self._active: set[asyncio.Task[Any]] = set()
        """Handlers running now (``_errno`` keeps it), ended before the session goes."""
        self._handles: dict[int, tuple[Inode, ReadState]] = {}
        self._dir_handles: dict[int, Inode] = {}
        self._next_handle = 1
        self.reads = 0
        self.bytes_read = 0
        self.largest_read = 0
        """The largest read the kernel asked for (its read size, set by libfuse)."""

    # --- metadata ---------------------------------------------------------------------

    def _inode(self, number: int) -> Inode:
        inode = self._tree.get(number)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return inode

    def _attributes(self, inode: Inode) -> pyfuse3.EntryAttributes:
        entry = inode.entry
        attributes = pyfuse3.EntryAttributes()
        attributes.st_ino = pyfuse3.InodeT(inode.number)
        if entry is None:  # the directory holding a mounted file
            attributes.st_mode = pyfuse3.ModeT(stat.S_IFDIR | 0o555)
            attributes.st_nlink = 2
            attributes.st_uid, attributes.st_gid = self._uid, self._gid
            attributes.attr_timeout = attributes.entry_timeout = CACHE_SECONDS
            return attributes
        permissions = entry.mode & 0o555
        if entry.kind is EntryKind.DIRECTORY:
            attributes.st_mode = pyfuse3.ModeT(stat.S_IFDIR | permissions | 0o500)
            attributes.st_nlink = 2
            attributes.st_size = 0
        elif entry.kind is EntryKind.SYMLINK:
            attributes.st_mode = pyfuse3.ModeT(stat.S_IFLNK | 0o777)
            attributes.st_nlink = 1
            attributes.st_size = len((entry.target or "").encode("utf-8", "surrogateescape"))
        else:
            # The owner may always read: a published 0o000 would hide the bytes.
            attributes.st_mode = pyfuse3.ModeT(stat.S_IFREG | permissions | 0o400)
            attributes.st_nlink = 1
            attributes.st_size = min(entry.size, _MAX_SIZE)
        attributes.st_uid = self._uid
        attributes.st_gid = self._gid
        attributes.st_blksize = self._block_size
        attributes.st_blocks = min(_MAX_SIZE, (attributes.st_size + 511) // 512)
        mtime = max(0, entry.mtime_ns)
        mtime = min(mtime, _MAX_SIZE)
        attributes.st_mtime_ns = attributes.st_ctime_ns = attributes.st_atime_ns = mtime
        attributes.attr_timeout = attributes.entry_timeout = CACHE_SECONDS
        return attributes

    @_errno
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attributes(self._inode(inode))

    @_errno
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_inode)
        if not parent.is_directory:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._attributes(parent)
        if name == b"..":
            return self._attributes(self._inode(parent.parent))
        found = await self._tree.lookup(parent, name)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(found)

    @_errno
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        entry = self._inode(inode).entry
        if entry is None or entry.kind is not EntryKind.SYMLINK or entry.target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return entry.target.encode("utf-8", "surrogateescape")

    @_errno
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        directory = self._inode(inode)
        if not directory.is_directory:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        await self._tree.children(directory)  # listed now: a bad node fails opendir
        handle = self._new_handle()
        self._dir_handles[handle] = directory
        return pyfuse3.FileHandleT(handle)

    @_errno
    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: Any) -> None:
        directory = self._dir_handles.get(fh)
        if directory is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        await self._tree.children(directory)
        children = directory.names or []
        for position in range(start_id, len(children)):
            name, number = children[position]
            attributes = self._attributes(self._inode(number))
            if not pyfuse3.readdir_reply(token, name, attributes, position + 1):
                return

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self._dir_handles.pop(fh, None)

    @_errno
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = self._block_size
        data.f_blocks = (self._tree.total_size + self._block_size - 1) // self._block_size
        data.f_bfree = data.f_bavail = 0
        data.f_files = self._tree.entries + 1
        data.f_ffree = data.f_favail = 0
        data.f_namemax = _NAME_MAX
        return data

    # --- reading ---------------------------------------------------------------------

    def _new_handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    @_errno
    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        node = self._inode(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.entry is None or node.entry.kind is not EntryKind.FILE:
            raise pyfuse3.FUSEError(errno.EISDIR if node.is_directory else errno.EINVAL)
        state = await self._tree.file(node).open()
        handle = self._new_handle()
        self._handles[handle] = (node, state)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(handle), keep_cache=True)

    @_errno
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        opened = self._handles.get(fh)
        if opened is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        node, state = opened
        data = await self._tree.file(node).read(off, size, state)
        self.reads += 1
        self.bytes_read += len(data)
        self.largest_read = max(self.largest_read, size)
        return data

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        opened = self._handles.pop(fh, None)
        if opened is not None:
            await opened[1].close()

    async def end_handlers(self) -> None:
        """Make every handler still waiting (on the network, say) answer EINTR now;
        the caller bounds the wait."""
        tasks = list(self._active)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """End every open file's read-ahead (the mount is going away)."""
        for _, state in self._handles.values():
            await state.close()
        self._handles.clear()

    # --- a read-only file system -------------------------------------------------------

    async def access(self, inode: pyfuse3.InodeT, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return not mode & os.W_OK

    # No getxattr or listxattr: pyfuse3's default answers ENOSYS, after which
    # the kernel stops asking, where ENODATA would cost a round trip for every
    # file ``ls -l`` shows (it asks each for ACLs).

    async def forget(self, inode_list: Any) -> None:
        # Inodes are kept for the mount's life: the tree is immutable, and a
        # number must keep naming the same entry.
        return None


__all__ = ["ROOT_INODE", "MountOperations"]
