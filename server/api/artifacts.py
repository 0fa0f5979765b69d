"""The artifact proxy, `/api/2.0/mlflow-artifacts/...` (api-notes §1.4, §2.5).

Paths are relative to `--artifacts-destination`. Downloads and uploads stream through the store in
chunks, so memory stays flat whatever the file size. With `--no-serve-artifacts` every route answers
503 in plain text, as MLflow's server does. Multipart upload and presigned download answer 501 unless
the store supports them; the stock client then falls back to a plain PUT / a proxied GET.
"""

from __future__ import annotations

import inspect
import mimetypes
import posixpath
import re
from collections.abc import Awaitable, Callable
from functools import wraps
from urllib.parse import quote

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from server.api.message import Message
from server.api.routing import raw_route
from server.artifacts.base import (
    ArtifactRepository,
    FileInfo,
    UploadedPart,
    not_supported,
    safe_file_path,
    safe_relative_path,
)
from server.context import Context
from server.errors import invalid, not_found

DISABLED_MESSAGE = ("Artifact serving is disabled. Start `runyard server` with `--serve-artifacts` "
                    "to enable it.")
PRESIGNED_URL_TTL_SECONDS = 300  # MLflow's MLFLOW_PRESIGNED_DOWNLOAD_URL_TTL_SECONDS default
MAX_PARTS = 10_000  # S3's limit; the others allow fewer or as many
_EMPTY_JSON = b"{}"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")

Handler = Callable[..., Awaitable[Response]]


def _json(data: dict) -> Response:
    return Response(orjson.dumps(data) if data else _EMPTY_JSON, media_type="application/json")


def _serving(handler: Callable[..., Awaitable[Response]]) -> Handler:
    """Hands the handler the store, or answers 503 text when artifact serving is off. A handler with a
    `prometheus` parameter (a transfer) also gets the metrics, None without --expose-prometheus."""
    metered = "prometheus" in inspect.signature(handler).parameters

    @wraps(handler)
    async def guarded(request: Request, ctx: Context, **path_params) -> Response:
        repo = ctx.artifacts if ctx is not None else None
        if repo is None:
            return PlainTextResponse(DISABLED_MESSAGE, status_code=503)
        if metered:
            path_params["prometheus"] = ctx.metrics
        return await handler(request, repo, **path_params)

    return guarded


# -- list, download, upload, delete ----------------------------------------------------------------

@_serving
async def list_artifacts(request: Request, repo: ArtifactRepository) -> Response:
    directory = safe_relative_path(request.query_params.get("path", ""))
    files = [_file_json(info) for info in await repo.list_dir(directory)]
    # An empty or missing folder, or a file's path, lists as {} (the client then GETs the file).
    return _json({"files": files} if files else {})


def _file_json(info: FileInfo) -> dict:
    if info.is_dir:
        return {"path": info.name, "is_dir": True}
    return {"path": info.name, "is_dir": False, "file_size": info.size}


@_serving
async def download_artifact(request: Request, repo: ArtifactRepository, artifact_path: str,
                            prometheus=None) -> Response:
    relative = safe_relative_path(artifact_path)
    name = posixpath.basename(relative)
    headers = {
        "content-type": _guess_type(name),
        "content-disposition": _content_disposition(name or "artifact"),
        "x-content-type-options": "nosniff",
        "accept-ranges": "bytes",
    }
    range_header = request.headers.get("range")
    if request.method == "HEAD" or range_header:
        size = await _file_size(repo, relative)
        if request.method == "HEAD":
            return Response(headers={**headers, "content-length": str(size)})
        wanted = _parse_range(range_header, size)
        if wanted == "unsatisfiable":
            return Response(status_code=416, headers={"content-range": f"bytes */{size}"})
        if wanted is not None:
            start, end = wanted
            stream = await repo.open_read(relative, start, end - start + 1)
            headers["content-range"] = f"bytes {start}-{start + stream.size - 1}/{stream.total_size}"
            headers["content-length"] = str(stream.size)
            return StreamingResponse(_drain(stream, prometheus), status_code=206, headers=headers)
    stream = await repo.open_read(relative)
    headers["content-length"] = str(stream.size)
    return StreamingResponse(_drain(stream, prometheus), headers=headers)


async def _drain(stream, prometheus=None):
    tally = prometheus.tally("out") if prometheus is not None else None
    try:
        async for chunk in stream:
            yield chunk
            if tally is not None:
                tally.add(len(chunk))
    finally:
        await stream.aclose()
        if tally is not None:
            tally.close()


async def _file_size(repo: ArtifactRepository, relative: str) -> int:
    info = await repo.stat(relative)
    if info is None:
        raise not_found(f"Artifact '{relative}' does not exist.")
    if info.is_dir:
        raise invalid(f"Artifact path refers to a directory, not a file: '{relative}'")
    return info.size or 0


def _parse_range(header: str | None, size: int):
    """(first, last) byte of a single `bytes=` range; None to ignore it; "unsatisfiable" for 416."""
    match = _RANGE.fullmatch((header or "").strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None  # malformed or multi-range: serve the whole file (RFC 9110 allows ignoring Range)
    first, last = match.groups()
    if first == "":  # suffix: the last N bytes
        count = int(last)
        if count == 0 or size == 0:
            return "unsatisfiable"
        return max(size - count, 0), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size:
        return "unsatisfiable"
    if end < start:
        return None
    return start, end


@_serving
async def upload_artifact(request: Request, repo: ArtifactRepository, artifact_path: str,
                          prometheus=None) -> Response:
    relative = safe_file_path(artifact_path)  # a trailing '/' names no file: 400, as MLflow does
    body = request.stream() if prometheus is None else prometheus.count_in(request.stream())
    try:
        await repo.write(relative, body)
    except ClientDisconnect:
        # Nobody is left to read this answer; it keeps the log free of a stack trace.
        raise invalid("Upload aborted: the client disconnected before the body was complete.") from None
    return _json({})


@_serving
async def delete_artifact(request: Request, repo: ArtifactRepository, artifact_path: str) -> Response:
    relative = safe_relative_path(artifact_path)
    if not relative:
        raise invalid("Invalid path: the artifact root itself cannot be deleted")
    if not await repo.delete(relative):
        raise not_found(f"Artifact '{relative}' does not exist.")
    return _json({})


# -- multipart upload and presigned download (object stores only) ----------------------------------

@_serving
async def create_multipart_upload(request: Request, repo: ArtifactRepository, artifact_path: str) -> Response:
    directory = safe_relative_path(artifact_path)
    if not repo.supports_multipart_upload:
        raise not_supported("Multipart upload")
    body = await _json_body(request)
    target = _multipart_target(directory, body)
    num_parts = body.get("num_parts")
    if isinstance(num_parts, str) and num_parts.isdigit():
        num_parts = int(num_parts)
    if not isinstance(num_parts, int) or isinstance(num_parts, bool) or not 1 <= num_parts <= MAX_PARTS:
        raise invalid(f"num_parts must be an integer from 1 to {MAX_PARTS}")
    upload = await repo.create_multipart_upload(target, num_parts)
    return _json({
        "upload_id": upload.upload_id,
        "credentials": [{"url": c.url, "part_number": c.part_number, "headers": c.headers}
                        for c in upload.credentials],
    })


@_serving
async def complete_multipart_upload(request: Request, repo: ArtifactRepository,
                                    artifact_path: str) -> Response:
    directory = safe_relative_path(artifact_path)
    if not repo.supports_multipart_upload:
        raise not_supported("Multipart upload")
    body = await _json_body(request)
    target = _multipart_target(directory, body)
    parts = body.get("parts")
    if not isinstance(parts, list) or not parts:
        raise invalid("parts must be a non-empty list of {part_number, etag}")
    uploaded = []
    for part in parts:
        if not isinstance(part, dict) or not isinstance(part.get("etag"), str):
            raise invalid("each part needs a part_number and an etag")
        try:
            number = int(part.get("part_number"))
        except (TypeError, ValueError):
            raise invalid("each part needs a part_number and an etag") from None
        uploaded.append(UploadedPart(number, part["etag"], part.get("url")))
    await repo.complete_multipart_upload(target, _upload_id(body), uploaded)
    return _json({})


@_serving
async def abort_multipart_upload(request: Request, repo: ArtifactRepository, artifact_path: str) -> Response:
    directory = safe_relative_path(artifact_path)
    if not repo.supports_multipart_upload:
        raise not_supported("Multipart upload")
    body = await _json_body(request)
    await repo.abort_multipart_upload(_multipart_target(directory, body), _upload_id(body))
    return _json({})


@_serving
async def presigned_download(request: Request, repo: ArtifactRepository, artifact_path: str) -> Response:
    relative = safe_file_path(artifact_path)
    if not repo.supports_presigned_download:
        raise not_supported("Presigned download")
    url = await repo.presigned_download_url(relative, PRESIGNED_URL_TTL_SECONDS)
    answer = {"url": url.url, "headers": url.headers}
    if url.file_size is not None:
        answer["file_size"] = url.file_size
    return _json(answer)


async def _json_body(request: Request) -> dict:
    return (await Message.from_request_body(request)).data


def _multipart_target(directory: str, body: dict) -> str:
    # The stock client sends the path of the file on its own disk; only its name counts (as in MLflow's
    # server), stored inside the folder the URL names.
    path = body.get("path")
    if not isinstance(path, str) or not path:
        raise invalid("Missing value for required parameter 'path'")
    name = re.split(r"[/\\]", path)[-1]
    if name in ("", ".", ".."):
        raise invalid(f"Invalid path: {path!r} names no file")
    return safe_file_path(posixpath.join(directory, safe_file_path(name)))


def _upload_id(body: dict) -> str:
    upload_id = body.get("upload_id")
    if not isinstance(upload_id, str) or not upload_id:
        raise invalid("Missing value for required parameter 'upload_id'")
    return upload_id


# -- headers ---------------------------------------------------------------------------------------

def _guess_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _content_disposition(name: str) -> str:
    """`attachment` with an ASCII fallback name, plus RFC 5987 `filename*` when the name is not ASCII."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name)
    value = f'attachment; filename="{fallback}"'
    if fallback != name:
        value += f"; filename*=UTF-8''{quote(name, safe='')}"
    return value


_ARTIFACT = "/mlflow-artifacts/artifacts/{artifact_path:path}"

ROUTES = [
    raw_route("GET", "/mlflow-artifacts/artifacts", list_artifacts),
    raw_route("GET", _ARTIFACT, download_artifact),
    raw_route("PUT", _ARTIFACT, upload_artifact),
    raw_route("DELETE", _ARTIFACT, delete_artifact),
    raw_route("POST", "/mlflow-artifacts/mpu/create/{artifact_path:path}", create_multipart_upload),
    raw_route("POST", "/mlflow-artifacts/mpu/complete/{artifact_path:path}", complete_multipart_upload),
    raw_route("POST", "/mlflow-artifacts/mpu/abort/{artifact_path:path}", abort_multipart_upload),
    raw_route("GET", "/mlflow-artifacts/presigned/{artifact_path:path}", presigned_download),
]
