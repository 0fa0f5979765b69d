"""Liveness (/health), readiness (/ready), version and the capability document the client fetches
before artifact transfers.

/health says the process answers; /ready says it can do its work right now: the database answers and
holds the schema this runyard needs, the proxied artifact store takes a write, a read and a delete, and
the store's own checks pass (a Kerberos ticket with lifetime left, for HDFS with Kerberos). Checks run
concurrently, each with a deadline, so /ready answers within seconds even when a host drops packets; a
check still running when the next probe comes is joined, not started twice. A failure's reason is short
and names no secret.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version

import orjson
import sqlalchemy as sa
from starlette.responses import PlainTextResponse, Response

from server.api.routing import json_route, raw_route
from server.errors import RunyardError
from server.store.dbpassword import secrets_of

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


CHECK_TIMEOUT_S = 3.0  # per check; the checks run concurrently, so /ready answers within about this
PROBE_PREFIX = ".runyard-probe-"  # the probe object, at the artifact root, deleted right after the check
_REASON_MAX = 300
_URI_CREDENTIALS = re.compile(r"//[^@/\s]*@")


class Readiness:
    """The checks of one server process, and the ones in flight (so probes never pile up)."""

    def __init__(self):
        self._inflight: dict[tuple[int, str], asyncio.Future] = {}  # by (context, check name)
        self._head: str | None = None

    def checks(self, ctx) -> dict[str, Callable[[], Awaitable[None]]]:
        checks: dict[str, Callable[[], Awaitable[None]]] = {"database": lambda: self.database(ctx.store)}
        if ctx.artifacts is not None:
            checks["artifacts"] = lambda: self.artifacts(ctx.artifacts)
            checks.update(ctx.artifacts.readiness_checks())
        return checks

    async def run(self, ctx) -> dict[str, dict]:
        engine = getattr(ctx.store, "engine", None)
        passwords = secrets_of(engine) if engine is not None else ()  # the URI's or the password file's
        checks = self.checks(ctx)
        results = await asyncio.gather(*(self._timed((id(ctx), name), check, passwords)
                                         for name, check in checks.items()))
        return dict(zip(checks, results, strict=True))

    async def _timed(self, key: tuple, check: Callable[[], Awaitable[None]], passwords: tuple[str, ...]
                     ) -> dict:
        started = time.perf_counter()
        task = self._inflight.get(key)
        if task is None or task.done():
            task = self._inflight[key] = asyncio.ensure_future(check())
            task.add_done_callback(_retrieve)
        try:
            # shield: a check that overruns keeps going (and cleans up after itself); the next probe joins it
            await asyncio.wait_for(asyncio.shield(task), CHECK_TIMEOUT_S)
            reason = None
        except TimeoutError:
            reason = f"no answer within {CHECK_TIMEOUT_S:g} s"
        except Exception as exc:  # noqa: BLE001 - a broken check is a failed check, never a 500
            reason = _reason(exc, *passwords)
        result = {"ok": reason is None, "ms": round((time.perf_counter() - started) * 1000, 1)}
        if reason is not None:
            result["reason"] = reason
        return result

    # -- the checks --------------------------------------------------------------------------------

    async def database(self, store) -> None:
        """Reachable, and at the schema revision this runyard needs (one read of alembic_version)."""
        revisions = await _in_daemon_thread(store.read, _schema_revisions)
        if self._head is None:
            from migrations.runner import head_revision

            self._head = await _in_daemon_thread(head_revision)
        if revisions != [self._head]:
            found = ",".join(sorted(revisions)) or "none"
            raise RunyardError(f"the schema is at revision {found}, this runyard needs {self._head}")

    @staticmethod
    async def artifacts(repo) -> None:
        """A small object written, read back and deleted through the store, as an upload would."""
        name = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        payload = f"runyard readiness probe {name}\n".encode()

        async def body():
            yield payload

        try:
            await repo.write(name, body())
            stream = await repo.open_read(name)
            try:
                data = b"".join([chunk async for chunk in stream])
            finally:
                await stream.aclose()
            if data != payload:
                raise RunyardError(f"artifact store {repo.description} returned other bytes than written")
        except BaseException as exc:
            try:
                await repo.delete(name)
            except Exception:  # noqa: BLE001 - the first failure is the one worth reporting
                pass
            if isinstance(exc, Exception) and not isinstance(exc, RunyardError):  # name the store
                raise RunyardError(f"artifact store {repo.description}: {_reason(exc)}") from None
            raise
        await repo.delete(name)


def _reason(exc: BaseException, *passwords: str | None) -> str:
    """One short line: the error's own text without SQL, file names, URI credentials or the passwords."""
    if isinstance(exc, RunyardError):
        text = exc.message
    elif isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None:
        text = f"{type(exc.orig).__name__}: {exc.orig}"  # without the SQL and SQLAlchemy's link
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"{type(exc).__name__}: {exc.strerror}"  # without the file name
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = (text.strip().splitlines() or [type(exc).__name__])[0]
    text = _URI_CREDENTIALS.sub("//***@", text)
    for password in passwords:
        if password and len(password) >= 4:  # masking a one-letter password would garble every word
            text = text.replace(password, "***")
    return text[:_REASON_MAX]


def _schema_revisions(conn: sa.Connection) -> list[str]:
    return list(conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())


def _retrieve(task: asyncio.Future) -> None:
    """Marks a finished check's exception as seen: a probe that timed out no longer awaits it."""
    if not task.cancelled():
        task.exception()


def _in_daemon_thread(function: Callable, *args):
    """`function(*args)` in a thread of its own: a call stuck on a dead host occupies no request thread
    and does not hold up the process's exit."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(outcome, failed: bool) -> None:
        if not future.done():
            (future.set_exception if failed else future.set_result)(outcome)

    def work() -> None:
        try:
            outcome, failed = function(*args), False
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome, failed = exc, True
        try:
            loop.call_soon_threadsafe(settle, outcome, failed)
        except RuntimeError:  # the loop closed meanwhile (shutdown)
            pass

    threading.Thread(target=work, name="runyard-ready", daemon=True).start()
    return future


_READINESS = Readiness()  # one per process: checks in flight are shared by the probes that come meanwhile


async def ready(request, ctx):
    try:
        checks = await _READINESS.run(ctx)
    except Exception as exc:  # noqa: BLE001 - /ready answers, whatever happens
        checks = {"readiness": {"ok": False, "reason": f"the checks could not run ({type(exc).__name__})"}}
    ok = all(check["ok"] for check in checks.values())
    body = {"status": "ready" if ok else "not_ready", "checks": checks}
    return Response(orjson.dumps(body), status_code=200 if ok else 503, media_type="application/json",
                    headers={"cache-control": "no-store"})


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
    raw_route("GET", "/ready", ready, prefixed=False),
    raw_route("GET", "/version", server_version, prefixed=False),
    json_route("GET", "/mlflow/server-info", server_info, versions=("3.0",)),
]
