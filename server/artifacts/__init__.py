"""Artifact stores: one module per URI scheme behind `server.artifacts.base.ArtifactRepository`.

`repository_for` maps `--artifacts-destination` to a store. Store modules are imported only when their
scheme is used, so a server on local files never loads a cloud SDK.
"""

from __future__ import annotations

import importlib
import os
from urllib.parse import urlsplit
from urllib.request import url2pathname

from server.artifacts.base import ArtifactRepository, FileInfo, safe_relative_path
from server.errors import RunyardError

__all__ = ["ArtifactRepository", "FileInfo", "repository_for", "safe_relative_path"]

# One module per store; each exposes `open_repository(uri) -> ArtifactRepository`, reading its
# credentials and endpoints from the environment (MLflow's variable names) when called.
STORE_MODULES = {
    "s3": "server.artifacts.s3",
    "wasbs": "server.artifacts.azure", "wasb": "server.artifacts.azure",
    "abfss": "server.artifacts.azure", "abfs": "server.artifacts.azure",
    "gs": "server.artifacts.gcs",
    "ftp": "server.artifacts.ftp", "ftps": "server.artifacts.ftp",
    "sftp": "server.artifacts.sftp",
    "hdfs": "server.artifacts.hdfs", "viewfs": "server.artifacts.hdfs",
}
# The SDK a store needs when it is an optional extra of the distribution.
EXTRAS = {"azure": "azure", "google": "gcs", "gssapi": "kerberos"}


def repository_for(uri: str) -> ArtifactRepository:
    """The store behind `uri`: a plain path or `file:` URI is a local folder (relative to the CWD)."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "" or len(scheme) == 1:  # "mlartifacts", "/srv/a", or a Windows drive "C:\\a"
        from server.artifacts.local import LocalArtifactRepository

        return LocalArtifactRepository(os.path.abspath(uri))
    if scheme == "file":
        from server.artifacts.local import LocalArtifactRepository

        return LocalArtifactRepository(_file_uri_path(uri))
    if scheme not in STORE_MODULES:
        # Name only the scheme: the rest of the URI may carry credentials (ftp://user:pass@host).
        raise RunyardError(f"Artifact store scheme '{scheme}' is not supported; use a local path, file:, "
                           f"{', '.join(sorted(STORE_MODULES))}.", "INVALID_STATE")
    try:
        module = importlib.import_module(STORE_MODULES[scheme])
    except ModuleNotFoundError as exc:
        root = (exc.name or "").split(".")[0]
        if root not in EXTRAS:
            raise
        raise RunyardError(f"Artifact store scheme '{scheme}' needs the {root} SDK: "
                           f"pip install 'runyard[{EXTRAS[root]}]'", "INVALID_STATE") from None
    return module.open_repository(uri)


def _file_uri_path(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise RunyardError(
            "A file: artifact URI must name a local path (file:///path), not a remote host.",
            "INVALID_STATE")
    path = url2pathname(parts.path)
    return os.path.abspath(path or ".")
