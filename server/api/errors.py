"""MLflow's error envelope: `{"error_code": ..., "message": ...}` with the status MLflow maps each code to."""

from __future__ import annotations

import logging

import orjson
from starlette.responses import Response

from server.errors import RunyardError

log = logging.getLogger("runyard.server")

STATUS_BY_CODE = {
    "INVALID_PARAMETER_VALUE": 400,
    "RESOURCE_ALREADY_EXISTS": 400,
    "BAD_REQUEST": 400,
    "INVALID_REQUEST": 400,
    "MALFORMED_REQUEST": 400,
    "RESOURCE_DOES_NOT_EXIST": 404,
    "ENDPOINT_NOT_FOUND": 404,
    "NOT_FOUND": 404,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "ABORTED": 409,
    "RESOURCE_CONFLICT": 409,
    "ALREADY_EXISTS": 409,
    "REQUEST_LIMIT_EXCEEDED": 429,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL_ERROR": 500,
    "INVALID_STATE": 500,
    "NOT_IMPLEMENTED": 501,
    "TEMPORARILY_UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


def error_response(code: str, message: str, status: int | None = None) -> Response:
    body = orjson.dumps({"error_code": code, "message": message})
    return Response(body, status_code=status or STATUS_BY_CODE.get(code, 500), media_type="application/json")


def from_exception(exc: BaseException) -> Response:
    """The response for any exception a handler raised; never a stack trace on the wire."""
    if isinstance(exc, RunyardError):
        return error_response(exc.error_code, exc.message, exc.status)
    # Imported lazily: the error path must not slow down module import for the hot path.
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, sa_exc.OperationalError):
        log.warning("database unavailable: %s", type(exc.orig).__name__ if exc.orig else exc)
        return error_response("TEMPORARILY_UNAVAILABLE", "The backend store is temporarily unavailable.")
    if isinstance(exc, sa_exc.IntegrityError):
        return error_response("BAD_REQUEST", "The write conflicts with existing data; nothing was written.")
    if isinstance(exc, sa_exc.DataError):
        return error_response("BAD_REQUEST", "A value does not fit its database column (too long?).")
    log.exception("unexpected error")
    return error_response("INTERNAL_ERROR", "Internal error; the server log has the details.")
