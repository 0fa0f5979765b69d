"""The one interface every artifact store implements, and the path rules every store relies on.

Paths handed to a store are relative, '/'-separated and already checked by `safe_relative_path`; a store
still re-checks (it must never trust its caller to keep it inside its root). Methods are async because
the HTTP layer is: a store whose client library blocks (local files, boto3, ftplib, …) hops to a worker
thread inside the method, in chunks, so one large transfer never stalls the event loop.

Optional capabilities (multipart upload, presigned download) default to "not supported"; the proxy
answers 501 for them and the stock client falls back to plain PUT / proxied GET.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import unquote

from server.errors import RunyardError, invalid

CHUNK_SIZE = 1024 * 1024  # one worker-thread hop per MiB keeps the hop overhead negligible

_DRIVE = re.compile(r"^[A-Za-z]:")
_MAX_DECODE_ROUNDS = 10


@dataclass(frozen=True)
class FileInfo:
    """One entry of a listing: the basename, and the size for files (None for directories)."""

    name: str
    is_dir: bool
    size: int | None = None


class ReadStream:
    """Bytes of one stored file (or a range of it), yielded in chunks. Close it even if never iterated."""

    def __init__(self, size: int, total_size: int, chunks: AsyncIterator[bytes],
                 close: Callable[[], Awaitable[None]] | None = None):
        self.size = size  # bytes this stream yields
        self.total_size = total_size  # size of the whole file (for Content-Range)
        self._chunks = chunks
        self._close = close

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks

    async def aclose(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()
        if self._close is not None:
            await self._close()


@dataclass(frozen=True)
class PartCredential:
    """Where the client PUTs one part of a multipart upload."""

    part_number: int
    url: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MultipartUpload:
    upload_id: str
    credentials: list[PartCredential]


@dataclass(frozen=True)
class UploadedPart:
    part_number: int
    etag: str
    url: str | None = None


@dataclass(frozen=True)
class PresignedUrl:
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    file_size: int | None = None


async def rebatch(chunks: AsyncIterable[bytes], size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
    """The bytes of `chunks` regrouped into blocks of at least `size` (the last may be shorter): one
    worker-thread hop per block, however small the pieces a client sends."""
    batch: list[bytes] = []
    batched = 0
    async for chunk in chunks:
        if not chunk:
            continue
        batch.append(chunk)
        batched += len(chunk)
        if batched >= size:
            yield b"".join(batch)
            batch, batched = [], 0
    if batch:
        yield b"".join(batch)


def not_supported(what: str) -> RunyardError:
    return RunyardError(f"{what} is not supported by this artifact store.", "NOT_IMPLEMENTED")


def store_failure(description: str, reason: str, secrets: tuple[str | None, ...] = (),
                  unreachable: bool = False) -> RunyardError:
    """The one error a store raises when its server fails it: names the store (its safe
    `description`), never a secret. Unreachable -> 503 (worth a retry); refused (bad credentials,
    expired ticket, missing bucket) -> 500: either way the server's configuration, not the client."""
    for secret in secrets:
        if secret and len(secret) >= 4:  # masking a one-letter password would garble every word
            reason = reason.replace(secret, "***")
    reason = " ".join(reason.split())[:500]
    verb = "cannot be reached" if unreachable else "refused the request"
    return RunyardError(f"Artifact store {description} {verb}: {reason}",
                        "TEMPORARILY_UNAVAILABLE" if unreachable else "INTERNAL_ERROR")


class ArtifactRepository(ABC):
    """A store of files under one root. `path` arguments are relative; "" means the root."""

    #: Where the store lives, safe to show (no secrets): used in logs and error messages.
    description: str = ""

    # -- the core every store has ------------------------------------------------------------------

    @abstractmethod
    async def list_dir(self, path: str) -> list[FileInfo]:
        """The entries directly under `path`, sorted by name; [] when it is missing or a file."""

    @abstractmethod
    async def stat(self, path: str) -> FileInfo | None:
        """What `path` is (name = basename), or None when nothing is stored there."""

    @abstractmethod
    async def open_read(self, path: str, offset: int = 0, length: int | None = None) -> ReadStream:
        """A stream of the file's bytes from `offset` (`length` bytes, or to the end).

        Raises RESOURCE_DOES_NOT_EXIST when missing and INVALID_PARAMETER_VALUE for a directory,
        before any byte is sent, so the caller can still answer with an error status.
        """

    @abstractmethod
    async def write(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        """Store the file from `chunks` in constant memory; returns the byte count.

        Atomic: readers see the old file or the complete new one, never a part; when `chunks` raises
        (client gone), nothing is left behind. Missing parent directories are implied. Overwrites.
        """

    @abstractmethod
    async def delete(self, path: str) -> bool:
        """Delete the file or the whole directory tree at `path`; False when nothing was there."""

    async def exists(self, path: str) -> bool:
        return await self.stat(path) is not None

    async def is_dir(self, path: str) -> bool:
        info = await self.stat(path)
        return info is not None and info.is_dir

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most stores hold no connections
        """Release connections (FTP/SFTP sessions, HTTP pools). Local files hold none."""

    def readiness_checks(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """Checks of this store's own for GET /ready, by name (e.g. "kerberos"), besides the write, read
        and delete of a probe object that /ready does for every store. Each raises when failing, with a
        message fit to show (no secrets). Most stores have none."""
        return {}

    # -- optional capabilities (object stores) -----------------------------------------------------

    supports_multipart_upload: bool = False
    supports_presigned_download: bool = False

    async def create_multipart_upload(self, path: str, num_parts: int) -> MultipartUpload:
        raise not_supported("Multipart upload")

    async def complete_multipart_upload(self, path: str, upload_id: str, parts: list[UploadedPart]) -> None:
        raise not_supported("Multipart upload")

    async def abort_multipart_upload(self, path: str, upload_id: str) -> None:
        raise not_supported("Multipart upload")

    async def presigned_download_url(self, path: str, expires_in: int) -> PresignedUrl:
        raise not_supported("Presigned download")


def _fully_unquote(path: str) -> str:
    # Decode until stable so a double-encoded "%252e%252e" cannot slip past as a harmless "%2e%2e"
    # and be decoded into ".." further down (an HTTP-based store, a proxy, a browser).
    for _ in range(_MAX_DECODE_ROUNDS):
        decoded = unquote(path)
        if decoded == path:
            return path
        path = decoded
    raise invalid("Invalid path")


def safe_relative_path(path: str) -> str:
    """The normalised relative form of a client-supplied artifact path, or INVALID_PARAMETER_VALUE.

    Percent-decoded (repeatedly), then refused when it holds '#', a backslash, NUL, a '..' segment, or
    is absolute or drive-qualified; '//' and '.' segments collapse. "" means the root. A trailing '/'
    is dropped here; uploads, which need a file name, use `safe_file_path`.
    """
    decoded = _fully_unquote(path)
    if ("#" in decoded or "\\" in decoded or "\x00" in decoded or decoded.startswith("/")
            or _DRIVE.match(decoded)):
        raise invalid("Invalid path")
    parts = [part for part in decoded.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise invalid("Invalid path")
    return "/".join(parts)


def safe_file_path(path: str) -> str:
    """Like `safe_relative_path`, for a path that must name a file: not the root, no trailing '/'."""
    relative = safe_relative_path(path)
    if not relative or _fully_unquote(path).rsplit("/", 1)[-1] in ("", "."):
        raise invalid("Invalid path: it must name a file (it is empty or ends with '/')")
    return relative
