"""Artifacts in a local folder (or an NFS/EFS mount shared by several replicas).

Containment: every path is resolved with symlinks followed and must land inside the (resolved) root, so
a link inside the root that points elsewhere is never followed — for read, write, list or delete. Links
that stay inside the root work as ordinary files and folders.

Writes go to a temporary file next to the target, are fsynced and then renamed into place: a reader on
any replica sees the old file or the whole new one. Blocking calls run in worker threads, one hop per
MiB, so a multi-GB transfer neither holds memory nor stalls the event loop.
"""

from __future__ import annotations

import errno
import os
import posixpath
import shutil
import stat
import uuid
from collections.abc import AsyncIterable

from anyio import to_thread

from server.artifacts.base import (
    CHUNK_SIZE,
    ArtifactRepository,
    FileInfo,
    ReadStream,
    rebatch,
    safe_file_path,
    safe_relative_path,
)
from server.errors import invalid, not_found

# In-flight uploads live next to their target under this prefix; listings hide them.
TMP_PREFIX = ".runyard-upload-"

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _within(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _missing(relative: str):
    return not_found(f"Artifact '{relative}' does not exist.")


class LocalArtifactRepository(ArtifactRepository):
    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(os.fspath(root))
        self.description = f"local folder {self.root}"

    # -- path resolution ---------------------------------------------------------------------------

    def _real_root(self) -> str:
        return os.path.realpath(self.root)

    def _resolve(self, relative: str) -> str:
        """The real path of `relative` (checked, symlinks followed); INVALID when it leaves the root."""
        relative = safe_relative_path(relative)
        root = self._real_root()
        real = os.path.realpath(os.path.join(root, relative)) if relative else root
        if not _within(root, real):
            raise invalid("Invalid path")
        return real

    # -- listing and stat --------------------------------------------------------------------------

    async def list_dir(self, path: str) -> list[FileInfo]:
        return await to_thread.run_sync(self._list_dir, path)

    def _list_dir(self, path: str) -> list[FileInfo]:
        directory = self._resolve(path)
        root = self._real_root()
        try:
            with os.scandir(directory) as scan:
                entries = list(scan)
        except (FileNotFoundError, NotADirectoryError):
            return []
        infos = []
        for entry in entries:
            if entry.name.startswith(TMP_PREFIX):
                continue
            try:
                if entry.is_symlink() and not _within(root, os.path.realpath(entry.path)):
                    continue  # never show (or stat through) a link that leads out of the root
                st = os.stat(entry.path)
            except OSError:  # dangling link, vanished meanwhile
                continue
            if stat.S_ISDIR(st.st_mode):
                infos.append(FileInfo(entry.name, True))
            elif stat.S_ISREG(st.st_mode):
                infos.append(FileInfo(entry.name, False, st.st_size))
        return sorted(infos, key=lambda info: info.name)

    async def stat(self, path: str) -> FileInfo | None:
        return await to_thread.run_sync(self._stat, path)

    def _stat(self, path: str) -> FileInfo | None:
        real = self._resolve(path)
        try:
            st = os.stat(real)
        except (FileNotFoundError, NotADirectoryError):
            return None
        name = posixpath.basename(safe_relative_path(path))
        if stat.S_ISDIR(st.st_mode):
            return FileInfo(name, True)
        if stat.S_ISREG(st.st_mode):
            return FileInfo(name, False, st.st_size)
        return None  # sockets, fifos, devices are not artifacts

    # -- read --------------------------------------------------------------------------------------

    async def open_read(self, path: str, offset: int = 0, length: int | None = None) -> ReadStream:
        fd, total = await to_thread.run_sync(self._open, path)
        start = min(max(offset, 0), total)
        end = total if length is None else min(total, start + max(length, 0))
        closed = False

        def close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                os.close(fd)

        async def chunks():
            position = start
            try:
                while position < end:
                    data = await to_thread.run_sync(os.pread, fd, min(CHUNK_SIZE, end - position), position)
                    if not data:
                        break
                    position += len(data)
                    yield data
            finally:
                close()

        async def aclose() -> None:
            close()

        return ReadStream(end - start, total, chunks(), aclose)

    def _open(self, path: str) -> tuple[int, int]:
        relative = safe_relative_path(path)
        real = self._resolve(relative)
        try:
            # The path is fully resolved, so O_NOFOLLOW only trips if a link was swapped in meanwhile;
            # O_NONBLOCK keeps a stray fifo from hanging the worker thread.
            fd = os.open(real, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
        except (FileNotFoundError, NotADirectoryError):
            raise _missing(relative) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise invalid("Invalid path") from None
            raise
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return fd, st.st_size
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise invalid(f"Artifact path refers to a directory, not a file: '{relative}'")
        raise _missing(relative)

    # -- write -------------------------------------------------------------------------------------

    async def write(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        relative = safe_file_path(path)
        pending_file = await to_thread.run_sync(self._begin_write, relative)
        written = 0
        try:
            async for block in rebatch(chunks):
                await to_thread.run_sync(pending_file.write, block)
                written += len(block)
            await to_thread.run_sync(pending_file.commit)
        except BaseException:
            # Cancelled or failed mid-upload: drop the temporary file; the old file (if any) stays.
            # Synchronous on purpose: a cancelled task cannot await another thread hop.
            pending_file.discard()
            raise
        return written

    def _begin_write(self, relative: str) -> _PendingFile:
        try:
            os.makedirs(self.root, exist_ok=True)  # the root appears with the first upload
            parent = self._resolve(posixpath.dirname(relative))
            try:
                os.makedirs(parent, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise invalid(f"Invalid path: a parent of '{relative}' is a file, not a folder") from None
            target = self._resolve(relative)  # follows a link that stays inside, refuses one leading out
            try:  # also surfaces a too-long name now rather than at the rename, after the whole body
                if stat.S_ISDIR(os.stat(target).st_mode):
                    raise invalid(f"Invalid path: '{relative}' is a folder")
            except FileNotFoundError:
                pass
            temporary = os.path.join(os.path.dirname(target), f"{TMP_PREFIX}{uuid.uuid4().hex}")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o666)
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise invalid("Invalid path: a name is too long for the artifact store") from None
            raise
        return _PendingFile(fd, temporary, target)

    # -- delete ------------------------------------------------------------------------------------

    async def delete(self, path: str) -> bool:
        return await to_thread.run_sync(self._delete, path)

    def _delete(self, path: str) -> bool:
        relative = safe_relative_path(path)
        if not relative:
            raise invalid("Invalid path: the artifact root itself cannot be deleted")
        parent_relative, name = posixpath.split(relative)
        target = os.path.join(self._resolve(parent_relative), name)
        try:
            st = os.lstat(target)
        except (FileNotFoundError, NotADirectoryError):
            return False
        if stat.S_ISLNK(st.st_mode):
            if not _within(self._real_root(), os.path.realpath(target)):
                raise invalid("Invalid path")
            os.unlink(target)  # the link itself; what it points to belongs to someone else too
        elif stat.S_ISDIR(st.st_mode):
            shutil.rmtree(target)  # removes links inside the tree without following them
        else:
            os.unlink(target)
        return True


class _PendingFile:
    """An upload in progress: a temporary file that becomes `target` on commit or vanishes on discard."""

    def __init__(self, fd: int, temporary: str, target: str):
        self.fd: int | None = fd
        self.temporary = temporary
        self.target = target

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def commit(self) -> None:
        os.fsync(self.fd)
        self._close()
        try:
            os.replace(self.temporary, self.target)
        except IsADirectoryError:
            raise invalid("Invalid path: the target became a folder during the upload") from None
        self.temporary = None
        _fsync_directory(os.path.dirname(self.target))

    def discard(self) -> None:
        self._close()
        if self.temporary is not None:
            try:
                os.unlink(self.temporary)
            except FileNotFoundError:
                pass
            self.temporary = None

    def _close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable; not every filesystem (or OS) allows it, so best effort.
    try:
        fd = os.open(directory, os.O_RDONLY | _O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
