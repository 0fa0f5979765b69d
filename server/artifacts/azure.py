"""Artifacts in Azure Blob Storage: `wasbs://container@account.blob.core.windows.net/path` (also `wasb://`),
and `abfss://filesystem@account.dfs.core.windows.net/path` (also `abfs://`), served through the Blob API.

Credentials are read from the environment when the store is opened, with MLflow's names, first match wins:
- AZURE_STORAGE_CONNECTION_STRING: the endpoint and usually the credential (AccountKey=… or
  SharedAccessSignature=…); also how an emulator (Azurite) or a private endpoint is given;
- AZURE_STORAGE_ACCESS_KEY: the account key;
- AZURE_STORAGE_SAS_TOKEN: a SAS token (the name MLflow uses for abfss);
- otherwise DefaultAzureCredential (azure-identity: service principal variables, managed identity, CLI).
The key or SAS token apply to https://<account>.blob.<suffix> from the URI, or to the connection string's
endpoint when that string carries no credential of its own.

Folders are name prefixes ending in '/'. A write stages blocks of BLOCK_SIZE and commits the block list
once the whole body arrived: until then readers see the old blob; when the body fails, nothing is
committed and the staged blocks expire on their own. A body smaller than one block is a single Put Blob,
which also keeps small concurrent writers of one name from discarding each other's staged blocks.
"""

from __future__ import annotations

import base64
import os
import posixpath
import re
import uuid
from collections.abc import AsyncIterable, Callable
from functools import partial
from typing import TypeVar
from urllib.parse import unquote, urlsplit

from anyio import to_thread
from azure.core import MatchConditions
from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
from azure.core.exceptions import (
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobBlock, BlobPrefix, BlobServiceClient, ExponentialRetry

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

BLOCK_SIZE = 4 * 1024 * 1024  # 50,000 blocks per blob at most: 195 GiB per artifact
_URI = re.compile(r"(?P<scheme>wasbs?|abfss?)://(?P<container>[^@/]+)@(?P<account>[^./]+)"
                  r"\.(?P<service>blob|dfs)\.(?P<suffix>[^/?#]+)(?P<path>/[^?#]*)?", re.IGNORECASE)
# The SDK's default waits 15 s, then 18 s, then 24 s between attempts: far too long for a client waiting on
# the proxy (which retries itself). Three retries within about 10 s still ride out a brief hiccup.
_RETRY = ExponentialRetry(initial_backoff=1, increment_base=1.5, retry_total=3, random_jitter_range=1)
_T = TypeVar("_T")


def open_repository(uri: str) -> AzureBlobArtifactRepository:
    return AzureBlobArtifactRepository(uri)


def _is_folder(blob) -> bool:
    # Accounts with a hierarchical namespace (ADLS Gen2) list their folders as empty marker blobs.
    return (blob.metadata or {}).get("hdi_isfolder") == "true"


def _sas_signatures(token: str) -> list[str]:
    """The signature of a SAS token, as written (percent-encoded) and decoded: what would give it away."""
    raw = next((part[4:] for part in token.lstrip("?").split("&") if part.startswith("sig=")), "")
    return [raw, unquote(raw)]


def _connection_secrets(connection_string: str) -> list[str]:
    """The credential a connection string carries, if any: AccountKey, SAS, the SAS's signature."""
    fields = {name.strip().lower(): value for name, _, value in
              (part.partition("=") for part in connection_string.split(";")) if value}
    sas = fields.get("sharedaccesssignature", "")
    return [fields.get("accountkey", ""), sas, *_sas_signatures(sas)]


class AzureBlobArtifactRepository(ArtifactRepository):
    def __init__(self, uri: str):
        match = _URI.fullmatch(uri.split("?", 1)[0])
        if not match:
            raise RunyardError(f"Not an Azure Blob URI: {urlsplit(uri).scheme}://… (expected "
                               "wasbs://<container>@<account>.blob.core.windows.net/<path>)", "INVALID_STATE")
        scheme, container, account, service, suffix = match.group("scheme", "container", "account",
                                                                  "service", "suffix")
        self.prefix = "/".join(part for part in (match.group("path") or "").split("/") if part)
        self.description = f"{scheme.lower()}://{container}@{account}.{service.lower()}.{suffix}/{self.prefix}"

        connection_string = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "")
        key = os.environ.get("AZURE_STORAGE_ACCESS_KEY", "")
        sas = os.environ.get("AZURE_STORAGE_SAS_TOKEN", "")
        self._secrets = (key, sas, *_sas_signatures(sas), *_connection_secrets(connection_string))
        credential = (AzureNamedKeyCredential(account, key) if key
                      else AzureSasCredential(sas.lstrip("?")) if sas else None)
        options = {"retry_policy": _RETRY, "connection_timeout": 10}
        try:
            if connection_string:
                own_credential = any(_connection_secrets(connection_string))
                client = BlobServiceClient.from_connection_string(
                    connection_string, credential=None if own_credential else credential, **options)
            else:
                # https even for wasb:// and abfs://: storage accounts refuse plain HTTP by default.
                client = BlobServiceClient(f"https://{account}.blob.{suffix}",
                                           credential=credential or _default_credential(), **options)
        except ValueError as exc:  # a malformed connection string or key
            raise store_failure(self.description, str(exc), self._secrets) from None
        self._client = client
        self._container = client.get_container_client(container)

    # -- helpers -----------------------------------------------------------------------------------

    def _key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix and relative else self.prefix or relative

    async def _run(self, function: Callable[..., _T], *args, **kwargs) -> _T:
        """`function` in a worker thread, with the SDK's failures turned into store_failure."""
        try:
            return await to_thread.run_sync(partial(function, *args, **kwargs))
        except HttpResponseError as exc:
            code = getattr(exc.error_code, "value", exc.error_code)  # an enum for the codes the SDK knows
            text = exc.message or exc.reason or ""
            first_line = text.splitlines()[0] if text else ""
            reason = f"{first_line} ({code or 'no error code'}, HTTP {exc.status_code})"
            raise store_failure(self.description, reason, self._secrets,
                                unreachable=(exc.status_code or 0) >= 500) from None
        except (ServiceRequestError, ServiceResponseError) as exc:
            raise store_failure(self.description, str(exc), self._secrets, unreachable=True) from None

    def _properties(self, key: str):
        """The blob's properties, or None when there is no blob of that name (the container must exist)."""
        try:
            return self._container.get_blob_client(key).get_blob_properties()
        except ResourceNotFoundError as exc:
            if exc.error_code != "BlobNotFound":
                raise  # ContainerNotFound: the store is misconfigured, not the file missing
            return None

    def _has_children(self, key: str) -> bool:
        blobs = self._container.list_blobs(name_starts_with=f"{key}/" if key else "", results_per_page=1)
        return next(iter(blobs), None) is not None

    # -- listing and stat --------------------------------------------------------------------------

    async def list_dir(self, path: str) -> list[FileInfo]:
        key = self._key(safe_relative_path(path))
        return await self._run(self._list_dir, f"{key}/" if key else "")

    def _list_dir(self, prefix: str) -> list[FileInfo]:
        entries: dict[str, FileInfo] = {}
        for item in self._container.walk_blobs(name_starts_with=prefix, delimiter="/", include=["metadata"]):
            name = item.name[len(prefix):].rstrip("/")
            if not name:
                continue  # a "folder/" placeholder blob some tools create
            if isinstance(item, BlobPrefix) or _is_folder(item):
                entries[name] = FileInfo(name, True)
            else:
                entries.setdefault(name, FileInfo(name, False, item.size))
        return sorted(entries.values(), key=lambda info: info.name)

    async def stat(self, path: str) -> FileInfo | None:
        relative = safe_relative_path(path)
        return await self._run(self._stat, relative)

    def _stat(self, relative: str) -> FileInfo | None:
        key, name = self._key(relative), posixpath.basename(relative)
        properties = self._properties(key) if relative else None
        if properties is not None and not _is_folder(properties):
            return FileInfo(name, False, properties.size)
        if properties is not None or self._has_children(key):
            return FileInfo(name, True)
        return None

    # -- read --------------------------------------------------------------------------------------

    async def open_read(self, path: str, offset: int = 0, length: int | None = None) -> ReadStream:
        relative = safe_relative_path(path)
        properties = await self._run(self._readable, relative)  # its etag pins this version of the blob
        blob = self._container.get_blob_client(self._key(relative))
        total = properties.size
        start = min(max(offset, 0), total)
        end = total if length is None else min(total, start + max(length, 0))

        def read(position: int, size: int) -> bytes:
            # Every range must come from the same version: a blob replaced mid-read fails (412), never mixes.
            return blob.download_blob(offset=position, length=size, etag=properties.etag,
                                      match_condition=MatchConditions.IfNotModified).readall()

        async def chunks():
            position = start
            while position < end:
                data = await self._run(read, position, min(CHUNK_SIZE, end - position))
                if not data:
                    break
                position += len(data)
                yield data

        return ReadStream(end - start, total, chunks())

    def _readable(self, relative: str):
        key = self._key(relative)
        properties = self._properties(key) if relative else None
        if properties is not None and not _is_folder(properties):
            return properties
        if properties is not None or self._has_children(key):
            raise invalid(f"Artifact path refers to a directory, not a file: '{relative}'")
        raise not_found(f"Artifact '{relative}' does not exist.")

    # -- write -------------------------------------------------------------------------------------

    async def write(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        relative = safe_file_path(path)
        key = self._key(relative)
        if await self._run(self._has_children, key):
            raise invalid(f"Invalid path: '{relative}' is a folder")
        blob = self._container.get_blob_client(key)
        upload_id = uuid.uuid4().hex  # block ids must not collide with a concurrent writer's
        block_ids: list[str] = []
        buffer = bytearray()
        written = 0

        async def stage(data: bytes) -> None:
            block_id = base64.b64encode(f"{upload_id}-{len(block_ids):06d}".encode()).decode()
            await self._run(blob.stage_block, block_id, data, length=len(data))
            block_ids.append(block_id)

        async for chunk in chunks:  # an exception here leaves only uncommitted blocks, which expire
            buffer += chunk
            written += len(chunk)
            while len(buffer) >= BLOCK_SIZE:
                block = bytes(buffer[:BLOCK_SIZE])
                del buffer[:BLOCK_SIZE]
                await stage(block)
        if not block_ids:
            await self._run(blob.upload_blob, bytes(buffer), length=len(buffer), overwrite=True)
            return written
        if buffer:
            await stage(bytes(buffer))
        await self._run(blob.commit_block_list, [BlobBlock(block_id=block_id) for block_id in block_ids])
        return written

    # -- delete ------------------------------------------------------------------------------------

    async def delete(self, path: str) -> bool:
        relative = safe_relative_path(path)
        if not relative:
            raise invalid("Invalid path: the artifact root itself cannot be deleted")
        return await self._run(self._delete, self._key(relative))

    def _delete(self, key: str) -> bool:
        # Deepest names first, the name itself last: a hierarchical namespace refuses to drop a folder
        # that still has children.
        names = sorted((blob.name for blob in self._container.list_blobs(name_starts_with=f"{key}/")),
                       reverse=True)
        deleted = False
        for name in [*names, key]:
            try:
                self._container.delete_blob(name, delete_snapshots="include")
                deleted = True
            except ResourceNotFoundError as exc:
                if exc.error_code != "BlobNotFound":
                    raise
        return deleted

    async def aclose(self) -> None:
        await to_thread.run_sync(self._client.close)


def _default_credential():
    try:
        from azure.identity import DefaultAzureCredential
    except ModuleNotFoundError:
        raise RunyardError("Azure Blob artifact store: no credentials. Set AZURE_STORAGE_CONNECTION_STRING, "
                           "AZURE_STORAGE_ACCESS_KEY or AZURE_STORAGE_SAS_TOKEN, or install azure-identity "
                           "for DefaultAzureCredential.", "INVALID_STATE") from None
    return DefaultAzureCredential()
