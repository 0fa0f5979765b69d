"""Run-scoped artifact routes of the tracking service: the server-side listing the UI uses
(`/mlflow/artifacts/list`) and the presigned-URL requests, which need an object-store destination."""

from __future__ import annotations

import posixpath
import re

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from server.api.message import Message
from server.api.routing import json_route, raw_route
from server.api.runs import run_id_of
from server.artifacts.base import safe_relative_path
from server.artifacts.local import LocalArtifactRepository
from server.errors import RunyardError

_PROXY_URI = re.compile(r"^mlflow-artifacts:(?://[^/]*)?/?(?P<path>.*)$")
_PROXY_URL = re.compile(r"^https?://[^/]+(?:/.*)?/api/2\.0/mlflow-artifacts/artifacts/?(?P<path>.*)$")


def _repository_and_base(ctx, artifact_uri: str):
    """Where a run's artifacts live: the proxy's store and a path in it, or a local folder."""
    for pattern in (_PROXY_URI, _PROXY_URL):
        m = pattern.match(artifact_uri)
        if m:
            if ctx.artifacts is None:
                raise RunyardError("Artifact serving is disabled (--no-serve-artifacts).",
                                   "TEMPORARILY_UNAVAILABLE")
            return ctx.artifacts, m.group("path").strip("/")
    if artifact_uri.startswith("/") or artifact_uri.startswith("file:"):
        return LocalArtifactRepository(artifact_uri.removeprefix("file://").removeprefix("file:")), ""
    scheme = artifact_uri.split(":", 1)[0]
    raise RunyardError(f"Listing artifacts stored under '{scheme}:' is not supported by this server.",
                       "NOT_IMPLEMENTED")


async def list_run_artifacts(request, ctx) -> Response:
    msg = Message.from_query_items(request.query_params.multi_items())
    run_id = run_id_of(msg)
    relative = safe_relative_path(msg.str("path") or "")
    run = await run_in_threadpool(ctx.store.get_run, run_id)
    root_uri = run["info"]["artifact_uri"]
    repo, base = _repository_and_base(ctx, root_uri)
    entries = await repo.list_dir(posixpath.join(base, relative) if relative else base)
    files = []
    for entry in entries:
        item = {"path": posixpath.join(relative, entry.name) if relative else entry.name,
                "is_dir": entry.is_dir}
        if not entry.is_dir:
            item["file_size"] = entry.size
        files.append(item)
    body = {"root_uri": root_uri}
    if files:
        body["files"] = files
    return Response(orjson.dumps(body), media_type="application/json")


def presigned_url(msg: Message, ctx) -> dict:
    raise RunyardError("Presigned URLs need an object-store artifact destination (S3, GCS or Azure Blob); "
                       "upload and download through the artifact proxy instead.", "NOT_IMPLEMENTED")


ROUTES = [
    raw_route("GET", "/mlflow/artifacts/list", list_run_artifacts),
    json_route("POST", "/mlflow/artifacts/presigned-upload-url", presigned_url),
    json_route("POST", "/mlflow/artifacts/presigned-download-url", presigned_url),
]
