"""Small pieces for files the toolkit rewrites in place (htpasswd, secrets, certificates, nginx.conf)."""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from server.errors import RunyardError


def fsync_dir(directory: Path) -> None:
    """Makes a rename in `directory` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself has happened
    finally:
        os.close(fd)


class FolderNotWritable(OSError):
    """The temporary file beside the target could not be created: nothing was written."""


def replace_atomically(target: Path, data: bytes, prepare: Callable[[int], None] | None = None,
                       check: Callable[[Path], None] | None = None) -> None:
    """Replaces `target` so that readers see the old file or the whole new one, never a part of either.

    A temporary file beside it is created 0600 (the umask can only take bits away) and handed to
    `prepare(fd)` to set owner and mode before any byte is written; then the data, fsync, `check(path)` of
    the finished temporary file, the rename and an fsync of the folder. On any failure the temporary file
    is removed and the error raised (FolderNotWritable when it could not even be created)."""
    temp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise FolderNotWritable(exc.errno, exc.strerror, exc.filename) from None
    try:
        try:
            if prepare is not None:
                prepare(fd)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if check is not None:
            check(temp)
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    fsync_dir(target.parent)


def os_error(action: str, path: Path, exc: OSError) -> RunyardError:
    """An OSError as the RunyardError a CLI prints: `<action> <path>: <reason>`, with a fitting code."""
    code = {errno.EACCES: "PERMISSION_DENIED", errno.EPERM: "PERMISSION_DENIED",
            errno.ENOENT: "RESOURCE_DOES_NOT_EXIST"}.get(exc.errno or 0, "INVALID_STATE")
    return RunyardError(f"{action} {path}: {exc.strerror or exc}", code)
