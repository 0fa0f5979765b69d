"""Artifacts in S3 or an S3-compatible server (MinIO, SeaweedFS, Ceph RGW, …): `s3://bucket/prefix`.

Configured from the environment when the store is opened, with MLflow's variable names:
MLFLOW_S3_ENDPOINT_URL, MLFLOW_S3_IGNORE_TLS, MLFLOW_S3_UPLOAD_EXTRA_ARGS (a JSON object of extra
PutObject / CreateMultipartUpload parameters), MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE, and boto3's own
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN / AWS_PROFILE / AWS_DEFAULT_REGION; or keys from
a watched file, RUNYARD_S3_CREDENTIALS_FILE (s3_keys.py), so they can be rotated without a restart.

Folders are key prefixes: one exists while a key lies below it. Writes buffer one part at a time: a small
file is one PutObject, a larger one a multipart upload, completed only once the whole body has arrived,
so readers see the old object or the new one and a failed upload leaves nothing. boto3 blocks, so every
call runs in a worker thread; bodies stream through in chunks of at most CHUNK_SIZE.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import os
import posixpath
import threading
from collections.abc import AsyncIterable
from urllib.parse import quote, urlsplit

import boto3
import botocore.session
from anyio import to_thread
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, IncompleteReadError
from botocore.exceptions import ConnectionError as BotoConnectionError

from server.artifacts.base import (
    CHUNK_SIZE,
    ArtifactRepository,
    FileInfo,
    MultipartUpload,
    PartCredential,
    PresignedUrl,
    ReadStream,
    UploadedPart,
    safe_file_path,
    safe_relative_path,
    store_failure,
)
from server.artifacts.s3_keys import CREDENTIALS_FILE_ENV, WatchedFileProvider
from server.errors import RunyardError, invalid, not_found

log = logging.getLogger("runyard.server")

PART_SIZE = 8 * 1024 * 1024  # S3 wants >= 5 MiB for every part but the last
PARTS_PER_SIZE_STEP = 1000  # parts grow by PART_SIZE every 1000: S3 allows 10,000 parts (~440 GB here)
PART_URL_TTL_SECONDS = 3600  # what MLflow gives presigned UploadPart URLs (boto3's default)
_MISSING = ("404", "NoSuchKey", "NotFound")  # HEAD has no error body: only the status is left
# Extra upload arguments that UploadPart and CompleteMultipartUpload must repeat (SSE-C, requester pays).
_PER_PART_ARGS = ("SSECustomerAlgorithm", "SSECustomerKey", "SSECustomerKeyMD5", "RequestPayer",
                  "ExpectedBucketOwner")


def open_repository(uri: str) -> S3ArtifactRepository:
    parts = urlsplit(uri)
    if not parts.netloc:
        raise RunyardError("An S3 artifact URI must name a bucket: s3://bucket/prefix", "INVALID_STATE")
    return S3ArtifactRepository(parts.netloc, parts.path.strip("/"))


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _part_size(number: int) -> int:
    return PART_SIZE * (1 + (number - 1) // PARTS_PER_SIZE_STEP)


def _attachment(name: str) -> str:
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name)
    value = f'attachment; filename="{fallback}"'
    return value if fallback == name else f"{value}; filename*=UTF-8''{quote(name, safe='')}"


class S3ArtifactRepository(ArtifactRepository):
    supports_multipart_upload = True
    supports_presigned_download = True

    def __init__(self, bucket: str, prefix: str):
        self.bucket = bucket
        self.prefix = prefix
        self.description = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._extra_args = self._read_extra_args()
        self._part_args = {k: v for k, v in self._extra_args.items() if k in _PER_PART_ARGS}
        self._fixed_secrets = (os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_SESSION_TOKEN"),
                               self._extra_args.get("SSECustomerKey"))
        ignore_tls = os.environ.get("MLFLOW_S3_IGNORE_TLS", "").strip().lower() in ("true", "1")
        addressing = os.environ.get("MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE", "auto")
        config = Config(signature_version="s3v4", s3={"addressing_style": addressing})
        self._watched = None
        botocore_session = botocore.session.get_session()
        if os.environ.get(CREDENTIALS_FILE_ENV):  # keys that `runyard rotate s3-keys` may replace
            provider = WatchedFileProvider(os.environ[CREDENTIALS_FILE_ENV])
            botocore_session.get_component("credential_provider").insert_before("env", provider)
            self._watched = provider.credentials
        try:  # the session reads AWS_PROFILE, the AWS_* keys and AWS_DEFAULT_REGION now
            self._client = boto3.session.Session(botocore_session=botocore_session).client(
                "s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None,
                verify=False if ignore_tls else None, config=config)
        except BotoCoreError as exc:
            raise self._misconfigured(str(exc)) from None

    @property
    def _secrets(self) -> tuple[str | None, ...]:
        """What error messages must never show: the keys in use now, whichever file or variable they came
        from, and an SSE-C key."""
        return self._fixed_secrets + (self._watched.current_secrets() if self._watched else ())

    def _misconfigured(self, reason: str) -> RunyardError:
        return RunyardError(f"Artifact store {self.description} is misconfigured: {reason}", "INVALID_STATE")

    def _read_extra_args(self) -> dict:
        text = os.environ.get("MLFLOW_S3_UPLOAD_EXTRA_ARGS")
        if not text:
            return {}
        try:
            extra = json.loads(text)
        except ValueError:
            extra = None
        if not isinstance(extra, dict):  # the value may hold an SSE-C key: never echo it
            raise self._misconfigured("MLFLOW_S3_UPLOAD_EXTRA_ARGS must be a JSON object")
        return extra

    # -- keys and calls ----------------------------------------------------------------------------

    def _key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix and relative else self.prefix or relative

    def _dir_prefix(self, relative: str) -> str:
        key = self._key(relative)
        return f"{key}/" if key else ""

    def _failure(self, exc: Exception) -> RunyardError:
        if isinstance(exc, ClientError):  # a 5xx (SlowDown, InternalError) is worth a retry
            unreachable = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
        else:
            unreachable = isinstance(exc, BotoConnectionError | HTTPClientError | IncompleteReadError)
        return store_failure(self.description, str(exc), self._secrets, unreachable)

    async def _run(self, function, *args, expected: tuple[str, ...] = (), **kwargs):
        """`function` in a worker thread; a ClientError whose code is `expected` reaches the caller,
        every other failure of the server becomes store_failure."""
        try:
            return await to_thread.run_sync(lambda: function(*args, **kwargs))
        except ClientError as exc:
            if _code(exc) in expected:
                raise
            raise self._failure(exc) from None
        except BotoCoreError as exc:
            raise self._failure(exc) from None

    async def _call(self, operation: str, expected: tuple[str, ...] = (), **params):
        return await self._run(getattr(self._client, operation), expected=expected, Bucket=self.bucket,
                               **params)

    async def _head(self, relative: str) -> dict | None:
        try:
            return await self._call("head_object", expected=_MISSING, Key=self._key(relative))
        except ClientError:
            return None

    async def _has_children(self, relative: str) -> bool:
        answer = await self._call("list_objects_v2", Prefix=self._dir_prefix(relative), MaxKeys=1)
        return answer.get("KeyCount", len(answer.get("Contents", ()))) > 0

    async def _not_a_file(self, relative: str) -> RunyardError:
        if await self._has_children(relative):
            return invalid(f"Artifact path refers to a directory, not a file: '{relative}'")
        return not_found(f"Artifact '{relative}' does not exist.")

    # -- listing and stat --------------------------------------------------------------------------

    async def list_dir(self, path: str) -> list[FileInfo]:
        return await self._run(self._list_dir, self._dir_prefix(safe_relative_path(path)))

    def _list_dir(self, prefix: str) -> list[FileInfo]:
        infos = []
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, Delimiter="/")
        for page in pages:
            for item in page.get("Contents", ()):
                name = item["Key"][len(prefix):]
                if name:  # "" is a folder marker some tools create for prefix itself
                    infos.append(FileInfo(name, False, item["Size"]))
            for common in page.get("CommonPrefixes", ()):
                name = common["Prefix"][len(prefix):-1]
                if name:  # "" comes from a key with "//", which no safe path produces
                    infos.append(FileInfo(name, True))
        return sorted(infos, key=lambda info: info.name)

    async def stat(self, path: str) -> FileInfo | None:
        relative = safe_relative_path(path)
        name = posixpath.basename(relative)
        if relative:
            head = await self._head(relative)
            if head is not None:
                return FileInfo(name, False, head["ContentLength"])
        # A missing bucket also answers HEAD with a bare 404; the listing names it.
        return FileInfo(name, True) if await self._has_children(relative) else None

    # -- read --------------------------------------------------------------------------------------

    async def open_read(self, path: str, offset: int = 0, length: int | None = None) -> ReadStream:
        relative = safe_relative_path(path)
        if not relative:
            raise await self._not_a_file(relative)
        start = max(offset, 0)
        if length is not None and length <= 0:
            return await self._empty_read(relative)
        params = {}
        if start or length is not None:
            params["Range"] = f"bytes={start}-{'' if length is None else start + length - 1}"
        try:
            response = await self._call("get_object", expected=("NoSuchKey", "InvalidRange"),
                                        Key=self._key(relative), **params)
        except ClientError as exc:
            if _code(exc) == "InvalidRange":  # starts at or past the end, or the file is empty
                return await self._empty_read(relative)
            raise await self._not_a_file(relative) from None
        size = response["ContentLength"]
        content_range = response.get("ContentRange")  # "bytes 2-4/10"
        total = int(content_range.rsplit("/", 1)[1]) if content_range else size
        body = response["Body"]

        async def chunks():
            try:
                while True:
                    data = await self._run(body.read, CHUNK_SIZE)
                    if not data:
                        break
                    yield data
            finally:
                body.close()  # drops the connection when the body was not read to its end

        async def close() -> None:
            body.close()

        return ReadStream(size, total, chunks(), close)

    async def _empty_read(self, relative: str) -> ReadStream:
        head = await self._head(relative)
        if head is None:
            raise await self._not_a_file(relative)
        return ReadStream(0, head["ContentLength"], _no_chunks())

    # -- write -------------------------------------------------------------------------------------

    def _upload_args(self, relative: str) -> dict:
        # Guessed from the name, as MLflow does, so a presigned download carries the right type.
        content_type = mimetypes.guess_type(posixpath.basename(relative))[0]
        return {**({"ContentType": content_type} if content_type else {}), **self._extra_args}

    async def write(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        relative = safe_file_path(path)
        key = self._key(relative)
        upload_args = self._upload_args(relative)
        buffer = bytearray()
        written = 0
        upload_id: str | None = None
        parts: list[dict] = []
        try:
            async for chunk in chunks:
                buffer += chunk
                written += len(chunk)
                while len(buffer) >= _part_size(len(parts) + 1):
                    if upload_id is None:
                        created = await self._call("create_multipart_upload", Key=key, **upload_args)
                        upload_id = created["UploadId"]
                    number = len(parts) + 1
                    size = _part_size(number)
                    parts.append(await self._upload_part(key, upload_id, number, bytes(buffer[:size])))
                    del buffer[:size]
            if upload_id is None:
                await self._call("put_object", Key=key, Body=bytes(buffer), **upload_args)
                return written
            if buffer:
                parts.append(await self._upload_part(key, upload_id, len(parts) + 1, bytes(buffer)))
            await self._call("complete_multipart_upload", Key=key, UploadId=upload_id,
                             MultipartUpload={"Parts": parts}, **self._part_args)
        except BaseException as exc:
            if upload_id is not None:  # the parts would otherwise be stored (and billed) until expiry
                if isinstance(exc, Exception):
                    await to_thread.run_sync(self._abort_quietly, key, upload_id)
                else:  # cancelled: another await would be cancelled too, so a thread of its own
                    threading.Thread(target=self._abort_quietly, args=(key, upload_id)).start()
            raise
        return written

    async def _upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> dict:
        answer = await self._call("upload_part", Key=key, UploadId=upload_id, PartNumber=number, Body=data,
                                  **self._part_args)
        return {"PartNumber": number, "ETag": answer["ETag"]}

    def _abort_quietly(self, key: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                **self._part_args)
        except (BotoCoreError, ClientError) as exc:
            log.warning("%s: could not abort an unfinished upload of %s: %s", self.description, key,
                        self._failure(exc).message)

    # -- delete ------------------------------------------------------------------------------------

    async def delete(self, path: str) -> bool:
        relative = safe_relative_path(path)
        if not relative:
            raise invalid("Invalid path: the artifact root itself cannot be deleted")
        found = False
        if await self._head(relative) is not None:
            await self._call("delete_object", Key=self._key(relative))
            found = True
        return await self._run(self._delete_tree, self._dir_prefix(relative)) or found

    def _delete_tree(self, prefix: str) -> bool:
        folders: set[str] = set()
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": 1000})  # DeleteObjects' limit
        for page in pages:
            keys = [item["Key"] for item in page.get("Contents", ())]
            if keys:
                self._delete_keys(keys)
            for key in keys:
                folder = key.rsplit("/", 1)[0] + "/"
                while folder.startswith(prefix) and folder not in folders:
                    folders.add(folder)
                    folder = folder[:-1].rsplit("/", 1)[0] + "/"
        if folders:
            # Filer-backed servers (SeaweedFS) keep emptied folders, listed as prefixes until a sweep
            # minutes later; deleting their "folder/" keys, deepest first, drops them now. On S3 proper
            # no such keys exist and these deletes change nothing. A folder refilled meanwhile stays.
            ordered = sorted(folders, key=lambda folder: folder.count("/"), reverse=True)
            try:
                self._delete_keys(ordered, check=False)
            except (BotoCoreError, ClientError):
                pass
        return bool(folders)

    def _delete_keys(self, keys: list[str], check: bool = True) -> None:
        for start in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": key} for key in keys[start:start + 1000]], "Quiet": True}
            answer = self._client.delete_objects(Bucket=self.bucket, Delete=batch)
            if check and answer.get("Errors"):
                error = answer["Errors"][0]
                raise store_failure(self.description, f"{error.get('Code')}: {error.get('Message')} "
                                    f"({len(answer['Errors'])} keys not deleted)", self._secrets)

    # -- multipart upload and presigned download ---------------------------------------------------

    async def create_multipart_upload(self, path: str, num_parts: int) -> MultipartUpload:
        relative = safe_file_path(path)
        key = self._key(relative)
        created = await self._call("create_multipart_upload", Key=key, **self._upload_args(relative))
        upload_id = created["UploadId"]
        urls = await self._run(self._part_urls, key, upload_id, num_parts)
        return MultipartUpload(upload_id, [PartCredential(number, url) for number, url in enumerate(urls, 1)])

    def _part_urls(self, key: str, upload_id: str, num_parts: int) -> list[str]:
        return [self._client.generate_presigned_url(
            "upload_part", ExpiresIn=PART_URL_TTL_SECONDS,
            Params={"Bucket": self.bucket, "Key": key, "UploadId": upload_id, "PartNumber": number})
            for number in range(1, num_parts + 1)]

    async def complete_multipart_upload(self, path: str, upload_id: str, parts: list[UploadedPart]) -> None:
        listing = [{"PartNumber": part.part_number, "ETag": part.etag}
                   for part in sorted(parts, key=lambda part: part.part_number)]
        try:
            await self._call("complete_multipart_upload", expected=_CLIENT_MISTAKES,
                             Key=self._key(safe_file_path(path)), UploadId=upload_id,
                             MultipartUpload={"Parts": listing}, **self._part_args)
        except ClientError as exc:
            raise _client_mistake(exc) from None

    async def abort_multipart_upload(self, path: str, upload_id: str) -> None:
        try:
            await self._call("abort_multipart_upload", expected=_CLIENT_MISTAKES,
                             Key=self._key(safe_file_path(path)), UploadId=upload_id, **self._part_args)
        except ClientError as exc:
            raise _client_mistake(exc) from None

    async def presigned_download_url(self, path: str, expires_in: int) -> PresignedUrl:
        relative = safe_file_path(path)
        head = await self._head(relative)
        if head is None:
            raise await self._not_a_file(relative)
        params = {"Bucket": self.bucket, "Key": self._key(relative),
                  "ResponseContentDisposition": _attachment(posixpath.basename(relative))}
        url = await self._run(self._client.generate_presigned_url, "get_object", Params=params,
                              ExpiresIn=expires_in)
        return PresignedUrl(url, {}, head["ContentLength"])


# What S3 answers when the client's own multipart requests are wrong: its mistake, not the store's.
_CLIENT_MISTAKES = ("NoSuchUpload", "InvalidPart", "InvalidPartOrder", "EntityTooSmall")


def _client_mistake(exc: ClientError) -> RunyardError:
    message = exc.response.get("Error", {}).get("Message", "")
    if _code(exc) == "NoSuchUpload":
        return not_found(f"The multipart upload does not exist (completed or aborted already?): {message}")
    return invalid(f"The multipart upload was refused ({_code(exc)}): {message}")


async def _no_chunks():
    return
    yield
