"""Database servers that check passwords, for tests of password handling (rotation, password files).

The machine's PostgreSQL trusts 127.0.0.1, so it would accept any password: `start_scram_postgres()`
starts a throwaway PostgreSQL 15 whose TCP connections need a SCRAM-SHA-256 password, administered over
its Unix socket (trust). MariaDB checks passwords of the accounts it has, so the session's `mysql_server`
serves with a password-protected account (`databases.my_create_user`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from helpers.databases import PG_BIN, Unavailable, _process_gone, _tail
from helpers.ports import free_port, wait_for


@dataclass
class ScramPostgres:
    port: int
    socket_dir: Path  # admin connections (trust) go through the socket; TCP needs a password
    stop: Callable[[], None] = field(default=lambda: None)

    def admin(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(host=str(self.socket_dir), port=self.port, user="postgres", dbname=dbname,
                               autocommit=True, connect_timeout=3)

    def create_user_and_database(self, user: str, password: str, database: str) -> str:
        """A login role with `password` owning a new database; returns the URI (without the password)."""
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(user),
                                                                             sql.Literal(password)))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database),
                                                                       sql.Identifier(user)))
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def drop_user_and_database(self, user: str, database: str) -> None:
        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(user)))


def start_scram_postgres() -> ScramPostgres:
    """initdb --auth-host=scram-sha-256 --auth-local=trust in a temp dir, on a free port."""
    if not (PG_BIN / "initdb").exists():
        raise Unavailable(f"PostgreSQL 15 binaries not found in {PG_BIN} (apt-get install postgresql-15)")
    workdir = Path(tempfile.mkdtemp(prefix="runyard-pg-scram-"))
    runas: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        shutil.chown(workdir, "postgres", "postgres")
        runas = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data, log = workdir / "data", workdir / "log"
    try:
        subprocess.run([*runas, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres",
                        "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True)
        subprocess.run([*runas, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                        "-o", f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off "
                        "-c password_encryption=scram-sha-256 -c max_connections=200", "start"],
                       check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        detail = exc.stderr.decode(errors="replace")
        raise RuntimeError(f"throwaway PostgreSQL (scram) failed: {detail}\n{_tail(log)}") from None
    pid = int((data / "postmaster.pid").read_text().split()[0])

    def stop() -> None:
        try:
            os.kill(pid, signal.SIGINT)  # fast shutdown
        except ProcessLookupError:
            pass
        if not wait_for(lambda: _process_gone(pid), timeout=30):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)

    return ScramPostgres(port, workdir, stop)


def scram_postgres_server() -> Iterator[ScramPostgres]:
    """For a fixture: a throwaway PostgreSQL whose TCP connections need a password (SCRAM-SHA-256);
    skipped where PostgreSQL is not installed (failed under RUNYARD_TEST_STRICT=1)."""
    try:
        server = start_scram_postgres()
    except Unavailable as exc:
        if os.environ.get("RUNYARD_TEST_STRICT") == "1":
            pytest.fail(f"{exc} (RUNYARD_TEST_STRICT=1: required services must be available)")
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()
