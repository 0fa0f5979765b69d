"""The `runyard` command. Thin on purpose: parse, call an operation, print."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import Enum
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from server.store.tokens import PEPPER_ENV, load_pepper
from server.store.uri import redact
from toolkit import db, tokens
from toolkit.console import JsonOpt, YesOpt, err, out
from toolkit.console import confirm as _confirm
from toolkit.console import fail as _fail
from toolkit.console import print_json as _print_json
from toolkit.console import run as _run
from toolkit.deploy.commands import deploy_app

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
tokens_app = typer.Typer(help="Bearer tokens for NGINX's token auth, kept as hashes in the backend store.",
                         no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")
users_app = typer.Typer(help="Basic-auth users, in the htpasswd file `runyard server --htpasswd` checks.",
                        no_args_is_help=True)
app.add_typer(users_app, name="users")
nginx_app = typer.Typer(help="NGINX in front of the server: configuration, checks, development certificates.",
                        no_args_is_help=True)
app.add_typer(nginx_app, name="nginx")
app.add_typer(deploy_app, name="deploy")
rotate_app = typer.Typer(help="Replace a credential without downtime: each rotation is verified, and undone "
                              "if it fails.", no_args_is_help=True)
app.add_typer(rotate_app, name="rotate")


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


def _split(values: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (values or "").split(",") if v.strip())


@app.command()
def server(
    backend_store_uri: Annotated[str, _option(
        "BACKEND_STORE_URI", "A folder (embedded SQLite inside it) or a database URI: postgresql://, "
        "mysql://, mssql://.")] = "./mlruns",
    backend_store_password_file: Annotated[str | None, _option(
        "BACKEND_STORE_PASSWORD_FILE", "File holding the database password (not in the URI); re-read for "
        "new connections, so it can be rotated without a restart.", show_default=False)] = None,
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
    trusted_proxies: Annotated[str | None, _option(
        "TRUSTED_PROXIES", "Comma-separated addresses or networks of reverse proxies (NGINX) whose "
        "X-Forwarded-User header names the request's user, e.g. 127.0.0.1.", show_default=False)] = None,
    token_pepper_file: Annotated[str | None, _option(
        "TOKEN_PEPPER_FILE", "File holding the secret key bearer tokens are hashed with; give "
        "`runyard tokens` the same one.", show_default=False)] = None,
    htpasswd_file: Annotated[str | None, _option(
        "HTPASSWD", "htpasswd file (bcrypt) of the basic-auth users NGINX asks about; see `runyard users`.",
        decls=("--htpasswd",), show_default=False)] = None,
    expose_prometheus: Annotated[str | None, _option(
        "EXPOSE_PROMETHEUS", "Serve Prometheus metrics at /metrics; the folder holds the workers' "
        "metric files.", show_default=False)] = None,
) -> None:
    """Run the tracking server.

    Every option can also come from the environment as RUNYARD_<OPTION>, e.g. RUNYARD_PORT=8080 or
    RUNYARD_BACKEND_STORE_URI=postgresql://user:pw@db/runyard; a flag given on the command line wins.
    """
    from server.config import ServerConfig
    from server.serve import serve

    try:
        config = ServerConfig(
            backend_store_uri=backend_store_uri, backend_store_password_file=backend_store_password_file,
            default_artifact_root=default_artifact_root,
            artifacts_destination=artifacts_destination, serve_artifacts=serve_artifacts, host=host,
            port=port, workers=workers, static_prefix=static_prefix, allowed_hosts=_split(allowed_hosts),
            log_level=log_level.value, trusted_proxies=_split(trusted_proxies),
            token_pepper_file=token_pepper_file, htpasswd_file=htpasswd_file,
            expose_prometheus=expose_prometheus)
    except ValueError as exc:
        _fail(str(exc), "INVALID_PARAMETER_VALUE", exit_code=2)
    # Checked once here, before any worker starts, so a mismatch is one clear message and exit code 1.
    _run(db.ensure_ready, config.backend_store_uri, config.backend_store_password_file)
    _run(load_pepper, config.token_pepper_file)
    if config.htpasswd_file:
        from server.passwords import PasswordFile

        _run(PasswordFile, config.htpasswd_file)
    _run(serve, config)


# The URI may hold a password, so jobs pass it in the environment rather than in argv.
UriArg = Annotated[str, typer.Argument(
    envvar="RUNYARD_BACKEND_STORE_URI", show_envvar=False, show_default=False,
    help="Backend store URI, as given to `runyard server --backend-store-uri` (a folder or a database URI); "
         "when omitted, RUNYARD_BACKEND_STORE_URI.")]


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

    def countdown(self, total_s: float):
        self.stage(f"Waiting {total_s:g} s: old and new credentials both work meanwhile")
        return None


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

    def countdown(self, total_s: float):
        self._finish()
        self._task = self._progress.add_task(f"Overlap: old and new both work ({total_s:g} s)", total=total_s)
        return lambda elapsed: self._progress.update(self._task, completed=elapsed)

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


# ---- tokens -------------------------------------------------------------------------------------------

StoreOpt = Annotated[str, typer.Option(
    "--backend-store-uri", envvar="RUNYARD_BACKEND_STORE_URI",
    help="The server's backend store (also RUNYARD_BACKEND_STORE_URI).")]
PepperOpt = Annotated[str | None, typer.Option(
    "--pepper-file", envvar=PEPPER_ENV, show_default=False,
    help=f"The server's --token-pepper-file (also {PEPPER_ENV}).")]


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Option("--name", help="A unique name for the token, e.g. ci-pipeline.",
                                      show_default=False)],
    user: Annotated[str | None, typer.Option(
        "--user", help="The user the token acts as (default: its name).", show_default=False)] = None,
    expires: Annotated[str | None, typer.Option(
        "--expires", help="Lifetime, e.g. 90d, 12h, 2w (default: never).", show_default=False)] = None,
    uri: StoreOpt = "./mlruns",
    pepper_file: PepperOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a token and print it, once: only its hash is kept."""
    token, info = _run(tokens.create, uri, name, user, expires, pepper_file, as_json=as_json)
    if as_json:
        return _print_json({"token": token, **info})
    sys.stdout.write(token + "\n")  # alone on stdout, so TOKEN=$(runyard tokens create …) works
    err.print(f"Created token '{info['name']}' for user '{info['user']}', expires "
              f"{_when(info['expires_time']) if info['expires_time'] else 'never'}. It is shown only now; "
              "clients send it as MLFLOW_TRACKING_TOKEN.", markup=False)


@tokens_app.command("list")
def tokens_list(uri: StoreOpt = "./mlruns", pepper_file: PepperOpt = None, as_json: JsonOpt = False) -> None:
    """List tokens (names, users, dates; never the tokens)."""
    rows = _run(tokens.list_tokens, uri, pepper_file, as_json=as_json)
    if as_json:
        return _print_json({"tokens": rows})
    out.print(f"{'NAME':<24} {'USER':<20} {'STATUS':<8} {'CREATED':<20} {'EXPIRES':<20} LAST USED",
              markup=False)
    for row in rows:
        out.print(f"{row['name']:<24} {row['user']:<20} {row['status']:<8} {_when(row['created_time']):<20} "
                  f"{_when(row['expires_time']):<20} {_when(row['last_used_time'])}", markup=False)


@tokens_app.command("revoke")
def tokens_revoke(
    name: Annotated[str, typer.Argument(help="The token's name.", show_default=False)],
    uri: StoreOpt = "./mlruns",
    pepper_file: PepperOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a token: it stops working on the next request."""
    _run(tokens.revoke, uri, name, pepper_file, as_json=as_json)
    if as_json:
        return _print_json({"revoked": name})
    out.print(f"Revoked token '{name}'.", markup=False)


# ---- users (htpasswd) ---------------------------------------------------------------------------------

HtpasswdOpt = Annotated[str, typer.Option(
    "--htpasswd", envvar="RUNYARD_HTPASSWD", show_default=False,
    help="The htpasswd file `runyard server --htpasswd` checks (also RUNYARD_HTPASSWD).")]
UserArg = Annotated[str, typer.Argument(help="The user name.", show_default=False)]
PasswordStdinOpt = Annotated[bool, typer.Option(
    "--password-stdin", help="Read the password from the first line of stdin instead of prompting.")]


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        _fail("No terminal to ask for the password on: pass --password-stdin", "INVALID_PARAMETER_VALUE")
    password = typer.prompt("Password", hide_input=True, err=True)
    if typer.prompt("Password again", hide_input=True, err=True) != password:
        _fail("The passwords do not match.", "INVALID_PARAMETER_VALUE")
    return password


@users_app.command("add")
def users_add(
    name: UserArg,
    htpasswd_file: HtpasswdOpt,
    password_stdin: PasswordStdinOpt = False,
    group: Annotated[str | None, typer.Option(
        "--group", help="Make the file readable by this group (when the server runs as another user "
                        "than the file's owner); otherwise only its owner reads it.",
        show_default=False)] = None,
) -> None:
    """Add a user (bcrypt hash; the file is written atomically)."""
    from toolkit import htpasswd

    _run(htpasswd.add_user, htpasswd_file, name, _read_password(password_stdin), group=group)
    out.print(f"Added user '{name}' to {htpasswd_file}.", markup=False)


@users_app.command("passwd")
def users_passwd(name: UserArg, htpasswd_file: HtpasswdOpt, password_stdin: PasswordStdinOpt = False) -> None:
    """Set a user's password."""
    from toolkit import htpasswd

    _run(htpasswd.set_password, htpasswd_file, name, _read_password(password_stdin))
    out.print(f"Changed the password of '{name}'.", markup=False)


@users_app.command("remove")
def users_remove(name: UserArg, htpasswd_file: HtpasswdOpt) -> None:
    """Remove a user."""
    from toolkit import htpasswd

    _run(htpasswd.remove_user, htpasswd_file, name)
    out.print(f"Removed user '{name}' from {htpasswd_file}.", markup=False)


@users_app.command("list")
def users_list(htpasswd_file: HtpasswdOpt, as_json: JsonOpt = False) -> None:
    """List the users (never their hashes)."""
    from toolkit import htpasswd

    names = _run(htpasswd.list_users, htpasswd_file, as_json=as_json)
    if as_json:
        return _print_json({"users": names})
    for name in names:
        out.print(name, markup=False)


# ---- nginx --------------------------------------------------------------------------------------------

class AuthMode(str, Enum):
    basic = "basic"
    token = "token"
    basic_token = "basic+token"
    none = "none"


@nginx_app.command("render")
def nginx_render(
    upstream: Annotated[list[str], typer.Option(
        "--upstream", help="HOST:PORT of a runyard server; repeat for several.", show_default=False)],
    listen: Annotated[str, typer.Option("--listen", help="ADDR:PORT NGINX listens on.", show_default=False)],
    auth: Annotated[AuthMode, typer.Option("--auth", help="How clients authenticate.", show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="The configuration file to write.",
                                        show_default=False)],
    tls_cert: Annotated[str | None, typer.Option("--tls-cert", help="TLS certificate (chain) file.",
                                                 show_default=False)] = None,
    tls_key: Annotated[str | None, typer.Option("--tls-key", help="TLS private key file.",
                                                show_default=False)] = None,
    client_ca: Annotated[str | None, typer.Option(
        "--client-ca", help="Require client certificates signed by this CA (mTLS).",
        show_default=False)] = None,
    static_prefix: Annotated[str, typer.Option(
        "--static-prefix", help="Serve under this path; run the servers with the same --static-prefix.",
        show_default=False)] = "",
    server_name: Annotated[str, typer.Option("--server-name", help="NGINX server_name.")] = "_",
    redirect_http: Annotated[str | None, typer.Option(
        "--redirect-http", help="ADDR:PORT of a plain-HTTP listener that redirects to HTTPS.",
        show_default=False)] = None,
    state_dir: Annotated[str, typer.Option(
        "--state-dir", help="NGINX's pid file, temporary files and logs.")] = "/var/lib/runyard/nginx",
    worker_user: Annotated[str | None, typer.Option(
        "--worker-user", help="USER or USER:GROUP NGINX's workers run as (they write the state dir).",
        show_default=False)] = None,
    max_upload_size: Annotated[str, typer.Option(
        "--max-upload-size", help="Largest artifact upload, in NGINX size syntax (0: no limit).")] = "100g",
    login_rate: Annotated[str, typer.Option(
        "--login-rate", help="Failed logins allowed per client address, e.g. 30r/m.")] = "30r/m",
    insecure_no_auth: Annotated[bool, typer.Option(
        "--insecure-no-auth",
        help="Allow --auth none: anyone who reaches NGINX can read and write.")] = False,
    no_check: Annotated[bool, typer.Option(
        "--no-check", help="Do not validate with `nginx -t` (when rendering for another host).")] = False,
    container: Annotated[bool, typer.Option(
        "--container", help="For NGINX in a container: foreground, logs to stdout/stderr.")] = False,
) -> None:
    """Write a complete NGINX configuration for runyard, validated with `nginx -t`.

    Credentials are checked by the servers (auth_request): run them with --trusted-proxies naming this
    NGINX, and --htpasswd for basic auth."""
    from toolkit import nginx

    settings = _run(nginx.NginxSettings, upstreams=tuple(upstream), listen=listen, auth=auth.value,
                    tls_cert=tls_cert, tls_key=tls_key, client_ca=client_ca,
                    static_prefix=static_prefix, insecure_no_auth=insecure_no_auth, server_name=server_name,
                    state_dir=state_dir, worker_user=worker_user, redirect_http=redirect_http,
                    max_upload_size=max_upload_size, login_rate=login_rate, container=container)
    path = _run(nginx.write, settings, output, validate=not no_check)
    checked = "not validated (--no-check)" if no_check else "validated with nginx -t"
    out.print(f"Wrote {path} ({checked}).", markup=False)


@nginx_app.command("check")
def nginx_check(config: Annotated[str, typer.Argument(help="An NGINX configuration file.",
                                                      show_default=False)]) -> None:
    """Validate a configuration with `nginx -t`."""
    from toolkit import nginx

    _run(nginx.check, config)
    out.print(f"{config}: nginx -t passed.", markup=False)


@nginx_app.command("selfsigned")
def nginx_selfsigned(
    out_dir: Annotated[str, typer.Argument(help="Folder for ca.pem, cert.pem, key.pem.", show_default=False)],
    host: Annotated[list[str] | None, typer.Option(
        "--host", help="DNS name or IP address the certificate is for; repeat for several "
                       "(default: localhost and 127.0.0.1).", show_default=False)] = None,
    days: Annotated[int, typer.Option("--days", min=1, help="Validity in days.")] = 365,
    client: Annotated[str | None, typer.Option(
        "--client", help="Also issue a client certificate with this name, for mTLS.",
        show_default=False)] = None,
) -> None:
    """Make a development CA and a server certificate signed by it (never for production)."""
    from toolkit import certs

    hosts = tuple(host) if host else ("localhost", "127.0.0.1")
    written = _run(certs.selfsigned, out_dir, hosts=hosts, days=days, client=client)
    for role, path in written.items():
        out.print(f"{role:<12} {path}", markup=False)


# ---- health -------------------------------------------------------------------------------------------

@app.command()
def health(
    url: Annotated[str | None, typer.Argument(
        help="The tracking URI, as clients use it (default: MLFLOW_TRACKING_URI).",
        show_default=False)] = None,
    write: Annotated[bool, typer.Option(
        "--write", help="Also create, read back and delete a run in the experiment "
                        "'runyard-health-probe'.")] = False,
    watch: Annotated[float | None, typer.Option(
        "--watch", min=0.1, help="Probe again every SECONDS until interrupted.", show_default=False)] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds per request.")] = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Probe a tracking server as a client sees it (through NGINX, with MLflow's MLFLOW_TRACKING_*
    credentials): liveness, readiness, an API read, optionally a write. Exit code 0 ok, 1 degraded,
    2 down."""
    from toolkit import health as probes

    def emit(report: dict) -> None:
        if as_json:
            sys.stdout.write(probes.to_json(report) + "\n")
        else:
            out.print(probes.format_report(report), markup=False)
        sys.stdout.flush()

    if watch is not None:
        try:
            raise typer.Exit(probes.watch(url or "", watch, write=write, emit=emit, timeout=timeout))
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
    report = probes.probe(url or "", write=write, timeout=timeout)
    emit(report)
    raise typer.Exit(probes.exit_code(report))

# ---- rotate -------------------------------------------------------------------------------------------

SecretOpt = Annotated[str, typer.Option(
    "--secret", help="Where the servers read the credential: a file (0600), file:///path or "
                     "aws-sm://secret-id.", show_default=False)]
ReadyUrlOpt = Annotated[list[str] | None, typer.Option(
    "--ready-url", help="A server to check through /ready after the change (repeat for each).",
    show_default=False)]


def _print_rotation(report: dict, as_json: bool) -> None:
    if as_json:
        return _print_json(report)
    for key, value in report.items():
        out.print(f"{key:<18} {value}", markup=False)


@rotate_app.command("db-password")
def rotate_db_password(
    uri: Annotated[str, typer.Argument(help="The backend store URI, without a password.",
                                       show_default=False)],
    secret: SecretOpt,
    ready_url: ReadyUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A new password for the URI's database user: into the secret the servers read, then into the
    database; verified (new works, old refused, servers ready) and undone on failure."""
    from toolkit.rotation import database

    with _progress() as progress:
        report = _run(database.rotate_db_password, uri, secret, ready_urls=ready_url or (),
                      progress=progress, as_json=as_json)
    _print_rotation(report, as_json)


@rotate_app.command("s3-keys")
def rotate_s3_keys(
    user: Annotated[str, typer.Argument(help="The IAM user the servers sign S3 requests as.",
                                        show_default=False)],
    secret: SecretOpt,
    ready_url: ReadyUrlOpt = None,
    grace: Annotated[float, typer.Option(
        "--grace", min=0, help="Seconds between handing out the new key and deactivating the old.")] = 5.0,
    as_json: JsonOpt = False,
) -> None:
    """New IAM access key for the servers (RUNYARD_S3_CREDENTIALS_FILE), old one deactivated, checked, then
    deleted. Uses your own AWS credentials (AWS_PROFILE, AWS_* variables) for IAM."""
    from toolkit.rotation import s3

    with _progress() as progress:
        report = _run(s3.rotate_s3_keys, user, secret, ready_urls=ready_url or (), grace_s=grace,
                      progress=progress, as_json=as_json)
    _print_rotation(report, as_json)


OverlapOpt = Annotated[str, typer.Option(
    "--overlap", help="How long the old credential keeps working after the new one is handed out: 90s, "
                      "10m, 1h, or 0.", show_default=True)]
ToOpt = Annotated[str | None, typer.Option(
    "--to", help="Write the new credential here (a file, file:///path or aws-sm://id) instead of printing "
                 "it once.", show_default=False)]
CheckUrlOpt = Annotated[str | None, typer.Option(
    "--check-url", help="Tracking URI (through NGINX) to prove the new credential works before the old "
                        "one goes.", show_default=False)]


def _hand_out(report: dict, key: str, as_json: bool) -> None:
    """A new secret the caller did not send anywhere is printed once, alone on stdout."""
    value = report.pop(key, None)
    if value is not None:
        if as_json:
            _fail("--json would put the new credential into the JSON: give --to", "INVALID_PARAMETER_VALUE",
                  as_json)
        sys.stdout.write(value + "\n")
        for name, item in report.items():
            err.print(f"{name:<18} {item}", markup=False)
        return
    _print_rotation(report, as_json)


@rotate_app.command("token")
def rotate_token(
    name: Annotated[str, typer.Argument(help="The token (or the base name of its family).",
                                        show_default=False)],
    overlap: OverlapOpt = "1h",
    to: ToOpt = None,
    expires: Annotated[str | None, typer.Option(
        "--expires", help="The new token's lifetime (default: the old one's).", show_default=False)] = None,
    check_url: CheckUrlOpt = None,
    uri: StoreOpt = "./mlruns",
    pepper_file: PepperOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A successor token for the same user; the old one expires after --overlap."""
    from toolkit.rotation import credentials

    overlap_s = _run(credentials.parse_overlap, overlap, as_json=as_json)
    with _progress() as progress:
        report = _run(credentials.rotate_token, uri, name, overlap_s, to=to, expires=expires,
                      pepper_file=pepper_file, check_url=check_url, progress=progress, as_json=as_json)
    _hand_out(report, "token", as_json)


@rotate_app.command("htpasswd")
def rotate_htpasswd(
    user: UserArg,
    htpasswd_file: HtpasswdOpt,
    overlap: OverlapOpt = "10m",
    to: ToOpt = None,
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Take the new password from stdin instead of generating one.")] = False,
    check_url: CheckUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A new password for USER next to the old one; after --overlap (this command waits) the old goes."""
    from toolkit.rotation import credentials

    overlap_s = _run(credentials.parse_overlap, overlap, as_json=as_json)
    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else None
    with _progress() as progress:
        report = _run(credentials.rotate_password, htpasswd_file, user, overlap_s, to=to, password=password,
                      check_url=check_url, progress=progress, as_json=as_json)
    _hand_out(report, "password", as_json)


@rotate_app.command("tls")
def rotate_tls(
    cert: Annotated[str, typer.Option("--cert", help="The new certificate (chain).", show_default=False)],
    key: Annotated[str, typer.Option("--key", help="The new private key.", show_default=False)],
    installed_cert: Annotated[str, typer.Option(
        "--installed-cert", help="The certificate file NGINX serves (its ssl_certificate).",
        show_default=False)],
    installed_key: Annotated[str, typer.Option(
        "--installed-key", help="The key file NGINX uses (its ssl_certificate_key).", show_default=False)],
    nginx_pid: Annotated[str, typer.Option("--nginx-pid", help="NGINX's pid file.", show_default=False)],
    nginx_conf: Annotated[str | None, typer.Option(
        "--nginx-conf", help="NGINX's configuration (default: what the running master was started with).",
        show_default=False)] = None,
    check_url: Annotated[str | None, typer.Option(
        "--check-url", help="An https:// URL whose handshake must show the new certificate.",
        show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Install a new certificate and key, reload NGINX gracefully, check the handshake; undone on failure."""
    from toolkit.rotation import tls

    with _progress() as progress:
        report = _run(tls.rotate_tls, cert, key, installed_cert, installed_key, nginx_pid,
                      nginx_conf=nginx_conf, check_url=check_url, progress=progress, as_json=as_json)
    _print_rotation(report, as_json)

if __name__ == "__main__":
    app(prog_name="runyard")
