"""Dump and restore one database with the tool its kind is best served by, and make scratch databases
of the same kind to restore into for verification.

- SQLite: the online backup API (a consistent copy while servers write; restore is one transaction).
- PostgreSQL: `pg_dump -Fc` of the schema, inside an exported snapshot that the manifest's checksums
  are taken in too; restore replaces the schema in one transaction (`pg_restore | psql`).
- MySQL/MariaDB: `mysqldump --single-transaction` with routines and triggers. Writers are held off
  (`LOCK TABLES … READ`, readers go on) only until the dump's snapshot is open, so that the checksums
  describe exactly what the dump holds. Restore loads a staging database and swaps it in atomically.
- MSSQL: SQL Server writes backups to its own disk; runyard prints the statements instead.

Passwords reach the tools through 0600 files (PGPASSFILE, --defaults-extra-file), never argv.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from migrations import marker
from server.errors import RunyardError
from server.store.dbpassword import password_file_from_env
from server.store.dbpassword import tool_password as _tool_password
from server.store.uri import create_engine, without_password
from toolkit import contents

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
                     if p.parent.name.isdigit() else 0, reverse=True)
CHUNK = 1024 * 1024


@dataclass
class Dumped:
    """What `dump` produced: the checksums of what the file holds, and the tools that made it."""

    tables: dict[str, dict]
    tools: dict[str, str] = field(default_factory=dict)


def data_file_name(dialect: str) -> str:
    return {"sqlite": "database.sqlite", "postgresql": "database.pgdump"}.get(dialect, "database.sql")


def _fail(tool: str, stderr: bytes | str, secret: str | None) -> RunyardError:
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("-- ")]
    detail = "; ".join(lines[-3:]) or "no message"
    if secret:
        detail = detail.replace(secret, "***")
    return RunyardError(f"{tool} failed: {detail}", "INVALID_STATE")


def _first_line(command: list[str]) -> str:
    try:
        done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30)
        return done.stdout.strip().splitlines()[0] if done.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextmanager
def _private_file(text: str) -> Iterator[str]:
    """A file only its owner can read, removed afterwards (for passwords handed to a tool)."""
    fd, path = tempfile.mkstemp(prefix="runyard-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        yield path
    finally:
        os.unlink(path)


def engine_for(url: sa.URL) -> sa.Engine:
    """An engine for `url`; without a password in it, RUNYARD_BACKEND_STORE_PASSWORD_FILE's."""
    return create_engine(url.render_as_string(hide_password=False), pool_size=2,
                         password_file=password_file_from_env(url))


def tool_password(url: sa.URL, engine: sa.Engine | None = None) -> str | None:
    """The password a tool gets for `url`: the URL's, else the password file's (`engine`'s, else
    RUNYARD_BACKEND_STORE_PASSWORD_FILE's): the one that last worked, else the file's content."""
    return _tool_password(url, engine)


# ---- SQLite -----------------------------------------------------------------------------------------

def _sqlite_copy(source: str, target: str, source_readonly: bool) -> None:
    src = sqlite3.connect(f"file:{source}?mode=ro" if source_readonly else source, uri=source_readonly,
                          timeout=60)
    dst = sqlite3.connect(target, timeout=60)
    try:
        src.backup(dst)  # one step: a consistent snapshot of the source, one transaction on the target
    except sqlite3.Error as exc:
        raise RunyardError(f"Copying SQLite {source} to {target} failed: {exc}", "INVALID_STATE") from None
    finally:
        src.close()
        dst.close()


def sqlite_dump(url: sa.URL, target: Path) -> Dumped:
    _sqlite_copy(url.database, str(target), source_readonly=False)
    copy = sqlite3.connect(target)
    try:
        copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
    finally:
        copy.close()
    return Dumped(contents.sqlite_file_stats(str(target)), {"sqlite": sqlite3.sqlite_version})


def sqlite_restore(url: sa.URL, source: Path) -> None:
    check = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        result = check.execute("PRAGMA integrity_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise RunyardError(f"The backup's SQLite file is damaged: {exc}", "INVALID_STATE") from None
    finally:
        check.close()
    if result != "ok":
        raise RunyardError(f"The backup's SQLite file is damaged: {result}", "INVALID_STATE")
    Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    _sqlite_copy(str(source), url.database, source_readonly=True)


# ---- PostgreSQL -------------------------------------------------------------------------------------

def _pg_tool(name: str) -> str:
    for directory in PG_BIN_DIRS:  # newest first: pg_dump must be at least the server's version
        if (directory / name).exists():
            return str(directory / name)
    found = shutil.which(name)
    if not found:
        raise RunyardError(f"{name} is not installed (apt-get install postgresql-client)", "INVALID_STATE")
    return found


def _pg_conninfo(url: sa.URL) -> str:
    return without_password(url.set(drivername="postgresql")).render_as_string(hide_password=False)


@contextmanager
def _pg_env(password: str | None) -> Iterator[dict]:
    env = {**os.environ, "PGCONNECT_TIMEOUT": "10"}
    env.pop("PGPASSWORD", None)
    if password is None:
        yield env
        return
    escaped = str(password).replace("\\", "\\\\").replace(":", "\\:")
    with _private_file(f"*:*:*:*:{escaped}\n") as passfile:
        yield {**env, "PGPASSFILE": passfile}


def postgres_dump(engine: sa.Engine, url: sa.URL, target: Path) -> Dumped:
    pg_dump = _pg_tool("pg_dump")
    with engine.connect() as conn, _pg_env(password := tool_password(url, engine)) as env:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            snapshot = conn.execute(sa.text("SELECT pg_export_snapshot()")).scalar_one()
            schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
            server = conn.execute(sa.text("SHOW server_version")).scalar_one()
            command = [pg_dump, "--format=custom", "--compress=1", f"--snapshot={snapshot}",
                       f"--schema=\"{schema}\"", f"--file={target}", f"--dbname={_pg_conninfo(url)}"]
            proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                tables = contents.table_stats(conn)  # same snapshot, while pg_dump works
            finally:
                _, stderr = proc.communicate()
            if proc.returncode != 0:
                raise _fail("pg_dump", stderr, password)
    return Dumped(tables, {"pg_dump": _first_line([pg_dump]), "server": f"PostgreSQL {server}",
                           "schema": schema})


def postgres_restore(url: sa.URL, source: Path, schema: str) -> None:
    """Replaces `schema` with the backup's in one transaction: a failure anywhere changes nothing."""
    quoted = '"' + schema.replace('"', '""') + '"'
    pg_restore, psql = _pg_tool("pg_restore"), _pg_tool("psql")
    password = tool_password(url)
    with _pg_env(password) as env:
        psql_proc = subprocess.Popen(
            [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", f"--dbname={_pg_conninfo(url)}"],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        restore_proc = subprocess.Popen(
            [pg_restore, "--no-owner", "--no-privileges", "--file=-", str(source)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        errors = _Drain(restore_proc.stderr)
        psql_errors = _Drain(psql_proc.stderr)
        try:
            psql_proc.stdin.write(f"BEGIN;\nDROP SCHEMA IF EXISTS {quoted} CASCADE;\n".encode())
            while chunk := restore_proc.stdout.read(CHUNK):
                psql_proc.stdin.write(chunk)
            restore_proc.wait()
            if restore_proc.returncode == 0:  # commit only a complete script
                psql_proc.stdin.write(b"\nCOMMIT;\n")
        except BrokenPipeError:
            pass  # psql stopped at an error; its stderr says which
        finally:
            _close_quietly(psql_proc.stdin)
            restore_proc.stdout.close()
            restore_proc.wait()
            psql_proc.wait()
        if restore_proc.returncode != 0:
            raise _fail("pg_restore", errors.text(), password)
        if psql_proc.returncode != 0:
            raise _fail("psql", psql_errors.text(), password)


# ---- MySQL / MariaDB --------------------------------------------------------------------------------

def _my_tool(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise RunyardError(f"{names[0]} is not installed (apt-get install mariadb-client)", "INVALID_STATE")


def _option_value(value) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@contextmanager
def _my_options(url: sa.URL, password: str | None) -> Iterator[str]:
    lines = ["[client]", f"user={_option_value(url.username or 'root')}",
             f"host={_option_value(url.host or 'localhost')}", "default-character-set=utf8mb4"]
    if url.port:
        lines.append(f"port={int(url.port)}")
    if password is not None:
        lines.append(f"password={_option_value(password)}")
    with _private_file("\n".join(lines) + "\n") as path:
        yield path


def mysql_dump(engine: sa.Engine, url: sa.URL, target: Path) -> Dumped:
    dump = _my_tool("mariadb-dump", "mysqldump")
    with engine.connect() as conn, _my_options(url, password := tool_password(url, engine)) as options:
        server = conn.execute(sa.text("SELECT VERSION()")).scalar_one()
        quote = conn.dialect.identifier_preparer.quote
        tables = contents.table_names(conn)
        # Hold writers (not readers) until the dump's own snapshot is open: our checksums then describe
        # exactly the data the dump holds.
        if tables:
            conn.exec_driver_sql("LOCK TABLES " + ", ".join(f"{quote(t)} READ" for t in tables))
        try:
            proc = subprocess.Popen(
                [dump, f"--defaults-extra-file={options}", "--single-transaction", "--routines", "--triggers",
                 "--hex-blob", "--no-tablespaces", "--skip-dump-date", "--verbose", f"--result-file={target}",
                 url.database],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            progress = _Drain(proc.stderr, ready_marker="Retrieving table structure")
            stats = contents.table_stats(conn)
            progress.ready.wait()
        finally:
            if tables:
                conn.exec_driver_sql("UNLOCK TABLES")
        proc.wait()
        progress.done.wait()
        if proc.returncode != 0:
            raise _fail(Path(dump).name, progress.text(), password)
    return Dumped(stats, {Path(dump).name: _first_line([dump]), "server": server})


def mysql_load(url: sa.URL, source: Path) -> None:
    """Loads the dump into the (empty) database `url` names."""
    client = _my_tool("mariadb", "mysql")
    password = tool_password(url)
    with _my_options(url, password) as options, open(source, "rb") as dump:
        done = subprocess.run([client, f"--defaults-extra-file={options}", "--binary-mode", url.database],
                              stdin=dump, capture_output=True)
    if done.returncode != 0:
        raise _fail(Path(client).name, done.stderr, password)


def mysql_restore(url: sa.URL, source: Path, check: Callable[[sa.URL], None] | None = None) -> None:
    """MySQL cannot replace tables in a transaction, so the dump is loaded into a staging database
    beside the live one, checked there (`check`), and swapped in by one RENAME TABLE, which MySQL runs
    atomically. A failure before the swap leaves the live database untouched. The interrupted-operation
    marker stays where it is."""
    staging, retired = (f"{url.database}__ry_{suffix}"[:64] for suffix in ("restore", "retired"))
    engine = engine_for(url)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            quote = conn.dialect.identifier_preparer.quote
            _create_database(conn, staging, "mysql", replace=True)
            try:
                mysql_load(url.set(database=staging), source)
                if check is not None:
                    check(url.set(database=staging))
                _create_database(conn, retired, "mysql", replace=True)
                live = [t for t in _my_tables(conn, url.database) if t != marker.TABLE_NAME]
                moves = [f"{quote(url.database)}.{quote(t)} TO {quote(retired)}.{quote(t)}" for t in live]
                moves += [f"{quote(staging)}.{quote(t)} TO {quote(url.database)}.{quote(t)}"
                          for t in _my_tables(conn, staging)]
                conn.exec_driver_sql("RENAME TABLE " + ", ".join(moves))
            finally:
                for name in (staging, retired):
                    conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quote(name)}")
    finally:
        engine.dispose()


def _my_tables(conn: sa.Connection, database: str) -> list[str]:
    return list(conn.execute(sa.text("SELECT table_name FROM information_schema.tables WHERE table_schema = "
                                     ":db AND table_type = 'BASE TABLE'"), {"db": database}).scalars())


# ---- MSSQL ------------------------------------------------------------------------------------------

def mssql_statements(database: str, path: str) -> list[str]:
    """What an operator runs with sqlcmd: SQL Server writes the file on its own host."""
    name = "[" + database.replace("]", "]]") + "]"
    disk = "N'" + path.replace("'", "''") + "'"
    return [f"BACKUP DATABASE {name} TO DISK = {disk} WITH COPY_ONLY, CHECKSUM, INIT, FORMAT",
            f"RESTORE VERIFYONLY FROM DISK = {disk} WITH CHECKSUM",
            f"-- to restore: RESTORE DATABASE {name} FROM DISK = {disk} WITH REPLACE, CHECKSUM"]


# ---- scratch databases ------------------------------------------------------------------------------

@contextmanager
def scratch_database(url: sa.URL) -> Iterator[sa.URL]:
    """An empty database of the same kind (on the same server as `url`), dropped afterwards."""
    dialect = url.get_backend_name()
    if dialect == "sqlite":
        with tempfile.TemporaryDirectory(prefix="runyard-verify-") as folder:
            yield sa.URL.create("sqlite", database=str(Path(folder) / "scratch.db"))
        return
    name = f"{(url.database or 'runyard')[:40]}__ry_verify_{uuid.uuid4().hex[:8]}"
    engine = engine_for(url)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            quote = conn.dialect.identifier_preparer.quote
            _create_database(conn, name, dialect)
            try:
                yield url.set(database=name)
            finally:
                drop = (f"DROP DATABASE IF EXISTS {quote(name)} WITH (FORCE)" if dialect == "postgresql"
                        else f"DROP DATABASE IF EXISTS {quote(name)}")
                conn.exec_driver_sql(drop)
    finally:
        engine.dispose()


def _create_database(conn: sa.Connection, name: str, dialect: str, replace: bool = False) -> None:
    """`replace`: drop a leftover of a restore killed half-way first (we hold the migration lock)."""
    quoted = conn.dialect.identifier_preparer.quote(name)
    create = f"CREATE DATABASE {quoted}" + (" CHARACTER SET utf8mb4" if dialect != "postgresql" else "")
    try:
        if replace:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quoted}")
        conn.exec_driver_sql(create)
    except sa.exc.DBAPIError as exc:
        raise RunyardError(
            f"Verifying or restoring a backup loads it into a scratch database ({name}) first, which this "
            f"account may not create ({_one_line(exc.orig)}); grant it the right (MySQL: on databases "
            "named <database>__ry_%), or verify with --using a URI whose account has it",
            "INVALID_STATE") from None


# ---- helpers ----------------------------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    return re.sub(r"\s+", " ", str(exc)).strip()


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except BrokenPipeError:
        pass


class _Drain:
    """Reads a child's stderr in a thread (so the child never blocks on a full pipe), keeping the text
    and, optionally, signalling when a line containing `ready_marker` appears or the stream ends."""

    def __init__(self, stream, ready_marker: str | None = None):
        self._lines: list[str] = []
        self.ready = threading.Event()
        self.done = threading.Event()
        self._marker = ready_marker
        threading.Thread(target=self._run, args=(stream,), daemon=True).start()

    def _run(self, stream) -> None:
        try:
            for raw in stream:
                line = raw.decode(errors="replace")
                self._lines.append(line)
                if self._marker and self._marker in line:
                    self.ready.set()
        finally:
            self.ready.set()
            self.done.set()

    def text(self) -> str:
        self.done.wait(timeout=10)
        return "".join(self._lines)
