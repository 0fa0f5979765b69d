"""Liveness, version and the capability document the client fetches before artifact transfers."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from starlette.responses import PlainTextResponse

from server.api.routing import json_route, raw_route

try:
    RUNYARD_VERSION = version("runyard")
except PackageNotFoundError:  # running from a source tree
    RUNYARD_VERSION = "0.0.0"

# The MLflow protocol level we speak. The client reads /version to decide whether the server knows
# newer APIs (e.g. OTLP spans from 3.4 on), so it must be an MLflow version, not ours.
MLFLOW_PROTOCOL_VERSION = "3.17.2"


async def health(request, ctx):
    return PlainTextResponse("OK")


async def server_version(request, ctx):
    return PlainTextResponse(MLFLOW_PROTOCOL_VERSION, headers={"x-runyard-version": RUNYARD_VERSION})


def server_info(msg, ctx) -> dict:
    return {
        "store_type": "SqlStore",
        "workspaces_enabled": False,
        "trace_archival_enabled": False,
        "multipart_uploads_enabled": bool(ctx.artifacts and ctx.artifacts.supports_multipart_upload),
        "multipart_downloads_enabled": False,
        "artifact_serving_enabled": ctx.config.serve_artifacts,
        "presigned_upload_run_id_supported": False,
        "presigned_upload_model_id_supported": False,
        "model_artifact_presigned_downloads_supported": False,
        "features_enabled": {"gateway": False, "scheduled_issue_detection": False},
        "tracking_auth": False,
        "artifacts_presigned_only": False,
        "server": "runyard",
        "server_version": RUNYARD_VERSION,
    }


ROUTES = [
    raw_route("GET", "/health", health, prefixed=False),
    raw_route("GET", "/version", server_version, prefixed=False),
    json_route("GET", "/mlflow/server-info", server_info, versions=("3.0",)),
]
