"""Drives the Alembic chain of this package: where a database stands, upgrades, offline SQL, and the
start-up check that keeps a server off a database whose schema it does not match.

Engines are expected from `server.store.uri.create_engine` (its SQLite engine honours the
`sqlite_begin` execution option used for the migration lock).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from migrations import locks, marker
from migrations.marker import Operation
from server.errors import RunyardError
from server.store.schema import metadata
from server.store.uri import SUPPORTED_DIALECTS, embedded_folder, is_sqlalchemy_uri, redact

SCRIPT_LOCATION = Path(__file__).resolve().parent
# Where a failed migration is undone by the database itself; elsewhere (MySQL, MariaDB) DDL commits
# implicitly, and only a backup brings the database back.
TRANSACTIONAL_DDL = frozenset({"sqlite", "postgresql", "mssql"})


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
    interrupted: Operation | None = None  # an upgrade or restore that did not finish

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
    return SchemaState(revision, scripts.get_current_head(), known, ours, marker.read(conn, present))


def _knows(scripts: ScriptDirectory, revision: str) -> bool:
    try:
        return scripts.get_revision(revision) is not None
    except CommandError:
        return False


def schema_state(engine: sa.Engine) -> SchemaState:
    with engine.connect() as conn:
        return _state(conn)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def upgrade_command(uri_for_messages: str) -> str:
    return f"runyard db upgrade {_quote(redact(uri_for_messages))}"


def mismatch_message(state: SchemaState, uri_for_messages: str) -> str:
    shown = redact(uri_for_messages)
    if state.interrupted is not None:
        return (f"{state.interrupted.describe()} did not finish. Run: {upgrade_command(shown)} "
                "(it finishes or undoes the interrupted operation).")
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
            f"Run: {upgrade_command(shown)} (it backs the database up first).")


def refuse_unless_upgradable(state: SchemaState, uri_for_messages: str) -> None:
    if state.status in ("ahead", "unmanaged"):
        raise RunyardError(mismatch_message(state, uri_for_messages), "INVALID_STATE")


def _run_upgrade(conn: sa.Connection, revision: str,
                 on_revision: Callable[[str], None] | None = None) -> None:
    try:
        command.upgrade(_config(connection=conn, on_revision=on_revision), revision)
    except CommandError as exc:
        raise RunyardError(f"Cannot upgrade to {revision}: {exc}", "INVALID_STATE") from None


def _resolve(scripts: ScriptDirectory, revision: str) -> str:
    try:
        script = scripts.get_revision(revision)
    except CommandError as exc:
        raise RunyardError(f"Unknown revision {revision!r}: {exc}", "INVALID_PARAMETER_VALUE") from None
    if script is None:
        raise RunyardError(f"Unknown revision {revision!r}", "INVALID_PARAMETER_VALUE")
    return script.revision


def pending_revisions(state: SchemaState, revision: str = "head") -> list[str]:
    """The revisions an upgrade from `state` to `revision` applies, oldest first."""
    scripts = _scripts()
    target = _resolve(scripts, revision)
    if state.revision == target:
        return []
    steps = scripts.iterate_revisions(target, state.revision or "base")
    return [script.revision for script in reversed(list(steps))]


def _moved_tables(revisions: list[str]) -> set[str] | None:
    """Tables whose row counts the given revisions may change (a revision declares them in `moves_rows`;
    `True` means any table); None when any table may change."""
    scripts = _scripts()
    moved: set[str] = set()
    for revision in revisions:
        declared = getattr(scripts.get_revision(revision).module, "moves_rows", ())
        if declared is True:
            return None
        moved.update(declared)
    return moved


def row_counts(conn: sa.Connection, tables) -> dict[str, int]:
    quote = conn.dialect.identifier_preparer.quote
    return {table: conn.execute(sa.text(f"SELECT COUNT(*) FROM {quote(table)}")).scalar_one()
            for table in sorted(tables)}


def _hold_writers(conn: sa.Connection, tables) -> None:
    """Blocks writers (not readers) for the rest of the transaction, so the row counts compared around
    the migration are not moved by a running server. SQLite's IMMEDIATE transaction already does."""
    if conn.dialect.name == "postgresql" and tables:
        quote = conn.dialect.identifier_preparer.quote
        conn.execute(sa.text(f"LOCK TABLE {', '.join(quote(t) for t in sorted(tables))} IN SHARE MODE"))


def _check_result(before: SchemaState, after: SchemaState, target: str, counts_before: dict[str, int],
                  counts_after: dict[str, int], moved: set[str] | None) -> None:
    if after.revision != target:
        raise RunyardError(f"After migrating, the database is at revision {after.revision}, not {target}",
                           "INVALID_STATE")
    if moved is None:
        return
    changed = [f"{table} {count} -> {counts_after[table]}" for table, count in counts_before.items()
               if table in counts_after and table not in moved and count != counts_after[table]]
    if changed:
        raise RunyardError("Row counts changed in tables no migration was meant to touch: "
                           + ", ".join(changed), "INVALID_STATE")


def migrate(engine: sa.Engine, revision: str = "head", backup: str | None = None,
            on_revision: Callable[[str], None] | None = None) -> SchemaState:
    """Applies the pending revisions and checks the result; returns the state afterwards. The caller
    holds `locks.session_lock` and has refused databases that cannot be upgraded.

    The interrupted-operation marker (naming `backup`) is committed first. Where DDL is transactional
    the revisions, the check and the marker's removal are one transaction, so a failure or a killed
    process leaves the database exactly as it was (plus the marker, when killed); elsewhere each
    statement commits, and the caller restores the backup after a failure.
    """
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            conn.execution_options(sqlite_begin="IMMEDIATE")
        with conn.begin():
            before = _state(conn)
            revisions = pending_revisions(before, revision)
            target = revisions[-1] if revisions else before.revision
            marker.write(conn, Operation("upgrade", before.revision, target, backup))
        transactional = conn.dialect.name in TRANSACTIONAL_DDL
        with conn.begin():
            _hold_writers(conn, before.runyard_tables)
            counts_before = row_counts(conn, before.runyard_tables)
            _run_upgrade(conn, revision, on_revision)
            after = _state(conn)
            _check_result(before, after, target, counts_before, row_counts(conn, after.runyard_tables),
                          _moved_tables(revisions))
            if transactional:
                marker.clear(conn)
        if not transactional:
            with conn.begin():
                marker.clear(conn)
    return schema_state(engine)


def upgrade(engine: sa.Engine, revision: str = "head", uri_for_messages: str | None = None,
            lock_timeout_s: float = locks.TRANSACTION_LOCK_TIMEOUT_S) -> SchemaState:
    """Migrates the database to `revision` under the migration lock, without a backup (the toolkit's
    `runyard db upgrade` adds one); returns the state it had before."""
    uri = uri_for_messages or engine.url.render_as_string(hide_password=True)
    with locks.session_lock(engine, lock_timeout_s):
        before = schema_state(engine)
        if before.interrupted is not None:
            raise RunyardError(mismatch_message(before, uri), "INVALID_STATE")
        refuse_unless_upgradable(before, uri)
        if pending_revisions(before, revision):
            migrate(engine, revision)
    return before


def ensure_schema(engine: sa.Engine, uri_for_messages: str) -> None:
    """Initialises an empty database; refuses (RunyardError INVALID_STATE) one at any other revision
    than head, one holding our tables without a revision, and one whose upgrade or restore was
    interrupted."""
    state = schema_state(engine)
    if state.at_head and state.interrupted is None:
        return
    # Decide under the lock: another process may be migrating right now, and on MySQL (DDL is not
    # transactional) its half-done work is visible until it stamps the revision.
    with locks.transaction_lock(engine) as conn:
        state = _state(conn)
        if state.empty and state.interrupted is None:
            _run_upgrade(conn, "head")
            return
    if not state.at_head or state.interrupted is not None:
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


def offline_sql(url_or_dialect: str, revision: str = "head", from_revision: str | None = None) -> str:
    """The SQL that upgrading a database at `from_revision` (default: an empty one) to `revision` would
    run; connects to nothing."""
    buffer = io.StringIO()
    steps = f"{from_revision}:{revision}" if from_revision else revision
    try:
        config = _config(output_buffer=buffer, dialect_name=dialect_of(url_or_dialect))
        command.upgrade(config, steps, sql=True)
    except CommandError as exc:
        raise RunyardError(f"Cannot render SQL for {steps}: {exc}", "INVALID_STATE") from None
    return buffer.getvalue()
