"""Database operations behind `runyard db …` and the server's start-up check.

Every operation takes a backend-store-uri as `runyard server` does, returns plain data for the CLI to
print, and raises only RunyardError (database and driver failures become one-line messages without the
password).

`upgrade` is the safe path: under the cross-process migration lock it backs the database up, proves the
backup restores to what it recorded, migrates, checks the result, and undoes a failure (the database's
own rollback where DDL is transactional, the backup elsewhere). A process killed half-way leaves a
marker in the database; the next `upgrade` finishes or undoes what it finds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from migrations import locks, marker, runner
from migrations.marker import Operation
from server.errors import RunyardError
from server.store.dbpassword import password_file_from_env, secrets_of, watched
from server.store.uri import (
    EMBEDDED_DB_NAME,
    create_engine,
    embedded_folder,
    redact,
    sqlalchemy_url,
    without_password,
)
from toolkit import backups, contents, dumps

DRIVER_EXTRAS = {"pymssql": "mssql"}
DEFAULT_LOCK_TIMEOUT_S = 3600.0  # a big database's backup can take a while


class Progress:
    """How long-running work reports itself. The CLI draws it; elsewhere it is silent."""

    def stage(self, text: str) -> None:
        """A new step begins."""

    def revisions(self, pending: list[str]) -> Callable[[str], None] | None:
        """Migrations are about to run; the returned callable is called as each revision is applied."""
        return None

    def waiting(self) -> None:
        """Another process holds the migration lock; this one waits."""


SILENT = Progress()


def _reason(exc: BaseException, *passwords: str | None) -> str:
    """The driver's own words, on one line, with the passwords scrubbed should a driver echo one."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    for password in passwords:
        text = text.replace(password, "***") if password else text
    return text


def _passwords(uri: str) -> tuple[str, ...]:
    """The URI's password, or those of RUNYARD_BACKEND_STORE_PASSWORD_FILE: what a message must not hold."""
    try:
        url = sa.engine.make_url(uri) if embedded_folder(uri) is None else None
    except (sa.exc.ArgumentError, ValueError):
        return ()
    if url is None:
        return ()
    if url.password is not None:
        return (str(url.password),)
    path = password_file_from_env(url)
    return watched(path).secrets() if path else ()


def _password_file(uri: str, password_file: str | None) -> str | None:
    """The password file given, else RUNYARD_BACKEND_STORE_PASSWORD_FILE for a database server URI
    without a password (as `runyard server` reads it)."""
    if password_file is not None or embedded_folder(uri) is not None:
        return password_file
    try:
        return password_file_from_env(sqlalchemy_url(uri))
    except RunyardError:
        return None  # create_engine says what is wrong with the URI


@contextmanager
def engine_for(uri: str, password_file: str | None = None) -> Iterator[sa.Engine]:
    """An engine for one operation, disposed afterwards; failures to reach the database are
    turned into RunyardError naming the (redacted) URI. `password_file`: as the server's
    --backend-store-password-file (default: RUNYARD_BACKEND_STORE_PASSWORD_FILE)."""
    engine = None
    try:
        engine = create_engine(uri, pool_size=2, password_file=_password_file(uri, password_file))
        yield engine
    except sa.exc.DBAPIError as exc:
        secrets = secrets_of(engine) if engine is not None else _passwords(uri)
        raise RunyardError(f"Cannot use database {redact(uri)}: {_reason(exc.orig, *secrets)}",
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


def _family(dialect: str) -> str:
    return "mysql" if dialect == "mariadb" else dialect


def database_id(uri: str) -> str:
    """Names a database the same way whatever password or driver the URI carries (for manifests)."""
    folder = embedded_folder(uri)
    if folder is not None:
        return str(folder)
    url = sqlalchemy_url(uri)
    return without_password(url.set(drivername=_family(url.get_backend_name()))).render_as_string(False)


def _report(uri: str, state: runner.SchemaState) -> dict:
    return {
        "backend": redact(uri),
        "revision": state.revision,
        "head": state.head,
        "status": state.status,
        "upgrade_pending": state.upgrade_pending,
        "interrupted": state.interrupted.as_dict() if state.interrupted else None,
    }


def current(uri: str) -> dict:
    """Where the database's schema stands against this runyard's head revision."""
    if _missing_embedded_db(uri):
        return _report(uri, runner.SchemaState(None, runner.head_revision(), True, ()))
    with engine_for(uri) as engine:
        return _report(uri, runner.schema_state(engine))


def ensure_ready(uri: str, password_file: str | None = None) -> None:
    """What a starting server needs: an empty database is initialised, a mismatched one refused.
    `password_file`: the server's --backend-store-password-file."""
    with engine_for(uri, password_file) as engine:
        runner.ensure_schema(engine, uri)


# ---- backup -----------------------------------------------------------------------------------------

def _refuse_mssql(uri: str, what: str) -> None:
    if runner.dialect_of(uri) != "mssql":
        return
    url = sqlalchemy_url(uri)
    statements = "; ".join(dumps.mssql_statements(url.database or "runyard",
                                                  f"/var/opt/mssql/backup/{url.database}.bak"))
    raise RunyardError(
        f"SQL Server writes backups to its own disk, so runyard cannot {what} them. Run with sqlcmd: "
        f"{statements}. Then upgrade with --no-backup.", "INVALID_STATE")


def backup(uri: str, to: str, keep: int | None = None, progress: Progress = SILENT) -> dict:
    """Backs the database up into the destination `to` (a folder or an object-store URI)."""
    _refuse_mssql(uri, "take")
    if _missing_embedded_db(uri):
        raise RunyardError(f"There is no database to back up at {embedded_folder(uri)}", "INVALID_STATE")
    dest = backups.destination(to)
    with engine_for(uri) as engine:
        state = runner.schema_state(engine)
        return _backup(engine, uri, dest, state.revision, keep, progress)


def _backup(engine: sa.Engine, uri: str, dest: backups.Destination, revision: str | None,
            keep: int | None, progress: Progress) -> dict:
    dialect = engine.dialect.name
    started, created = time.monotonic(), datetime.now(UTC)
    with dest.staging() as staged:
        progress.stage(f"Backing up {redact(uri)}")
        data = staged / dumps.data_file_name(dialect)
        if dialect == "sqlite":
            dumped = dumps.sqlite_dump(engine.url, data)
        elif dialect == "postgresql":
            dumped = dumps.postgres_dump(engine, engine.url, data)
        else:
            dumped = dumps.mysql_dump(engine, engine.url, data)
        progress.stage("Writing the manifest")
        stamp = created.strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z"
        name = f"{backups.PREFIX}{stamp}-{revision or 'empty'}"
        manifest = {
            "format": backups.FORMAT,
            "name": name,
            "created_at": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "dialect": _family(dialect),
            "database": database_id(uri),
            "schema": dumped.tools.pop("schema", None),
            "revision": revision,
            "data_file": data.name,
            "size_bytes": data.stat().st_size,
            "sha256": backups.sha256_of(data),
            "checksum_method": contents.method(dialect),
            "tables": dumped.tables,
            "tools": {"runyard": _runyard_version(), **dumped.tools},
            "duration_s": round(time.monotonic() - started, 3),
        }
        backups.write_manifest(staged, manifest)
        location = dest.publish(staged, name)
    pruned = backups.prune(dest, manifest["database"], keep) if keep else []
    return {"backup": location, "database": manifest["database"], "revision": revision,
            "size_bytes": manifest["size_bytes"], "duration_s": manifest["duration_s"],
            "tables": {table: stats["rows"] for table, stats in manifest["tables"].items()},
            "pruned": pruned}


def _runyard_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("runyard")
    except PackageNotFoundError:
        return "unknown"


# ---- verify and restore -----------------------------------------------------------------------------

@contextmanager
def _open_backup(location: str) -> Iterator[tuple[dict, Path, str]]:
    """The manifest and the checked dump file of a backup, fetched locally for the block."""
    dest, name = backups.split(location)
    shown = dest.location_of(name)
    with dest.fetch(name) as folder:
        manifest = backups.read_manifest(folder, shown)
        yield manifest, backups.check_data_file(folder, manifest, shown), shown


def _stats(url: sa.URL) -> dict[str, dict]:
    if url.get_backend_name() == "sqlite":
        return contents.sqlite_file_stats(url.database)
    engine = dumps.engine_for(url)
    try:
        with engine.connect() as conn:
            return contents.table_stats(conn)
    finally:
        engine.dispose()


def _load(manifest: dict, url: sa.URL, data: Path, scratch: bool = False) -> None:
    """Replaces the tables of the database `url` names with the backup's (`scratch`: an empty database
    made for verification)."""
    dialect = _family(url.get_backend_name())
    if dialect == "sqlite":
        dumps.sqlite_restore(url, data)
    elif dialect == "postgresql":
        dumps.postgres_restore(url, data, manifest.get("schema") or "public")
    elif scratch:
        dumps.mysql_load(url, data)
    else:  # checked in its staging database, before it replaces anything
        dumps.mysql_restore(url, data, lambda staged: _compare(manifest, _stats(staged), "The restored copy"))


def _same_kind(manifest: dict, url: sa.URL, location: str) -> None:
    dialect = _family(url.get_backend_name())
    if manifest["dialect"] != dialect:
        raise RunyardError(f"Backup {location} is of a {manifest['dialect']} database; it cannot be restored "
                           f"into {dialect}", "INVALID_PARAMETER_VALUE")


def _compare(manifest: dict, actual: dict[str, dict], what: str) -> None:
    diffs = contents.differences(manifest["tables"], actual)
    if diffs:
        shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
        raise RunyardError(f"{what} does not match the backup's manifest: {shown}", "INVALID_STATE")


def verify(location: str, using: str | None = None, progress: Progress = SILENT) -> dict:
    """Restores the backup into a scratch database of the same kind and compares it with the manifest.
    PostgreSQL and MySQL need a server to do it on: `using` (a database URI whose account may create
    databases), else the server the backup came from, as the manifest names it (without password)."""
    started = time.monotonic()
    with _open_backup(location) as (manifest, data, shown):
        # SQLite restores into a temporary file: no server to use.
        server = sqlalchemy_url(using) if using and manifest["dialect"] != "sqlite" else _server_of(manifest)
        _same_kind(manifest, server, shown)
        progress.stage(f"Restoring {shown} into a scratch database")
        try:
            with dumps.scratch_database(server) as scratch:
                _load(manifest, scratch, data, scratch=True)
                progress.stage("Comparing with the manifest")
                actual = _stats(scratch)
        except sa.exc.DBAPIError as exc:
            reason = _reason(exc.orig, server.password, dumps.tool_password(server))
            raise RunyardError(f"Cannot verify on {server.render_as_string(hide_password=True)}: {reason}",
                               "INVALID_STATE") from None
        _compare(manifest, actual, f"Backup {shown}, restored,")
    return {"backup": shown, "verified": True, "revision": manifest["revision"],
            "tables": {table: stats["rows"] for table, stats in manifest["tables"].items()},
            "duration_s": round(time.monotonic() - started, 3)}


def _server_of(manifest: dict) -> sa.URL:
    if manifest["dialect"] == "sqlite":
        return sa.URL.create("sqlite")
    return sqlalchemy_url(manifest["database"])


def restore(uri: str, source: str, any_revision: bool = False,
            lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S, progress: Progress = SILENT) -> dict:
    """Replaces the database's contents with the backup's, then checks them against its manifest.
    Refuses a backup of another schema revision than the database's unless `any_revision`."""
    started = time.monotonic()
    with _open_backup(source) as (manifest, data, shown), engine_for(uri) as engine:
        _same_kind(manifest, engine.url, shown)
        with locks.session_lock(engine, lock_timeout_s, progress.waiting):
            state = runner.schema_state(engine)
            if not any_revision and not state.empty and state.revision != manifest["revision"]:
                raise RunyardError(
                    f"Backup {shown} is of schema revision {manifest['revision']} but the database is at "
                    f"{state.revision}; restoring it would move the schema too. Pass --any-revision to "
                    "restore it anyway.", "INVALID_STATE")
            _restore_checked(engine, manifest, data, shown, state, progress)
    return {"backend": redact(uri), "backup": shown, "revision": manifest["revision"],
            "previous_revision": state.revision, "duration_s": round(time.monotonic() - started, 3)}


def _restore_checked(engine: sa.Engine, manifest: dict, data: Path, shown: str,
                     state: runner.SchemaState, progress: Progress) -> None:
    """Restore under the marker (a killed restore is then found and redone), then compare."""
    with engine.begin() as conn:
        marker.write(conn, Operation("restore", state.revision, manifest["revision"], shown))
    progress.stage(f"Restoring {shown}")
    try:
        _load(manifest, engine.url, data)
    except RunyardError:
        # Every kind of restore fails without touching the database (a transaction, or MySQL's staging
        # database), so nothing was left half-done.
        with engine.begin() as conn:
            marker.clear(conn)
        raise
    engine.dispose()  # pooled connections may hold the schema as it was
    progress.stage("Comparing with the manifest")
    with engine.connect() as conn:
        actual = contents.table_stats(conn)
    _compare(manifest, actual, "The restored database")
    with engine.begin() as conn:
        marker.clear(conn)


def _restore_location(engine: sa.Engine, location: str, state: runner.SchemaState,
                      progress: Progress) -> None:
    with _open_backup(location) as (manifest, data, shown):
        _restore_checked(engine, manifest, data, shown, state, progress)


# ---- upgrade ----------------------------------------------------------------------------------------

def default_backup_destination(uri: str) -> str | None:
    """Beside an embedded store its backups have an obvious home; a database server's do not."""
    folder = embedded_folder(uri)
    return str(folder / "backups") if folder is not None else None


def _backup_destination(uri: str, state: runner.SchemaState, pending: list[str], backup_to: str | None,
                        no_backup: bool) -> str | None:
    """Where the upgrade from `state` through `pending` keeps its backup; None when it takes none."""
    if no_backup or state.empty or not pending:
        return None
    _refuse_mssql(uri, "take")
    destination = backup_to or default_backup_destination(uri)
    if destination is None:
        raise RunyardError("Say where to keep the backup taken before upgrading: --backup-to DEST "
                           "(a folder or an object-store URI), or skip it with --no-backup",
                           "INVALID_PARAMETER_VALUE")
    return destination


def plan_upgrade(uri: str, backup_to: str | None = None, no_backup: bool = False) -> dict:
    """What `upgrade` would do, checked before asking for confirmation: `current`'s report plus the
    backup destination. Refuses the arguments `upgrade` would refuse."""
    if not no_backup:
        _refuse_mssql(uri, "take")  # before connecting: its driver may not even be installed
    if _missing_embedded_db(uri):
        return {**current(uri), "backup_to": None}
    with engine_for(uri) as engine:
        state = runner.schema_state(engine)
    destination = _backup_destination(uri, state, runner.pending_revisions(state), backup_to, no_backup)
    return {**_report(uri, state), "backup_to": destination}


def upgrade(uri: str, sql: bool = False, backup_to: str | None = None, no_backup: bool = False,
            keep: int | None = None, revision: str = "head", lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
            progress: Progress = SILENT, from_revision: str | None = None) -> dict:
    """Migrates the database to `revision` the safe way (see the module's docstring). With `sql`, only
    renders the SQL, for a database at `from_revision` (default: an empty one) of the URI's dialect;
    nothing is connected to or written."""
    if sql:
        return {"backend": redact(uri), "head": runner.head_revision(),
                "sql": runner.offline_sql(uri, revision, from_revision)}
    if keep is not None and keep < 1:
        raise RunyardError("--keep must be at least 1", "INVALID_PARAMETER_VALUE")
    started = time.monotonic()
    with engine_for(uri) as engine, locks.session_lock(engine, lock_timeout_s, progress.waiting):
        before = runner.schema_state(engine)
        notes = []
        if before.interrupted is not None:
            notes.append(_resolve_interrupted(engine, uri, before, progress))
            before = runner.schema_state(engine)
        runner.refuse_unless_upgradable(before, uri)
        pending = runner.pending_revisions(before, revision)
        made = None
        destination = _backup_destination(uri, before, pending, backup_to, no_backup)
        if destination is not None:
            made = _backup(engine, uri, backups.destination(destination), before.revision, keep, progress)
            verify(made["backup"], using=uri, progress=progress)
        if pending:
            progress.stage(f"Migrating {before.revision or 'an empty database'} → {pending[-1]}")
            try:
                runner.migrate(engine, revision, made and made["backup"], progress.revisions(pending))
            except (Exception, KeyboardInterrupt) as exc:
                raise RunyardError(_undo(engine, uri, before, made and made["backup"], pending[-1], exc,
                                         progress), "INVALID_STATE") from None
        after = runner.schema_state(engine)
    report = _report(uri, after)
    report.update(previous_revision=before.revision, upgraded=before.revision != after.revision,
                  backup=made and made["backup"], pruned=made["pruned"] if made else [], notes=notes,
                  duration_s=round(time.monotonic() - started, 3))
    return report


def _failure(exc: BaseException, uri: str) -> str:
    if isinstance(exc, RunyardError):
        return exc.message
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return _reason(exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc, *_passwords(uri))


def _undo(engine: sa.Engine, uri: str, before: runner.SchemaState, backup_location: str | None,
          target: str, exc: BaseException, progress: Progress) -> str:
    """Brings the database back to `before` after a failed migration; returns what to tell the user."""
    failed = (f"Upgrading from {before.revision or 'an empty database'} to {target} failed: "
              f"{_failure(exc, uri)}.")
    try:
        now = runner.schema_state(engine)
        if (engine.dialect.name in runner.TRANSACTIONAL_DDL and now.revision == before.revision
                and now.runyard_tables == before.runyard_tables):
            with engine.begin() as conn:
                marker.clear(conn)
            return (f"{failed} The database rolled the migration back; it is at "
                    f"{before.revision or 'no revision'} as before.")
        if backup_location is None:
            return (f"{failed} No backup was taken (--no-backup), and this database commits each schema "
                    "change: it may be partly migrated. Restore your own backup with `runyard db restore`.")
        progress.stage(f"Restoring {backup_location}")
        _restore_location(engine, backup_location, before, progress)
    except (RunyardError, sa.exc.SQLAlchemyError, OSError) as undo_exc:
        return (f"{failed} Undoing it failed too: {_failure(undo_exc, uri)}. Run "
                f"{runner.upgrade_command(uri)} again to retry the restore.")
    return f"{failed} Restored the backup {backup_location}: the database is as it was before the upgrade."


def _resolve_interrupted(engine: sa.Engine, uri: str, state: runner.SchemaState, progress: Progress) -> str:
    """Finishes or undoes an upgrade or restore whose process died (we hold the lock, so it is dead)."""
    operation = state.interrupted
    what = operation.describe()
    if operation.kind == "upgrade" and state.revision == operation.to_revision:
        with engine.begin() as conn:
            marker.clear(conn)
        return f"{what} had finished before it was interrupted."
    if engine.dialect.name in runner.TRANSACTIONAL_DDL:
        with engine.begin() as conn:
            marker.clear(conn)
        return f"{what} was interrupted; the database rolled it back."
    if operation.backup is None:
        raise RunyardError(
            f"{what} was interrupted without a backup (--no-backup): the database may be partly migrated. "
            "Restore your own backup with `runyard db restore`.", "INVALID_STATE")
    progress.stage(f"Restoring {operation.backup} after the interrupted {operation.kind}")
    _restore_location(engine, operation.backup, state, progress)
    return f"{what} was interrupted; restored the backup {operation.backup} it had taken."
