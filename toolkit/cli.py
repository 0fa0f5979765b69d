"""The `runyard` command. Thin on purpose: parse, call an operation, print."""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from server.errors import RunyardError
from toolkit import db

app = typer.Typer(
    name="runyard",
    help="Runyard: a fast MLflow-compatible tracking server, and the tools to host it.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,  # tracebacks with locals could show a database password
)
db_app = typer.Typer(help="Inspect and migrate the backend store's schema.", no_args_is_help=True)
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
        "behind": "upgrade pending: take a backup, then run `runyard db upgrade`",
        "ahead": "migrated by a newer runyard: upgrade runyard",
        "unmanaged": "holds runyard-like tables that runyard did not create",
    }
    out.print(f"backend   {report['backend']}", markup=False)
    out.print(f"revision  {report['revision'] or 'none'}", markup=False)
    out.print(f"head      {report['head']}", markup=False)
    out.print(f"status    {notes[report['status']]}", markup=False)


@db_app.command("upgrade")
def db_upgrade(
    uri: UriArg,
    sql: Annotated[bool, typer.Option(
        "--sql", help="Print the SQL that would create the schema in an empty database of this dialect; "
                      "connect to nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Migrate the database's schema to this runyard's revision. Take a backup first."""
    if sql:
        report = _run(db.upgrade, uri, sql=True, as_json=as_json)
        if as_json:
            return _print_json(report)
        sys.stdout.write(report["sql"])
        return
    with err.status("Migrating…"):
        report = _run(db.upgrade, uri, as_json=as_json)
    if as_json:
        return _print_json(report)
    if report["upgraded"]:
        out.print(f"Upgraded {report['backend']} from {report['previous_revision'] or 'an empty database'} "
                  f"to {report['revision']}.", markup=False)
    else:
        out.print(f"{report['backend']} is already at {report['revision']}; nothing to do.", markup=False)


if __name__ == "__main__":
    app(prog_name="runyard")
