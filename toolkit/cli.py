"""The `runyard` command. Thin on purpose: parse, call an operation, print."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from enum import Enum
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from server.errors import RunyardError
from server.store.uri import redact
from toolkit import db

app = typer.Typer(
    name="runyard",
    help="Runyard: a fast MLflow-compatible tracking server, and the tools to host it.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,  # tracebacks with locals could show a database password
)
db_app = typer.Typer(help="Back up, verify, restore and migrate the backend store.", no_args_is_help=True)
app.add_typer(db_app, name="db")

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)  # soft_wrap: a message stays on one line


class LogLevel(str, Enum):
    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"
    trace = "trace"


def _option(env_name: str, help: str, decls: tuple[str, ...] = (), **kwargs):
    """A server option that also reads RUNYARD_<NAME> (stated once in the command's help)."""
    return typer.Option(*decls, envvar=f"RUNYARD_{env_name}", show_envvar=False, help=help, **kwargs)


def _fail(message: str, error_code: str = "INVALID_STATE", as_json: bool = False,
          exit_code: int = 1) -> NoReturn:
    if as_json:
        sys.stdout.write(json.dumps({"error_code": error_code, "message": message}) + "\n")
    else:
        err.print(Text.assemble(("Error: ", "bold red"), message))
    raise typer.Exit(exit_code)


def _run(operation, *args, as_json: bool = False, **kwargs):
    try:
        return operation(*args, **kwargs)
    except RunyardError as exc:
        _fail(exc.message, exc.error_code, as_json)


def _print_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data) + "\n")


@app.command()
def server(
    backend_store_uri: Annotated[str, _option(
        "BACKEND_STORE_URI", "A folder (embedded SQLite inside it) or a database URI: postgresql://, "
        "mysql://, mssql://.")] = "./mlruns",
    default_artifact_root: Annotated[str | None, _option(
        "DEFAULT_ARTIFACT_ROOT", "Artifact root for new experiments (default: mlflow-artifacts:/ when "
        "serving artifacts, else the destination).", show_default=False)] = None,
    artifacts_destination: Annotated[str, _option(
        "ARTIFACTS_DESTINATION", "Where served artifacts are stored: a folder, s3://, gs://, wasbs://, "
        "hdfs://, ftp:// or sftp://.")] = "./mlartifacts",
    serve_artifacts: Annotated[bool, _option(
        "SERVE_ARTIFACTS", "Proxy artifact transfers through this server.",
        decls=("--serve-artifacts/--no-serve-artifacts",))] = True,
    host: Annotated[str, _option("HOST", "Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, _option("PORT", "Port to listen on.", min=0, max=65535)] = 5000,
    workers: Annotated[int, _option("WORKERS", "Worker processes.")] = 1,
    static_prefix: Annotated[str, _option(
        "STATIC_PREFIX", "Serve every route under this path, e.g. /mlflow.", show_default=False)] = "",
    allowed_hosts: Annotated[str | None, _option(
        "ALLOWED_HOSTS", "Comma-separated Host headers to accept, e.g. mlflow.example.com,*.corp "
        "(default: loopback and private addresses).", show_default=False)] = None,
    log_level: Annotated[LogLevel, _option("LOG_LEVEL", "Server log level.", case_sensitive=False)
                         ] = LogLevel.info,
) -> None:
    """Run the tracking server.

    Every option can also come from the environment as RUNYARD_<OPTION>, e.g. RUNYARD_PORT=8080 or
    RUNYARD_BACKEND_STORE_URI=postgresql://user:pw@db/runyard; a flag given on the command line wins.
    """
    from server.config import ServerConfig
    from server.serve import serve

    hosts = tuple(h.strip() for h in (allowed_hosts or "").split(",") if h.strip())
    try:
        config = ServerConfig(
            backend_store_uri=backend_store_uri, default_artifact_root=default_artifact_root,
            artifacts_destination=artifacts_destination, serve_artifacts=serve_artifacts, host=host,
            port=port, workers=workers, static_prefix=static_prefix, allowed_hosts=hosts,
            log_level=log_level.value)
    except ValueError as exc:
        _fail(str(exc), "INVALID_PARAMETER_VALUE", exit_code=2)
    # Checked once here, before any worker starts, so a mismatch is one clear message and exit code 1.
    _run(db.ensure_ready, config.backend_store_uri)
    serve(config)


UriArg = Annotated[str, typer.Argument(
    help="Backend store URI, as given to `runyard server --backend-store-uri` (a folder or a database URI).",
    show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]


@db_app.command("current")
def db_current(uri: UriArg, as_json: JsonOpt = False) -> None:
    """Show the database's schema revision and whether an upgrade is pending."""
    report = _run(db.current, uri, as_json=as_json)
    if as_json:
        return _print_json(report)
    notes = {
        "current": "up to date",
        "empty": "empty database: `runyard server` initialises it, or run `runyard db upgrade`",
        "behind": "upgrade pending: run `runyard db upgrade` (it backs the database up first)",
        "ahead": "migrated by a newer runyard: upgrade runyard",
        "unmanaged": "holds runyard-like tables that runyard did not create",
    }
    out.print(f"backend   {report['backend']}", markup=False)
    out.print(f"revision  {report['revision'] or 'none'}", markup=False)
    out.print(f"head      {report['head']}", markup=False)
    out.print(f"status    {notes[report['status']]}", markup=False)
    if report["interrupted"]:
        out.print(f"warning   an interrupted {report['interrupted']['kind']} was found: run `runyard db "
                  "upgrade` to finish or undo it", markup=False)


class _StageLines(db.Progress):
    """Progress as plain lines on stderr: what a job's log or a pipe should get."""

    def stage(self, text: str) -> None:
        err.print(f"• {text}", markup=False)

    def revisions(self, pending: list[str]):
        return lambda revision: err.print(f"  applied {revision}", markup=False)

    def waiting(self) -> None:
        self.stage("Waiting: another runyard process holds the migration lock")


class _StageBars(_StageLines):
    """Progress drawn live on a terminal: a spinner per step, a bar over the revisions."""

    def __init__(self, progress: Progress):
        self._progress = progress
        self._task = None

    def _finish(self) -> None:
        if self._task is not None:
            task = self._progress.tasks[self._task]
            self._progress.update(self._task, total=task.total or 1, completed=task.total or 1)

    def stage(self, text: str) -> None:
        self._finish()
        self._task = self._progress.add_task(text, total=None)

    def revisions(self, pending: list[str]):
        self._finish()
        self._task = self._progress.add_task(f"Applying {len(pending)} revision(s)", total=len(pending))
        return lambda revision: self._progress.advance(self._task)

    def close(self) -> None:
        self._finish()


@contextmanager
def _progress():
    if not err.is_terminal:
        yield _StageLines()
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as bars:
        reporter = _StageBars(bars)
        try:
            yield reporter
        finally:
            reporter.close()


def _confirm(question: str, yes: bool, as_json: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        _fail("Refusing to go on without confirmation: pass --yes (e.g. in a job)", "INVALID_PARAMETER_VALUE",
              as_json)
    if not typer.confirm(question, default=False, err=True):
        raise typer.Exit(1)


def _print_tables(tables: dict) -> None:
    """The tables that hold rows (the rest are counted, not listed)."""
    for table, rows in sorted(tables.items()):
        if rows:
            out.print(f"  {table:<24} {rows:>12,} rows", markup=False)
    empty = sum(1 for rows in tables.values() if not rows)
    if empty:
        out.print(f"  and {empty} empty table(s)", markup=False)


DestOpt = Annotated[str, typer.Option("--to", help="Folder or object-store URI to write the backup into.",
                                      show_default=False)]
KeepOpt = Annotated[int | None, typer.Option(
    "--keep", min=1, help="Keep only the newest N backups of this database in the destination.",
    show_default=False)]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation (for jobs).")]
LockTimeoutOpt = Annotated[float, typer.Option(
    "--lock-timeout", min=0, help="Seconds to wait for another runyard process holding the migration lock.")]
BackupArg = Annotated[str, typer.Argument(help="A backup: its folder, or its URI in an object store.",
                                          show_default=False)]


@db_app.command("backup")
def db_backup(uri: UriArg, to: DestOpt, keep: KeepOpt = None, as_json: JsonOpt = False) -> None:
    """Back the database up, with a manifest of every table's row count and checksum."""
    with _progress() as progress:
        report = _run(db.backup, uri, to, keep=keep, progress=progress, as_json=as_json)
    if as_json:
        return _print_json(report)
    out.print(f"Backed up {report['database']} (revision {report['revision'] or 'none'}) to "
              f"{report['backup']}: {report['size_bytes']:,} bytes in {report['duration_s']:.1f} s.",
              markup=False)
    _print_tables(report["tables"])
    for removed in report["pruned"]:
        out.print(f"Removed old backup {removed}", markup=False)


@db_app.command("verify")
def db_verify(
    backup: BackupArg,
    using: Annotated[str | None, typer.Option(
        "--using", help="Database URI of a server to restore into (its account must be able to create "
                        "databases). Default: the server the backup came from.", show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Restore a backup into a scratch database and compare it with its manifest."""
    with _progress() as progress:
        report = _run(db.verify, backup, using=using, progress=progress, as_json=as_json)
    if as_json:
        return _print_json(report)
    out.print(f"Verified {report['backup']}: every table restores to its recorded rows and checksum "
              f"({report['duration_s']:.1f} s).", markup=False)
    _print_tables(report["tables"])


@db_app.command("restore")
def db_restore(
    uri: UriArg,
    source: Annotated[str, typer.Option("--from", help="The backup to restore: its folder or URI.",
                                        show_default=False)],
    any_revision: Annotated[bool, typer.Option(
        "--any-revision", help="Restore a backup of another schema revision than the database's.")] = False,
    yes: YesOpt = False,
    lock_timeout: LockTimeoutOpt = db.DEFAULT_LOCK_TIMEOUT_S,
    as_json: JsonOpt = False,
) -> None:
    """Replace the database's contents with a backup's, then check them against its manifest."""
    _confirm(f"Replace every table of {redact(uri)} with the backup's?", yes, as_json)
    with _progress() as progress:
        report = _run(db.restore, uri, source, any_revision=any_revision, lock_timeout_s=lock_timeout,
                      progress=progress, as_json=as_json)
    if as_json:
        return _print_json(report)
    out.print(f"Restored {report['backup']} into {report['backend']} "
              f"(revision {report['revision'] or 'none'}); it matches the manifest "
              f"({report['duration_s']:.1f} s).", markup=False)


@db_app.command("upgrade")
def db_upgrade(
    uri: UriArg,
    backup_to: Annotated[str | None, typer.Option(
        "--backup-to", envvar="RUNYARD_BACKUP_TO", show_default=False,
        help="Folder or object-store URI for the backup taken first (default for a folder store: "
             "<folder>/backups). Also RUNYARD_BACKUP_TO.")] = None,
    no_backup: Annotated[bool, typer.Option(
        "--no-backup", help="Migrate without taking a backup first (not recommended).")] = False,
    keep: KeepOpt = None,
    sql: Annotated[bool, typer.Option(
        "--sql", help="Print the SQL the upgrade would run, for this URI's dialect; connect to nothing.")
    ] = False,
    from_revision: Annotated[str | None, typer.Option(
        "--from-revision", help="With --sql: the revision the database is at (default: an empty database).",
        show_default=False)] = None,
    yes: YesOpt = False,
    lock_timeout: LockTimeoutOpt = db.DEFAULT_LOCK_TIMEOUT_S,
    as_json: JsonOpt = False,
) -> None:
    """Back up, verify the backup, migrate the schema to this runyard's revision and check the result;
    on any failure the database is brought back as it was."""
    if sql:
        report = _run(db.upgrade, uri, sql=True, from_revision=from_revision, as_json=as_json)
        if as_json:
            return _print_json(report)
        sys.stdout.write(report["sql"])
        return
    plan = _run(db.plan_upgrade, uri, backup_to=backup_to, no_backup=no_backup, as_json=as_json)
    if plan["status"] == "behind" or plan["interrupted"]:  # initialising an empty database risks nothing
        backing_up = f", after a backup to {plan['backup_to']}" if plan["backup_to"] else ", WITHOUT a backup"
        _confirm(f"Upgrade the schema of {plan['backend']} from {plan['revision'] or 'nothing'} to "
                 f"{plan['head']}{backing_up}?", yes, as_json)
    with _progress() as progress:
        report = _run(db.upgrade, uri, backup_to=backup_to, no_backup=no_backup, keep=keep,
                      lock_timeout_s=lock_timeout, progress=progress, as_json=as_json)
    if as_json:
        return _print_json(report)
    for note in report["notes"]:
        out.print(note, markup=False)
    if report["upgraded"]:
        backed_up = f" (backup: {report['backup']})" if report["backup"] else ""
        out.print(f"Upgraded {report['backend']} from {report['previous_revision'] or 'an empty database'} "
                  f"to {report['revision']}{backed_up}.", markup=False)
    else:
        out.print(f"{report['backend']} is already at head ({report['revision']}); nothing to do.",
                  markup=False)
    for removed in report["pruned"]:
        out.print(f"Removed old backup {removed}", markup=False)


if __name__ == "__main__":
    app(prog_name="runyard")
