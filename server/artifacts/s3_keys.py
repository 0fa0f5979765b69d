"""S3 access keys from a file the server watches (`RUNYARD_S3_CREDENTIALS_FILE`), for key rotation without
a restart: `runyard rotate s3-keys` writes the new key there, and the next request is signed with it.

The file holds IAM's own shape, `{"AccessKeyId": "…", "SecretAccessKey": "…"}` (optionally
"SessionToken"), as CreateAccessKey returns it and as a Secrets Manager secret would hold it. botocore
asks its credentials object for a frozen copy before signing each request; this one re-reads the file
only when its stat signature changes, so a request costs one stat.
"""

from __future__ import annotations

import json
import logging
import os
import threading

from botocore.credentials import CredentialProvider, Credentials, ReadOnlyCredentials

from server.errors import RunyardError

log = logging.getLogger("runyard.server")

CREDENTIALS_FILE_ENV = "RUNYARD_S3_CREDENTIALS_FILE"


def _signature(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def read_keys(path: str) -> ReadOnlyCredentials:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
        keys = ReadOnlyCredentials(data["AccessKeyId"], data["SecretAccessKey"], data.get("SessionToken"),
                                   None)
    except OSError as exc:
        raise RunyardError(f"Cannot read the S3 credentials file {path}: {exc.strerror}",
                           "INVALID_STATE") from None
    except (ValueError, KeyError, TypeError):
        raise RunyardError(f"The S3 credentials file {path} must hold a JSON object with AccessKeyId and "
                           "SecretAccessKey.", "INVALID_STATE") from None
    if not keys.access_key or not keys.secret_key:
        raise RunyardError(f"The S3 credentials file {path} has an empty key.", "INVALID_STATE")
    return keys


class WatchedFileCredentials(Credentials):
    def __init__(self, path: str):
        self._path = path
        self._lock = threading.Lock()
        self._frozen = read_keys(path)
        self._seen = _signature(path)
        super().__init__(self._frozen.access_key, self._frozen.secret_key, self._frozen.token,
                         method="runyard-credentials-file")

    def get_frozen_credentials(self) -> ReadOnlyCredentials:
        signature = _signature(self._path)
        if signature != self._seen:
            with self._lock:
                try:
                    self._frozen = read_keys(self._path)
                    self.access_key, self.secret_key, self.token = self._frozen[:3]
                    log.info("S3 credentials file changed: now signing with key %s…",
                             self._frozen.access_key[:8])
                except RunyardError as exc:  # half-written by hand, or gone: keep the last good key
                    log.error("%s; still signing with the previous key", exc.message)
                self._seen = signature
        return self._frozen

    def current_secrets(self) -> tuple[str | None, ...]:
        return self._frozen.secret_key, self._frozen.token


class WatchedFileProvider(CredentialProvider):
    METHOD = "runyard-credentials-file"
    CANONICAL_NAME = "RunyardCredentialsFile"

    def __init__(self, path: str):
        super().__init__()
        self.credentials = WatchedFileCredentials(path)

    def load(self) -> Credentials:
        return self.credentials
