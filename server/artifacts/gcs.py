"""Artifacts in Google Cloud Storage: `gs://bucket/path`, with google-cloud-storage.

Credentials come the library's usual way (GOOGLE_APPLICATION_CREDENTIALS, else Application Default
Credentials); STORAGE_EMULATOR_HOST points it at an emulator such as fake-gcs-server.

Folders are name prefixes ending in '/'. A body that fits in one UPLOAD_CHUNK_SIZE goes up in one request;
a larger one is a resumable upload sent chunk by chunk, which GCS finalises only with the last chunk,
the one that states the total size: readers see the old object until then, and a body that fails is never
finalised (the session is cancelled; GCS would drop it after a week anyway).
"""

from __future__ import annotations

import os
import posixpath
import threading
from collections.abc import AsyncIterable, Callable
from functools import partial
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

import requests
from anyio import CancelScope, to_thread
from google.api_core.exceptions import GoogleAPICallError, NotFound, RetryError
from google.auth.credentials import AnonymousCredentials
from google.auth.exceptions import GoogleAuthError
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY

from server.artifacts.base import (
    CHUNK_SIZE,
    ArtifactRepository,
    FileInfo,
    ReadStream,
    safe_file_path,
    safe_relative_path,
    store_failure,
)
from server.errors import RunyardError, invalid, not_found

UPLOAD_CHUNK_SIZE = 8 * 1024 * 1024  # resumable chunks must be multiples of 256 KiB
_TIMEOUT = (10, 120)  # connect, read (seconds)
# The library retries transient failures for 120 s by default: too long for a client waiting on the proxy
# (which retries itself). 10 s still rides out a brief hiccup.
_RETRY = DEFAULT_RETRY.with_timeout(10.0)
_T = TypeVar("_T")


def open_repository(uri: str) -> GCSArtifactRepository:
    return GCSArtifactRepository(uri)


def _client() -> storage.Client:
    if os.environ.get("STORAGE_EMULATOR_HOST") and not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        # An emulator checks no credentials. Anonymous ones spare the search for Application Default
        # Credentials (which fails, or probes a metadata server for seconds, off Google Cloud). Recent
        # library versions do this themselves; saying it here keeps it so whatever the version.
        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or "test",
                              credentials=AnonymousCredentials())
    # Reading and writing objects needs no project: None skips the library's project discovery, which
    # fails for credentials that carry none.
    return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT"))


class _UploadRefused(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(f"resumable upload answered HTTP {status}: {text[:300]}")
        self.status = status


class GCSArtifactRepository(ArtifactRepository):
    def __init__(self, uri: str):
        parts = urlsplit(uri)
        if parts.scheme.lower() != "gs" or not parts.netloc:
            raise RunyardError("Not a Google Cloud Storage URI (expected gs://<bucket>/<path>)",
                               "INVALID_STATE")
        self.bucket_name = parts.netloc
        self.prefix = "/".join(part for part in parts.path.split("/") if part)
        self.description = f"gs://{self.bucket_name}/{self.prefix}"
        self._storage: storage.Client | None = None
        self._lock = threading.Lock()
        self._http = requests.Session()  # for the chunks of resumable uploads

    # -- helpers -----------------------------------------------------------------------------------

    def _key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix and relative else self.prefix or relative

    @property
    def client(self) -> storage.Client:
        # Made on first use, in a worker thread: finding credentials may query a metadata server.
        with self._lock:
            if self._storage is None:
                self._storage = _client()
            return self._storage

    def _bucket(self) -> storage.Bucket:
        return self.client.bucket(self.bucket_name)

    async def _run(self, function: Callable[..., _T], *args, secrets: tuple[str, ...] = (), **kwargs) -> _T:
        """`function` in a worker thread, with the library's failures turned into store_failure."""
        try:
            return await to_thread.run_sync(partial(function, *args, **kwargs))
        except GoogleAPICallError as exc:  # NotFound (bucket), Forbidden, ServiceUnavailable, …
            code = exc.code or 0
            reason, unreachable = f"{exc.message} (HTTP {code})", code >= 500 or code == 429
        except _UploadRefused as exc:
            reason, unreachable = str(exc), exc.status >= 500 or exc.status == 429
        except (RetryError, requests.RequestException) as exc:  # retries exhausted, connection failed
            reason, unreachable = str(getattr(exc, "cause", None) or exc), True
        except GoogleAuthError as exc:  # no or unusable credentials
            reason, unreachable = str(exc), False
        # Raised outside the except blocks, so the library's exception is not chained into logs.
        raise store_failure(self.description, reason, secrets, unreachable=unreachable)

    def _has_children(self, key: str) -> bool:
        blobs = self.client.list_blobs(self.bucket_name, prefix=f"{key}/" if key else "", max_results=1,
                                       timeout=_TIMEOUT, retry=_RETRY)
        return next(iter(blobs), None) is not None

    # -- listing and stat --------------------------------------------------------------------------

    async def list_dir(self, path: str) -> list[FileInfo]:
        key = self._key(safe_relative_path(path))
        return await self._run(self._list_dir, f"{key}/" if key else "")

    def _list_dir(self, prefix: str) -> list[FileInfo]:
        listing = self.client.list_blobs(self.bucket_name, prefix=prefix, delimiter="/", timeout=_TIMEOUT,
                                         retry=_RETRY)
        entries = {}
        for blob in listing:  # the folders (`listing.prefixes`) are known once every page has been read
            name = blob.name[len(prefix):]
            if name:  # not a "folder/" placeholder object some tools create
                entries[name] = FileInfo(name, False, blob.size)
        for folder in listing.prefixes:
            name = folder[len(prefix):].rstrip("/")
            if name:
                entries[name] = FileInfo(name, True)
        return sorted(entries.values(), key=lambda info: info.name)

    async def stat(self, path: str) -> FileInfo | None:
        relative = safe_relative_path(path)
        return await self._run(self._stat, relative)

    def _stat(self, relative: str) -> FileInfo | None:
        key, name = self._key(relative), posixpath.basename(relative)
        blob = self._bucket().get_blob(key, timeout=_TIMEOUT, retry=_RETRY) if relative else None
        if blob is not None:
            return FileInfo(name, False, blob.size)
        return FileInfo(name, True) if self._has_children(key) else None

    # -- read --------------------------------------------------------------------------------------

    async def open_read(self, path: str, offset: int = 0, length: int | None = None) -> ReadStream:
        relative = safe_relative_path(path)
        blob = await self._run(self._readable, relative)
        total = blob.size
        start = min(max(offset, 0), total)
        end = total if length is None else min(total, start + max(length, 0))

        def read(position: int, size: int) -> bytes:
            # Pinned to the generation stat saw: an object replaced mid-read fails, never mixes. Raw bytes,
            # as stored and as counted by `size` (no decompressive transcoding of gzip-encoded objects).
            return blob.download_as_bytes(start=position, end=position + size - 1, raw_download=True,
                                          if_generation_match=blob.generation, checksum=None,
                                          timeout=_TIMEOUT, retry=_RETRY)

        async def chunks():
            position = start
            while position < end:
                data = await self._run(read, position, min(CHUNK_SIZE, end - position))
                if not data:
                    break
                position += len(data)
                yield data

        return ReadStream(end - start, total, chunks())

    def _readable(self, relative: str) -> storage.Blob:
        key = self._key(relative)
        blob = self._bucket().get_blob(key, timeout=_TIMEOUT, retry=_RETRY) if relative else None
        if blob is not None:
            return blob
        if self._has_children(key):
            raise invalid(f"Artifact path refers to a directory, not a file: '{relative}'")
        raise not_found(f"Artifact '{relative}' does not exist.")

    # -- write -------------------------------------------------------------------------------------

    async def write(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        relative = safe_file_path(path)
        key = self._key(relative)
        if await self._run(self._has_children, key):
            raise invalid(f"Invalid path: '{relative}' is a folder")
        upload: _ResumableUpload | None = None
        buffer = bytearray()
        written = 0
        try:
            async for chunk in chunks:
                buffer += chunk
                written += len(chunk)
                # Strictly more than a chunk: the last request must carry bytes and the total size.
                while len(buffer) > UPLOAD_CHUNK_SIZE:
                    if upload is None:
                        upload = await self._run(self._start_upload, key)
                    piece = bytes(buffer[:UPLOAD_CHUNK_SIZE])
                    del buffer[:UPLOAD_CHUNK_SIZE]
                    await self._run(upload.send, piece, False, secrets=upload.secrets)
            if upload is None:  # small: one request, atomic on its own
                await self._run(self._upload_small, key, bytes(buffer))
            else:
                await self._run(upload.send, bytes(buffer), True, secrets=upload.secrets)
        except BaseException:
            if upload is not None and not upload.finished:
                with CancelScope(shield=True):  # one short request, even when the task is being cancelled
                    await to_thread.run_sync(upload.cancel)
            raise
        return written

    def _upload_small(self, key: str, data: bytes) -> None:
        self._bucket().blob(key).upload_from_string(data, content_type="application/octet-stream",
                                                    timeout=_TIMEOUT)

    def _start_upload(self, key: str) -> _ResumableUpload:
        url = self._bucket().blob(key).create_resumable_upload_session(
            content_type="application/octet-stream", client=self.client, checksum=None, timeout=_TIMEOUT,
            retry=_RETRY)
        return _ResumableUpload(url, self._http)

    # -- delete ------------------------------------------------------------------------------------

    async def delete(self, path: str) -> bool:
        relative = safe_relative_path(path)
        if not relative:
            raise invalid("Invalid path: the artifact root itself cannot be deleted")
        return await self._run(self._delete, self._key(relative))

    def _delete(self, key: str) -> bool:
        below = self.client.list_blobs(self.bucket_name, prefix=f"{key}/", timeout=_TIMEOUT, retry=_RETRY)
        bucket, deleted = self._bucket(), False
        for name in [*(blob.name for blob in below), key]:
            try:
                bucket.delete_blob(name, timeout=_TIMEOUT, retry=_RETRY)
                deleted = True
            except NotFound:  # the bucket exists (it was just listed): someone else deleted the object
                pass
        return deleted

    async def aclose(self) -> None:
        def close() -> None:
            self._http.close()
            if self._storage is not None:
                self._storage.close()

        await to_thread.run_sync(close)


class _ResumableUpload:
    """One resumable upload session, spoken directly (the JSON API's documented protocol). The library's
    BlobWriter would do, except that its close(), which also runs when it is garbage-collected after an
    error, finalises whatever part of the body it got."""

    def __init__(self, url: str, http: requests.Session):
        self.url, self._http = url, http
        # The session URL lets anyone holding it write the object: never in an error message.
        self.secrets = (url, *parse_qs(urlsplit(url).query).get("upload_id", []))
        self.offset = 0  # bytes GCS has persisted
        self.finished = False

    def send(self, data: bytes, final: bool) -> None:
        while True:
            end = self.offset + len(data)
            span = f"{self.offset}-{end - 1}" if data else "*"
            response = self._http.put(self.url, data=data, timeout=_TIMEOUT,
                                      headers={"Content-Range": f"bytes {span}/{end if final else '*'}"})
            if final and response.status_code in (200, 201):
                self.offset, self.finished = end, True
                return
            if response.status_code != 308:
                raise _UploadRefused(response.status_code, response.text)
            # GCS may persist fewer bytes than it was sent; its Range header says how many: resend the rest.
            persisted_range = response.headers.get("Range")  # "bytes=0-<last>"
            persisted = int(persisted_range.rsplit("-", 1)[1]) + 1 if persisted_range else 0
            if not self.offset < persisted <= end:  # no progress: give up rather than loop
                raise _UploadRefused(308, f"{persisted} of {end} bytes persisted")
            data, self.offset = data[persisted - self.offset:], persisted
            if not data and not final:
                return

    def cancel(self) -> None:
        try:
            self._http.delete(self.url, timeout=(5, 5))
        except requests.RequestException:
            pass  # never finalised either way; GCS drops the session within a week
