"""Small pieces for files the toolkit rewrites in place (htpasswd files, secret files)."""

from __future__ import annotations

import errno
import os
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


def os_error(action: str, path: Path, exc: OSError) -> RunyardError:
    """An OSError as the RunyardError a CLI prints: `<action> <path>: <reason>`, with a fitting code."""
    code = {errno.EACCES: "PERMISSION_DENIED", errno.EPERM: "PERMISSION_DENIED",
            errno.ENOENT: "RESOURCE_DOES_NOT_EXIST"}.get(exc.errno or 0, "INVALID_STATE")
    return RunyardError(f"{action} {path}: {exc.strerror or exc}", code)
