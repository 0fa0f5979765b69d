"""Artifact stores: one module per URI scheme behind `server.artifacts.base.ArtifactRepository`.

`repository_for` maps `--artifacts-destination` to a store. Store modules are imported only when their
scheme is used, so a server on local files never loads a cloud SDK.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit
from urllib.request import url2pathname

from server.artifacts.base import ArtifactRepository, FileInfo, safe_relative_path
from server.errors import RunyardError

__all__ = ["ArtifactRepository", "FileInfo", "repository_for", "safe_relative_path"]

# Schemes the interface is designed for (issue 4) but which have no module yet.
PLANNED_SCHEMES = ("s3", "r2", "b2", "gs", "wasbs", "abfss", "hdfs", "viewfs", "ftp", "ftps", "sftp")


def repository_for(uri: str) -> ArtifactRepository:
    """The store behind `uri`: a plain path or `file:` URI is a local folder (relative to the CWD)."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "" or len(scheme) == 1:  # "mlartifacts", "/srv/a", or a Windows drive "C:\\a"
        from server.artifacts.local import LocalArtifactRepository

        return LocalArtifactRepository(os.path.abspath(uri))
    if scheme == "file":
        from server.artifacts.local import LocalArtifactRepository

        return LocalArtifactRepository(_file_uri_path(uri))
    # Name only the scheme: the rest of the URI may carry credentials (ftp://user:pass@host).
    hint = " yet" if scheme in PLANNED_SCHEMES else ""
    raise RunyardError(
        f"Artifact store scheme '{scheme}' is not supported{hint}; use a local path or a file: URI.",
        "INVALID_STATE")


def _file_uri_path(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise RunyardError(
            "A file: artifact URI must name a local path (file:///path), not a remote host.",
            "INVALID_STATE")
    path = url2pathname(parts.path)
    return os.path.abspath(path or ".")
