"""backend-store-uri -> SQLAlchemy engine.

A plain path or `file:` URI means an embedded SQLite database inside that folder; SQLAlchemy URIs for
sqlite, postgresql, mysql and mssql are used as given, with our default driver filled in when the URI
names only the dialect.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url

from server.errors import RunyardError
from server.store import dbpassword

EMBEDDED_DB_NAME = "runyard.db"
DEFAULT_DRIVERS = {"postgresql": "psycopg", "mysql": "pymysql", "mariadb": "pymysql", "mssql": "pymssql"}
SUPPORTED_DIALECTS = {"sqlite", "postgresql", "mysql", "mariadb", "mssql"}


def is_sqlalchemy_uri(uri: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9]*(\+[a-zA-Z0-9_]+)?://", uri)) and not uri.startswith("file:")


def embedded_folder(uri: str) -> Path | None:
    """The folder of an embedded store, or None when `uri` is a SQLAlchemy URI."""
    if uri.startswith("file:"):
        return Path(unquote(urlsplit(uri).path)).resolve()
    if is_sqlalchemy_uri(uri):
        return None
    return Path(uri).expanduser().resolve()


def _refuse_mlflow_file_store(folder: Path) -> None:
    if (folder / "0" / "meta.yaml").exists() or any(folder.glob("*/meta.yaml")):
        raise RunyardError(
            f"{folder} holds an MLflow file store (meta.yaml files). Runyard keeps an embedded SQLite "
            "database instead; point --backend-store-uri at an empty folder or a database URI.",
            "INVALID_STATE",
        )


def sqlalchemy_url(uri: str) -> sa.URL:
    """The SQLAlchemy URL for a backend-store-uri, creating the embedded store's folder when needed."""
    folder = embedded_folder(uri)
    if folder is not None:
        if folder.exists() and not folder.is_dir():
            raise RunyardError(f"--backend-store-uri {folder} is a file, not a folder", "INVALID_STATE")
        folder.mkdir(parents=True, exist_ok=True)
        _refuse_mlflow_file_store(folder)
        return sa.URL.create("sqlite", database=str(folder / EMBEDDED_DB_NAME))
    try:
        url = make_url(uri)
    except Exception as exc:
        raise RunyardError(f"Invalid backend store URI: {exc.__class__.__name__}", "INVALID_STATE") from None
    dialect, _, driver = url.drivername.partition("+")
    if dialect not in SUPPORTED_DIALECTS:
        raise RunyardError(
            f"Unsupported backend store dialect {dialect!r}; use sqlite, postgresql, mysql or mssql",
            "INVALID_STATE",
        )
    if not driver and dialect in DEFAULT_DRIVERS:
        url = url.set(drivername=f"{dialect}+{DEFAULT_DRIVERS[dialect]}")
    if dialect == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    return url


def without_password(url: sa.URL) -> sa.URL:
    # Not url.set(password=None): set() treats None as "leave unchanged" and keeps the password.
    return url._replace(password=None)


def redact(uri: str) -> str:
    """The URI with any password hidden, for logs and messages."""
    try:
        return make_url(uri).render_as_string(hide_password=True) if is_sqlalchemy_uri(uri) else uri
    except Exception:
        return re.sub(r"//[^@/]*@", "//***@", uri)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # Autocommit at the driver level; transactions are begun explicitly (see _sqlite_begin).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")
    _use_wal(cur)
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA case_sensitive_like=ON")
    cur.close()


def _use_wal(cur) -> None:
    """Switches a new database to WAL once. The switch needs an exclusive lock and SQLite's busy handler
    does not wait for it, so connections opened together while another writes retry by hand."""
    for attempt in range(300):
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 299:
                raise
            time.sleep(0.05)


def _sqlite_begin(conn) -> None:
    # Writers take the write lock up front (IMMEDIATE) so two writers never deadlock on a lock upgrade;
    # readers use DEFERRED and, under WAL, never block writers. An AUTOCOMMIT connection (one atomic
    # statement) gets no BEGIN: nothing would ever commit it.
    options = conn.get_execution_options()
    if options.get("isolation_level") != "AUTOCOMMIT":
        conn.exec_driver_sql(f"BEGIN {options.get('sqlite_begin', 'DEFERRED')}")


def create_engine(uri: str, pool_size: int | None = None, password_file: str | None = None) -> sa.Engine:
    """`password_file`: every new connection takes the password from this file, watched for changes
    (server/store/dbpassword.py); the URI must then hold none."""
    url = sqlalchemy_url(uri)
    pool_size = pool_size or int(os.environ.get("RUNYARD_DB_POOL_SIZE", "10"))
    if password_file is not None:
        password_file = dbpassword.check_password_file(uri, password_file)
    if url.get_backend_name() == "sqlite":
        engine = sa.create_engine(url, pool_size=pool_size, max_overflow=pool_size,
                                  connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    # A database host that drops packets must fail start-up and requests, not hang them.
    networked = url.get_backend_name() in ("postgresql", "mysql", "mariadb")
    connect_args = {"connect_timeout": 10} if networked else {}
    if url.get_backend_name() == "postgresql":
        # ... nor hang a pooled connection whose host vanished mid-conversation: unacknowledged data
        # fails the socket after 30 s (TCP_USER_TIMEOUT) instead of ~15 min of retransmissions, and
        # keepalives find a dead peer while we wait for an answer. A long query is not cut short: the
        # database's kernel acknowledges keepalives while it runs.
        connect_args.update(keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3,
                            tcp_user_timeout=30_000)
    # No pre-ping (a round trip per request): the store retries on a connection found dead instead.
    # The first connection found dead invalidates the whole pool (SQLAlchemy's default), so after a
    # database restart each request pays at most one retry and the pool refills by itself.
    engine = sa.create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_recycle=1800,
                              connect_args=connect_args)
    if password_file is not None:
        dbpassword.attach(engine, url, password_file)
    return engine
