"""Drives the Alembic chain of this package: where a database stands, upgrades, offline SQL, and the
start-up check that keeps a server off a database whose schema it does not match.

Engines are expected from `server.store.uri.create_engine` (its SQLite engine honours the
`sqlite_begin` execution option used for the migration lock).
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from server.errors import RunyardError
from server.store.schema import metadata
from server.store.uri import SUPPORTED_DIALECTS, embedded_folder, is_sqlalchemy_uri, redact

SCRIPT_LOCATION = Path(__file__).resolve().parent
LOCK_NAME = "runyard_migrations"
PG_LOCK_KEY = zlib.crc32(LOCK_NAME.encode())  # any fixed bigint; advisory locks are keyed by number
LOCK_TIMEOUT_S = 300


def _config(**attributes) -> Config:
    output = attributes.pop("output_buffer", None)
    cfg = Config(output_buffer=output)
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    cfg.attributes.update(attributes)
    return cfg


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head_revision() -> str:
    return _scripts().get_current_head()


@dataclass(frozen=True)
class SchemaState:
    revision: str | None  # as stored in alembic_version; several heads are joined by ","
    head: str
    known: bool  # the stored revision is part of this runyard's chain (or there is none)
    runyard_tables: tuple[str, ...]  # tables of ours present in the database

    @property
    def empty(self) -> bool:
        return self.revision is None and not self.runyard_tables

    @property
    def at_head(self) -> bool:
        return self.revision == self.head

    @property
    def status(self) -> str:
        """One word for humans and scripts: current, empty, behind, ahead or unmanaged."""
        if self.at_head:
            return "current"
        if self.empty:
            return "empty"
        if self.revision is None:
            return "unmanaged"
        return "behind" if self.known else "ahead"

    @property
    def upgrade_pending(self) -> bool:
        return self.status in ("empty", "behind")


def _state(conn: sa.Connection) -> SchemaState:
    heads = MigrationContext.configure(conn).get_current_heads()
    revision = ",".join(sorted(heads)) if heads else None
    scripts = _scripts()
    known = all(_knows(scripts, head) for head in heads)
    present = set(sa.inspect(conn).get_table_names())
    ours = tuple(sorted(present & set(metadata.tables)))
    return SchemaState(revision, scripts.get_current_head(), known, ours)


def _knows(scripts: ScriptDirectory, revision: str) -> bool:
    try:
        return scripts.get_revision(revision) is not None
    except CommandError:
        return False


def schema_state(engine: sa.Engine) -> SchemaState:
    with engine.connect() as conn:
        return _state(conn)


def current_revision(engine: sa.Engine) -> str | None:
    return schema_state(engine).revision


@contextmanager
def _exclusive(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A connection inside a transaction that holds the migration lock, so that of several processes
    starting at once only one migrates and the others then find its result."""
    with engine.connect() as conn:
        name = conn.dialect.name
        if name == "sqlite":
            conn.execution_options(sqlite_begin="IMMEDIATE")  # takes SQLite's write lock at BEGIN
        with conn.begin():
            if name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
            elif name == "mssql":
                conn.execute(sa.text("EXEC sp_getapplock @Resource = :name, @LockMode = 'Exclusive', "
                                     "@LockOwner = 'Transaction', @LockTimeout = :ms"),
                             {"name": LOCK_NAME, "ms": LOCK_TIMEOUT_S * 1000})
            elif name in ("mysql", "mariadb"):
                # DDL commits implicitly on MySQL, so the lock must be a session lock, released by hand.
                got = conn.execute(sa.text("SELECT GET_LOCK(:name, :timeout)"),
                                   {"name": LOCK_NAME, "timeout": LOCK_TIMEOUT_S}).scalar()
                if got != 1:
                    raise RunyardError("Timed out waiting for another runyard process to finish migrating "
                                       "the database", "INVALID_STATE")
                try:
                    yield conn
                finally:
                    _release_mysql_lock(conn)
                return
            yield conn


def _release_mysql_lock(conn: sa.Connection) -> None:
    try:
        conn.execute(sa.text("SELECT RELEASE_LOCK(:name)"), {"name": LOCK_NAME})
    except sa.exc.DBAPIError:
        conn.invalidate()  # closing the session releases the lock; never return it to the pool holding it


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def mismatch_message(state: SchemaState, uri_for_messages: str) -> str:
    shown = redact(uri_for_messages)
    if state.status == "unmanaged":
        tables = ", ".join(state.runyard_tables)
        return (f"Database {shown} already holds tables named like runyard's ({tables}) "
                "but no runyard schema revision, so runyard did not create them. Point runyard at an empty "
                "database or at one created by runyard.")
    if state.status == "ahead":
        return (f"Database schema is at revision {state.revision}, which this runyard (head {state.head}) "
                "does not know: the database was migrated by a newer runyard. Upgrade runyard to that "
                "version. (If the database belongs to another application, such as an MLflow server, "
                "give runyard a database of its own.)")
    return (f"Database schema is at revision {state.revision or 'none'} but this runyard needs {state.head}. "
            f"Take a backup, then run: runyard db upgrade {_quote(shown)}")


def _refuse_unless_upgradable(state: SchemaState, uri_for_messages: str) -> None:
    if state.status in ("ahead", "unmanaged"):
        raise RunyardError(mismatch_message(state, uri_for_messages), "INVALID_STATE")


def _run_upgrade(conn: sa.Connection, revision: str) -> None:
    try:
        command.upgrade(_config(connection=conn), revision)
    except CommandError as exc:
        raise RunyardError(f"Cannot upgrade to {revision}: {exc}", "INVALID_STATE") from None


def upgrade(engine: sa.Engine, revision: str = "head", uri_for_messages: str | None = None) -> SchemaState:
    """Migrates the database to `revision`; returns the state it had before."""
    uri = uri_for_messages or engine.url.render_as_string(hide_password=True)
    with _exclusive(engine) as conn:
        before = _state(conn)
        _refuse_unless_upgradable(before, uri)
        if not (before.at_head and revision == "head"):
            _run_upgrade(conn, revision)
    return before


def ensure_schema(engine: sa.Engine, uri_for_messages: str) -> None:
    """Initialises an empty database; refuses (RunyardError INVALID_STATE) one at any other revision
    than head, or holding our tables without a revision."""
    if schema_state(engine).at_head:
        return
    # Decide under the lock: another process may be migrating right now, and on MySQL (DDL is not
    # transactional) its half-done work is visible until it stamps the revision.
    with _exclusive(engine) as conn:
        state = _state(conn)
        if state.empty:
            _run_upgrade(conn, "head")
            return
    if not state.at_head:
        raise RunyardError(mismatch_message(state, uri_for_messages), "INVALID_STATE")


def dialect_of(url_or_dialect: str) -> str:
    """The dialect name of a dialect name, a SQLAlchemy URI, or a folder path (embedded SQLite)."""
    if url_or_dialect in SUPPORTED_DIALECTS:
        return url_or_dialect
    if is_sqlalchemy_uri(url_or_dialect):
        try:
            name = sa.engine.make_url(url_or_dialect).get_backend_name()
        except (sa.exc.ArgumentError, ValueError):
            raise RunyardError(f"Invalid database URI {redact(url_or_dialect)}",
                               "INVALID_PARAMETER_VALUE") from None
        if name not in SUPPORTED_DIALECTS:
            raise RunyardError(f"Unsupported database dialect {name!r}; use sqlite, postgresql, mysql, "
                               "mariadb or mssql", "INVALID_PARAMETER_VALUE")
        return name
    if embedded_folder(url_or_dialect) is not None:
        return "sqlite"
    raise RunyardError(f"Cannot tell the dialect of {redact(url_or_dialect)}", "INVALID_PARAMETER_VALUE")


def offline_sql(url_or_dialect: str, revision: str = "head") -> str:
    """The SQL that upgrading an empty database to `revision` would run; connects to nothing."""
    buffer = io.StringIO()
    try:
        config = _config(output_buffer=buffer, dialect_name=dialect_of(url_or_dialect))
        command.upgrade(config, revision, sql=True)
    except CommandError as exc:
        raise RunyardError(f"Cannot render SQL for {revision}: {exc}", "INVALID_STATE") from None
    return buffer.getvalue()
