"""The cross-process migration lock, so that of many replicas or jobs touching the schema at once exactly
one works and the others wait for its result.

Two forms share one lock per database:
- `transaction_lock`: held by one transaction (a server initialising an empty database);
- `session_lock`: held across a whole operation (backup, verify, migrate, restore) on a dedicated
  connection or file, released when the operation ends or its process dies.

PostgreSQL: advisory lock (transaction- and session-level locks on one key conflict). MySQL/MariaDB:
`GET_LOCK` (a session lock; DDL commits implicitly there, so no transaction could hold it). SQLite: the
write lock (`BEGIN IMMEDIATE`) for a transaction, an exclusive `flock` on a file beside the database for
an operation. MSSQL: `sp_getapplock`.
"""

from __future__ import annotations

import fcntl
import os
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from server.errors import RunyardError

LOCK_NAME = "runyard_migrations"
PG_LOCK_KEY = zlib.crc32(LOCK_NAME.encode())  # any fixed bigint; advisory locks are keyed by number
TRANSACTION_LOCK_TIMEOUT_S = 300
POLL_S = 0.25


def _timed_out(what: str) -> RunyardError:
    return RunyardError(f"Timed out waiting for another runyard process to finish {what}; "
                        "it still holds the migration lock", "INVALID_STATE")


@contextmanager
def transaction_lock(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A connection inside a transaction that holds the migration lock."""
    with engine.connect() as conn:
        name = conn.dialect.name
        if name == "sqlite":
            conn.execution_options(sqlite_begin="IMMEDIATE")  # takes SQLite's write lock at BEGIN
        if name in ("mysql", "mariadb"):
            # Lock, then a transaction that commits before the lock is released.
            with _mysql_lock(conn, TRANSACTION_LOCK_TIMEOUT_S, "migrating the database"):
                conn.commit()  # ends the transaction that GET_LOCK began
                with conn.begin():
                    yield conn
            return
        with conn.begin():
            if name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
            elif name == "mssql":
                conn.execute(sa.text("EXEC sp_getapplock @Resource = :name, @LockMode = 'Exclusive', "
                                     "@LockOwner = 'Transaction', @LockTimeout = :ms"),
                             {"name": LOCK_NAME, "ms": TRANSACTION_LOCK_TIMEOUT_S * 1000})
            yield conn


@contextmanager
def session_lock(engine: sa.Engine, timeout_s: float,
                 on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Holds the migration lock for the duration of the block. `on_wait` is called once if another
    process holds it, before waiting (up to `timeout_s`)."""
    if engine.dialect.name == "sqlite":
        with _file_lock(_sqlite_lock_path(engine), timeout_s, on_wait):
            yield
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        name = conn.dialect.name
        if name in ("mysql", "mariadb"):
            if not _mysql_try(conn, 0):
                if on_wait:
                    on_wait()
                if not _mysql_try(conn, timeout_s):
                    raise _timed_out("its operation")
            try:
                yield
            finally:
                _release_mysql_lock(conn)
            return
        acquire, release = _SESSION_SQL[name]
        _poll(lambda: bool(conn.execute(sa.text(acquire), _params(name)).scalar()), timeout_s, on_wait)
        try:
            yield
        finally:
            conn.execute(sa.text(release), _params(name))


_SESSION_SQL = {
    "postgresql": ("SELECT pg_try_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)"),
    "mssql": ("DECLARE @r int; EXEC @r = sp_getapplock @Resource = :name, @LockMode = 'Exclusive', "
              "@LockOwner = 'Session', @LockTimeout = 0; SELECT CASE WHEN @r >= 0 THEN 1 ELSE 0 END",
              "EXEC sp_releaseapplock @Resource = :name, @LockOwner = 'Session'"),
}


def _params(dialect: str) -> dict:
    return {"key": PG_LOCK_KEY} if dialect == "postgresql" else {"name": LOCK_NAME}


def _poll(try_once: Callable[[], bool], timeout_s: float, on_wait: Callable[[], None] | None) -> None:
    if try_once():
        return
    if on_wait:
        on_wait()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(POLL_S)
        if try_once():
            return
    raise _timed_out("its operation")


def _mysql_lock_name(conn: sa.Connection) -> str:
    # GET_LOCK names are server-wide: name the database so that two runyards sharing a server do not
    # wait for each other. (Names are limited to 64 characters.)
    return f"{LOCK_NAME}.{conn.engine.url.database or ''}"[:64]


def _mysql_try(conn: sa.Connection, timeout_s: float) -> bool:
    return conn.execute(sa.text("SELECT GET_LOCK(:name, :timeout)"),
                        {"name": _mysql_lock_name(conn), "timeout": timeout_s}).scalar() == 1


@contextmanager
def _mysql_lock(conn: sa.Connection, timeout_s: float, what: str) -> Iterator[None]:
    if not _mysql_try(conn, timeout_s):
        raise _timed_out(what)
    try:
        yield
    finally:
        _release_mysql_lock(conn)


def _release_mysql_lock(conn: sa.Connection) -> None:
    try:
        conn.execute(sa.text("SELECT RELEASE_LOCK(:name)"), {"name": _mysql_lock_name(conn)})
    except sa.exc.DBAPIError:
        conn.invalidate()  # closing the session releases the lock; never return it to the pool holding it


def _sqlite_lock_path(engine: sa.Engine) -> str:
    database = engine.url.database
    if not database or database == ":memory:":
        raise RunyardError("An in-memory SQLite database cannot be migrated by another process",
                           "INVALID_STATE")
    return f"{database}-migration.lock"


@contextmanager
def _file_lock(path: str, timeout_s: float, on_wait: Callable[[], None] | None) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        def try_once() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

        _poll(try_once, timeout_s, on_wait)
        yield  # the kernel drops the flock when the process dies; the file itself is harmless
    finally:
        os.close(fd)
