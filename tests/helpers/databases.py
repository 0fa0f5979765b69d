"""PostgreSQL and MariaDB for tests: the machine's own server when it answers, otherwise a throwaway
instance from the installed Debian binaries (state in a temp dir, random port, stopped by PID).

Set RUNYARD_TEST_THROWAWAY_DB=1 to always start throwaway instances (what a fresh CI machine does).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pymysql
import pytest

from helpers.ports import free_port, wait_for

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


class Unavailable(Exception):
    """The service cannot be provided on this machine (binaries missing)."""


@dataclass
class DatabaseServer:
    dialect: str  # "postgresql" or "mysql"
    port: int
    base_url: str  # SQLAlchemy URL without a database, e.g. postgresql://postgres@127.0.0.1:5432
    stop: Callable[[], None] = field(default=lambda: None)

    def uri(self, database: str) -> str:
        return f"{self.base_url}/{database}"


def unique_name(prefix: str = "ry") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def _throwaway_only() -> bool:
    return os.environ.get("RUNYARD_TEST_THROWAWAY_DB") == "1"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---- PostgreSQL -------------------------------------------------------------------------------------

def _pg_connect(port: int, dbname: str = "postgres"):
    return psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname=dbname, connect_timeout=3,
                           autocommit=True)


def _pg_answers(port: int) -> bool:
    try:
        with _pg_connect(port) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1].startswith("Z")  # a zombie has finished
    except (FileNotFoundError, IndexError):
        return True


def start_postgres_cluster(initdb_auth: tuple[str, ...] = ("-A", "trust"), options: str = "",
                           label: str = "") -> tuple[int, Path, Callable[[], None]]:
    """initdb + pg_ctl start of a PostgreSQL 15 in a temp dir (as `postgres` when we are root), on a free
    port with its Unix socket in that dir: (port, dir, stop)."""
    if not (PG_BIN / "initdb").exists():
        raise Unavailable(f"PostgreSQL 15 binaries not found in {PG_BIN} (apt-get install postgresql-15)")
    workdir = Path(tempfile.mkdtemp(prefix=f"runyard-pg-{label}-" if label else "runyard-pg-"))
    runas: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        shutil.chown(workdir, "postgres", "postgres")
        runas = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data, log = workdir / "data", workdir / "log"
    try:
        subprocess.run([*runas, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", *initdb_auth,
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        subprocess.run([*runas, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                        "-o", f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off {options}",
                        "start"], check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        detail = exc.stderr.decode(errors="replace")
        raise RuntimeError(f"throwaway PostgreSQL {label} failed: {detail}\n{_tail(log)}") from None
    pid = int((data / "postmaster.pid").read_text().split()[0])

    def stop() -> None:
        try:
            os.kill(pid, signal.SIGINT)  # fast shutdown
        except ProcessLookupError:
            pass
        if not wait_for(lambda: _process_gone(pid), timeout=30):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)

    return port, workdir, stop


def start_postgres() -> DatabaseServer:
    """A throwaway PostgreSQL 15 with trust auth."""
    port, _, stop = start_postgres_cluster()
    return DatabaseServer("postgresql", port, f"postgresql://postgres@127.0.0.1:{port}", stop)


def postgres_server() -> DatabaseServer:
    """The machine's PostgreSQL on 5432 when it answers (trust as `postgres`), else a throwaway one."""
    if not _throwaway_only() and _pg_answers(5432):
        return DatabaseServer("postgresql", 5432, "postgresql://postgres@127.0.0.1:5432")
    return start_postgres()


def pg_create_database(server: DatabaseServer, name: str) -> None:
    with _pg_connect(server.port) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')


def pg_drop_database(server: DatabaseServer, name: str) -> None:
    with _pg_connect(server.port) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # FORCE: ends leftover sessions


# ---- MariaDB ----------------------------------------------------------------------------------------

def _my_connect(port: int, **kwargs):
    return pymysql.connect(host="127.0.0.1", port=port, user="root", connect_timeout=3, autocommit=True,
                           **kwargs)


def _my_answers(port: int) -> bool:
    try:
        _my_connect(port).close()
        return True
    except pymysql.Error:
        return False


def start_mariadb() -> DatabaseServer:
    """A throwaway MariaDB: mariadb-install-db in a temp dir, then mariadbd as our child process."""
    install_db = shutil.which("mariadb-install-db", path=SBIN_PATH)
    mariadbd = shutil.which("mariadbd", path=SBIN_PATH)
    if not (install_db and mariadbd):
        raise Unavailable("MariaDB binaries not found (apt-get install mariadb-server mariadb-client)")
    workdir = Path(tempfile.mkdtemp(prefix="runyard-mariadb-"))
    user = f"--user={pwd.getpwuid(os.geteuid()).pw_name}"  # as root mariadbd needs --user=root
    port, data, errlog = free_port(), workdir / "data", workdir / "err.log"
    with open(workdir / "install.log", "wb") as install_log:
        done = subprocess.run([install_db, "--no-defaults", f"--datadir={data}", user,
                               "--auth-root-authentication-method=normal", "--skip-test-db",
                               "--skip-name-resolve"],
                              stdout=install_log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        shutil.rmtree(workdir, ignore_errors=True)
        raise RuntimeError(f"mariadb-install-db failed:\n{_tail(workdir / 'install.log')}")
    proc = subprocess.Popen(
        [mariadbd, "--no-defaults", f"--datadir={data}", user, f"--port={port}", "--bind-address=127.0.0.1",
         f"--socket={workdir / 'sock'}", f"--pid-file={workdir / 'pid'}", f"--log-error={errlog}",
         "--skip-name-resolve", "--innodb-flush-log-at-trx-commit=0", "--innodb-buffer-pool-size=64M",
         "--skip-log-bin"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    started = wait_for(lambda: proc.poll() is not None or _my_answers(port), timeout=60)
    if not started or proc.poll() is not None:
        message = f"throwaway MariaDB did not start:\n{_tail(errlog)}"
        stop()
        raise RuntimeError(message)
    return DatabaseServer("mysql", port, f"mysql://root@127.0.0.1:{port}", stop)


def mysql_server() -> DatabaseServer:
    """The machine's MariaDB/MySQL on 3306 when it answers (root, no password), else a throwaway one."""
    if not _throwaway_only() and _my_answers(3306):
        return DatabaseServer("mysql", 3306, "mysql://root@127.0.0.1:3306")
    return start_mariadb()


def my_create_database(server: DatabaseServer, name: str) -> None:
    with _my_connect(server.port) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")


def my_drop_database(server: DatabaseServer, name: str) -> None:
    with _my_connect(server.port) as conn, conn.cursor() as cur:
        # End sessions left on the database (e.g. a server process killed mid-test) so DROP cannot block.
        cur.execute("SELECT id FROM information_schema.processlist WHERE db = %s AND id <> CONNECTION_ID()",
                    (name,))
        for (session_id,) in cur.fetchall():
            try:
                cur.execute(f"KILL {int(session_id)}")
            except pymysql.Error:
                pass  # already gone
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


def my_create_user(server: DatabaseServer, user: str, password: str, database: str) -> None:
    """A password-protected account (root has none), for tests of authentication failures."""
    with _my_connect(server.port) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE USER '{user}'@'%%' IDENTIFIED BY %s", (password,))
        cur.execute(f"GRANT ALL ON `{database}`.* TO '{user}'@'%'")


def my_grant(server: DatabaseServer, user: str, database_pattern: str) -> None:
    """All rights on the databases matching `database_pattern` (GRANT wildcards: _ and %)."""
    with _my_connect(server.port) as conn, conn.cursor() as cur:
        cur.execute(f"GRANT ALL ON `{database_pattern}`.* TO '{user}'@'%'")


def my_drop_user(server: DatabaseServer, user: str) -> None:
    with _my_connect(server.port) as conn, conn.cursor() as cur:
        cur.execute(f"DROP USER IF EXISTS '{user}'@'%'")


def serve(start: Callable[[], object]) -> Iterator:
    """For a fixture: the started server, stopped afterwards; skipped where it cannot start (a failure
    under RUNYARD_TEST_STRICT=1)."""
    try:
        server = start()
    except Unavailable as exc:
        if os.environ.get("RUNYARD_TEST_STRICT") == "1":
            pytest.fail(f"{exc} (RUNYARD_TEST_STRICT=1: required services must be available)")
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()
