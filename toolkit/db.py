"""Database operations behind `runyard db …` and the server's start-up check.

Every operation takes a backend-store-uri as `runyard server` does, returns plain data for the CLI to
print, and raises only RunyardError (database and driver failures become one-line messages without the
password). Backup, verify and restore will join `current` and `upgrade` here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from migrations import runner
from server.errors import RunyardError
from server.store.uri import EMBEDDED_DB_NAME, create_engine, embedded_folder, redact, sqlalchemy_url

DRIVER_EXTRAS = {"pymssql": "mssql"}


def _reason(exc: BaseException, password: str | None) -> str:
    """The driver's own words, on one line, with the password scrubbed should a driver echo it."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text.replace(password, "***") if password else text


def _password(uri: str) -> str | None:
    try:
        return sa.engine.make_url(uri).password if embedded_folder(uri) is None else None
    except (sa.exc.ArgumentError, ValueError):
        return None


@contextmanager
def _engine(uri: str) -> Iterator[sa.Engine]:
    """An engine for one operation, disposed afterwards; failures to reach the database are
    turned into RunyardError naming the (redacted) URI."""
    engine = None
    try:
        engine = create_engine(uri, pool_size=1)
        yield engine
    except sa.exc.DBAPIError as exc:
        raise RunyardError(f"Cannot use database {redact(uri)}: {_reason(exc.orig, _password(uri))}",
                           "INVALID_STATE") from None
    except ModuleNotFoundError as exc:
        extra = DRIVER_EXTRAS.get(exc.name or "")
        hint = f" (pip install 'runyard[{extra}]')" if extra else ""
        raise RunyardError(f"The database driver {exc.name!r} is not installed{hint}",
                           "INVALID_STATE") from None
    finally:
        if engine is not None:
            engine.dispose()


def _missing_embedded_db(uri: str) -> bool:
    """True for an embedded store whose database does not exist yet (so a read does not create it)."""
    folder = embedded_folder(uri)
    if folder is None or (folder / EMBEDDED_DB_NAME).exists():
        return False
    if folder.is_dir():
        sqlalchemy_url(uri)  # refuses a folder holding an MLflow file store
    return True


def _report(uri: str, state: runner.SchemaState) -> dict:
    return {
        "backend": redact(uri),
        "revision": state.revision,
        "head": state.head,
        "status": state.status,
        "upgrade_pending": state.upgrade_pending,
    }


def current(uri: str) -> dict:
    """Where the database's schema stands against this runyard's head revision."""
    if _missing_embedded_db(uri):
        return _report(uri, runner.SchemaState(None, runner.head_revision(), True, ()))
    with _engine(uri) as engine:
        return _report(uri, runner.schema_state(engine))


def upgrade(uri: str, sql: bool = False) -> dict:
    """Migrates the database to head. With `sql`, only renders the SQL for an empty database of the
    URI's dialect; nothing is connected to or written."""
    if sql:
        return {"backend": redact(uri), "head": runner.head_revision(), "sql": runner.offline_sql(uri)}
    with _engine(uri) as engine:
        before = runner.upgrade(engine, uri_for_messages=uri)
        after = runner.schema_state(engine)
    report = _report(uri, after)
    report["previous_revision"] = before.revision
    report["upgraded"] = before.revision != after.revision
    return report


def ensure_ready(uri: str) -> None:
    """What a starting server needs: an empty database is initialised, a mismatched one refused."""
    with _engine(uri) as engine:
        runner.ensure_schema(engine, uri)
