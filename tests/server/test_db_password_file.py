"""--backend-store-password-file: the database password from a file the server watches, rotated under
load without a failed request, on a real PostgreSQL and a real MariaDB that check passwords.

The machine's PostgreSQL trusts 127.0.0.1 (pg_hba.conf `host all all 127.0.0.1/32 trust`): it accepts any
password, so these tests use a throwaway PostgreSQL whose TCP logins need a SCRAM-SHA-256 password
(helpers.password_databases). MariaDB checks the passwords of the accounts it has. Every fixture first
proves that a wrong password is refused, or the tests would prove nothing.

What "no connection uses the old password" is checked with: a session authenticates once, when it is
opened, so a session opened after the ALTER cannot hold the old password. PostgreSQL: every session of
the user has `pg_stat_activity.backend_start` after the ALTER. MariaDB: session ids only grow, so every
session of the user has an id above that of a connection opened after the ALTER.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pymysql
import pytest
import requests
from helpers import databases
from helpers.cli import run_cli
from helpers.databases import Unavailable
from helpers.password_databases import start_scram_postgres
from helpers.ports import wait_for
from psycopg import sql

from server.config import ServerConfig
from server.store import dbpassword
from server.store.uri import create_engine

API = "/api/2.0/mlflow"
FLAG = "--backend-store-password-file"
pytestmark = pytest.mark.db


def new_password() -> str:
    return f"pw-{uuid.uuid4().hex}"


def write_secret(path: Path, value: str, mode: int = 0o600) -> None:
    """As `runyard rotate` and Kubernetes do: a new file renamed over the old one (a new inode)."""
    staged = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    os.chmod(staged, mode)
    os.replace(staged, path)


# ---- databases that check passwords --------------------------------------------------------------------

@dataclass
class PasswordDatabase:
    dialect: str
    uri: str  # without the password
    set_password: Callable[[str], None]  # ALTER, as the database's administrator
    accepts: Callable[[str], bool]  # does a NEW connection with this password get in?
    mark: Callable[[], object]  # a point after everything done so far
    sessions_before: Callable[[object], int]  # the user's sessions opened before the mark
    end_sessions: Callable[[], None]  # terminate the user's sessions
    allow_scratch_databases: Callable[[], None]  # what `runyard db verify` needs


@pytest.fixture(scope="module")
def scram_postgres():
    try:
        server = start_scram_postgres()
    except Unavailable as exc:
        if os.environ.get("RUNYARD_TEST_STRICT") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    yield server
    server.stop()


def _postgres(request, password: str) -> PasswordDatabase:
    server = request.getfixturevalue("scram_postgres")
    user, name = databases.unique_name("ryu"), databases.unique_name()
    uri = server.create_user_and_database(user, password, name)
    request.addfinalizer(lambda: server.drop_user_and_database(user, name))

    def admin(query: str, *params):
        with server.admin() as conn:
            cursor = conn.execute(query, params or None)
            return cursor.fetchall() if cursor.description else []

    def set_password(value: str) -> None:
        with server.admin() as conn:
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(user),
                                                                     sql.Literal(value)))

    def accepts(value: str) -> bool:
        try:
            psycopg.connect(host="127.0.0.1", port=server.port, user=user, password=value, dbname=name,
                            connect_timeout=5).close()
            return True
        except psycopg.OperationalError as exc:
            if "password authentication failed" in str(exc):
                return False
            raise

    return PasswordDatabase(
        "postgresql", uri, set_password, accepts,
        mark=lambda: admin("SELECT clock_timestamp()")[0][0],
        sessions_before=lambda mark: admin("SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND "
                                           "backend_start < %s", user, mark)[0][0],
        end_sessions=lambda: admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE usename = %s", user),
        allow_scratch_databases=lambda: admin(f'ALTER ROLE "{user}" CREATEDB'))


def _mariadb(request, password: str) -> PasswordDatabase:
    server = request.getfixturevalue("mysql_server")
    user, name = databases.unique_name("ryu"), databases.unique_name()
    databases.my_create_database(server, name)
    databases.my_create_user(server, user, password, name)
    request.addfinalizer(lambda: databases.my_drop_user(server, user))
    request.addfinalizer(lambda: databases.my_drop_database(server, name))

    def admin(query: str, *params):
        with databases._my_connect(server.port) as conn, conn.cursor() as cur:
            cur.execute(query, params or None)
            return cur.fetchall()

    def accepts(value: str) -> bool:
        try:
            pymysql.connect(host="127.0.0.1", port=server.port, user=user, password=value, database=name,
                            connect_timeout=5).close()
            return True
        except pymysql.err.OperationalError as exc:
            if exc.args[0] == 1045:
                return False
            raise

    def end_sessions() -> None:
        for (session,) in admin("SELECT id FROM information_schema.processlist WHERE user = %s", user):
            try:
                admin(f"KILL {int(session)}")
            except pymysql.Error:
                pass

    return PasswordDatabase(
        "mysql", f"mysql://{user}@127.0.0.1:{server.port}/{name}",
        set_password=lambda value: admin(f"ALTER USER '{user}'@'%%' IDENTIFIED BY %s", value),
        accepts=accepts,
        mark=lambda: admin("SELECT CONNECTION_ID()")[0][0],  # a new connection, opened now
        sessions_before=lambda mark: admin("SELECT COUNT(*) FROM information_schema.processlist "
                                           "WHERE user = %s AND id < %s", user, mark)[0][0],
        end_sessions=end_sessions,
        allow_scratch_databases=lambda: databases.my_grant(server, user, f"{name}__ry_%"))


@pytest.fixture(params=["postgresql", "mysql"])
def password_db(request) -> tuple[PasswordDatabase, str]:
    """A database whose own user needs a password; returns it and the user's current password."""
    password = new_password()
    db = (_postgres if request.param == "postgresql" else _mariadb)(request, password)
    assert not db.accepts(new_password()), "the database accepts a wrong password: these tests prove nothing"
    assert db.accepts(password)
    return db, password


# ---- load through the server ---------------------------------------------------------------------------

class Load:
    """Client threads creating runs and logging metrics through the server, counting every answer."""

    def __init__(self, base: str, threads: int = 4):
        self.base = base
        self.done = 0
        self.failures: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def _call(self, session: requests.Session, path: str, body: dict) -> dict | None:
        try:
            response = session.post(f"{self.base}{API}{path}", json=body, timeout=60)
            status, text = response.status_code, response.text
        except requests.RequestException as exc:
            status, text = 0, f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.done += 1
            if status != 200:
                self.failures.append((status, text))
                return None
        return response.json()

    def _work(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                run = self._call(session, "/runs/create", {"experiment_id": "0"})
                if run is None:
                    continue
                run_id = run["run"]["info"]["run_id"]
                for step in range(5):
                    self._call(session, "/runs/log-metric",
                               {"run_id": run_id, "key": "loss", "value": 1.0 / (step + 1),
                                "timestamp": 1_700_000_000_000 + step, "step": step})

    def advance(self, requests_: int, timeout: float = 60) -> None:
        """Waits until `requests_` more requests have been answered."""
        target = self.done + requests_
        assert wait_for(lambda: self.done >= target, timeout), f"the load stalled at {self.done} requests"


def start(server_factory, db: PasswordDatabase, secret: Path, env: dict | None = None):
    return server_factory(db.uri, FLAG, str(secret), env={"RUNYARD_DB_POOL_SIZE": "1", **(env or {})})


def in_log(server, text: str) -> Callable[[], bool]:
    return lambda: text in server.log()


# ---- the server ----------------------------------------------------------------------------------------

def test_rotation_under_load_fails_no_request(password_db, server_factory, tmp_path):
    db, first = password_db
    secret = tmp_path / "db-password"
    write_secret(secret, first)
    server = start(server_factory, db, secret)
    second, third = new_password(), new_password()

    with Load(server.url) as load:
        load.advance(100)

        # File first, then the database (what `runyard rotate db-password` does): until the ALTER, the
        # database refuses the file's new password and new connections fall back to the old one.
        write_secret(secret, second)
        assert wait_for(in_log(server, "still accepts the previous one"), 30), server.log()[-3000:]
        load.advance(50)
        db.set_password(second)
        after_second = db.mark()
        load.advance(100)
        # Every connection of the server was opened after the ALTER: none holds the old password.
        assert wait_for(lambda: db.sessions_before(after_second) == 0, 30), "sessions with the old password"

        # The database first, then the file: no password the server knows works until the file changes;
        # new connections wait for it.
        waits = server.log().count("wait up to")
        db.set_password(third)
        after_third = db.mark()
        assert wait_for(lambda: server.log().count("wait up to") > waits, 30), server.log()[-3000:]
        write_secret(secret, third)
        load.advance(100)
        assert wait_for(lambda: db.sessions_before(after_third) == 0, 30), "sessions with the old password"
        load.advance(50)

    assert load.failures == [], load.failures[:5]
    assert load.done >= 400
    assert not db.accepts(first) and not db.accepts(second)  # the old passwords are refused for good
    assert db.accepts(third)
    log = server.log()
    assert "connected with the password from" in log
    for password in (first, second, third):
        assert password not in log


def test_both_passwords_refused_is_503_without_the_password_then_recovers(password_db, server_factory,
                                                                          tmp_path):
    db, first = password_db
    secret = tmp_path / "db-password"
    write_secret(secret, first, mode=0o640)
    server = start(server_factory, db, secret, env={dbpassword.PASSWORD_WAIT_ENV: "1"})
    assert "can be read by its group" in server.log()
    url = f"{server.url}{API}/experiments/get?experiment_id=0"
    assert requests.get(url, timeout=30).status_code == 200

    unknown = new_password()
    db.set_password(unknown)  # a password the server is never told
    db.end_sessions()  # its pooled connections are gone: it needs a new one
    refused = requests.get(url, timeout=60)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
    ready = requests.get(f"{server.url}/ready", timeout=60)
    assert ready.status_code == 503
    for body in (refused.text, ready.text):
        assert first not in body and unknown not in body

    write_secret(secret, unknown)  # the file catches up: no restart needed
    assert wait_for(lambda: requests.get(url, timeout=60).status_code == 200, 30)
    log = server.log()
    assert first not in log and unknown not in log


def test_pooled_connections_are_recycled_after_a_rotation(password_db, tmp_path, monkeypatch):
    """In-process: which connection the pool hands out, before and after each step of a rotation."""
    monkeypatch.setattr(dbpassword, "STAT_INTERVAL_S", 0.0)  # look at the file at every checkout
    monkeypatch.setattr(dbpassword, "RETRY_FILE_S", 3600.0)  # keep fallback connections until told
    db, first = password_db
    secret = tmp_path / "db-password"
    write_secret(secret, first)
    engine = create_engine(db.uri, pool_size=1, password_file=str(secret))
    session_id = ("SELECT pg_backend_pid()" if db.dialect == "postgresql" else "SELECT CONNECTION_ID()")

    def session() -> int:
        with engine.connect() as conn:
            return conn.exec_driver_sql(session_id).scalar_one()

    try:
        opened = session()
        assert session() == opened  # pooled, kept

        second = new_password()
        write_secret(secret, second)
        fallback = session()  # the file changed: replaced; its password is refused, the old one works
        assert fallback != opened
        assert session() == fallback  # kept while the database refuses the file's password

        db.set_password(second)
        after_alter = db.mark()
        monkeypatch.setattr(dbpassword, "RETRY_FILE_S", 0.0)
        renewed = session()  # the fallback connection is replaced; the file's password now works
        assert renewed != fallback
        assert session() == renewed == session()  # and then kept
        assert db.sessions_before(after_alter) == 0  # its one session was opened after the ALTER
    finally:
        engine.dispose()


def test_a_changed_file_of_the_same_size_and_mtime_is_read_again_on_refusal(password_db, tmp_path):
    db, first = password_db
    secret = tmp_path / "db-password"
    write_secret(secret, first)
    engine = create_engine(db.uri, pool_size=1, password_file=str(secret))
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        engine.dispose()
        second = "pw-" + "x" * (len(first) - 3)  # same length
        before = secret.stat()
        with open(secret, "r+") as handle:  # rewritten in place: same inode, size and mtime
            handle.write(second + "\n")
        os.utime(secret, ns=(before.st_atime_ns, before.st_mtime_ns))
        db.set_password(second)
        with engine.connect() as conn:  # the refused password makes it read the file again
            assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
    finally:
        engine.dispose()


# ---- start-up ------------------------------------------------------------------------------------------

def test_a_bad_password_file_is_refused_at_start_naming_the_flag(tmp_path):
    uri = "postgresql://runyard@127.0.0.1:5432/runyard"
    content = "s3cret-content-never-shown"
    cases = {
        str(tmp_path / "missing"): "cannot read it (No such file or directory)",
        str(tmp_path): "is not a file",
    }
    (tmp_path / "empty").write_text("\n")
    cases[str(tmp_path / "empty")] = "is empty"
    if os.geteuid() != 0:  # root reads any file
        write_secret(tmp_path / "unreadable", content, mode=0o000)
        cases[str(tmp_path / "unreadable")] = "cannot read it (Permission denied)"
    for path, problem in cases.items():
        with pytest.raises(ValueError) as refused:
            ServerConfig(backend_store_uri=uri, backend_store_password_file=path)
        assert str(refused.value) == f"{FLAG} {path}: {problem}"

    good = tmp_path / "db-password"
    write_secret(good, content)
    config = ServerConfig(backend_store_uri=uri, backend_store_password_file=os.path.relpath(good))
    assert config.backend_store_password_file == str(good)  # absolute, for every worker process
    assert ServerConfig.from_env({"RUNYARD_SERVER_CONFIG": config.to_env()}) == config
    assert content not in config.to_env()
    with pytest.raises(ValueError, match="holds a password") as refused:
        ServerConfig(backend_store_uri="postgresql://runyard:inline@db/runyard",
                     backend_store_password_file=str(good))
    assert "inline" not in str(refused.value) and content not in str(refused.value)
    with pytest.raises(ValueError, match="SQLite"):
        ServerConfig(backend_store_uri=str(tmp_path / "store"), backend_store_password_file=str(good))


def test_the_server_command_refuses_a_missing_file_and_a_wrong_password(password_db, tmp_path):
    db, first = password_db
    missing = tmp_path / "missing"
    done = run_cli("server", "--backend-store-uri", db.uri, FLAG, str(missing), timeout=60)
    assert done.returncode == 2, done.stderr
    assert FLAG in done.stderr and str(missing) in done.stderr and "cannot read it" in done.stderr

    wrong = new_password()
    secret = tmp_path / "db-password"
    write_secret(secret, wrong)
    done = run_cli("server", "--backend-store-uri", db.uri, "--port", "0", timeout=60,
                   env={dbpassword.PASSWORD_FILE_ENV: str(secret)})
    assert done.returncode == 1, done.stderr
    assert "Cannot use database" in done.stderr
    assert wrong not in done.stdout + done.stderr and first not in done.stdout + done.stderr


def test_the_server_command_reads_the_environment_variable(password_db, server_factory, tmp_path):
    db, first = password_db
    secret = tmp_path / "db-password"
    write_secret(secret, first)
    server = server_factory(db.uri, env={dbpassword.PASSWORD_FILE_ENV: str(secret)})
    response = requests.post(f"{server.url}{API}/runs/create", json={"experiment_id": "0"}, timeout=30)
    assert response.status_code == 200, response.text
    assert first not in server.log()


# ---- the toolkit ---------------------------------------------------------------------------------------

def test_toolkit_commands_take_the_password_from_the_environment_variable(password_db, tmp_path):
    db, first = password_db
    secret = tmp_path / "db-password"
    write_secret(secret, first)
    env = {dbpassword.PASSWORD_FILE_ENV: str(secret)}

    done = run_cli("db", "current", db.uri, "--json", env=env)
    assert done.returncode == 0, done.stderr
    backups = tmp_path / "backups"
    done = run_cli("db", "backup", db.uri, "--to", str(backups), "--json", env=env)
    assert done.returncode == 0, done.stderr  # pg_dump / mariadb-dump got the file's password
    db.allow_scratch_databases()
    done = run_cli("db", "verify", json.loads(done.stdout)["backup"], "--json", env=env)
    assert done.returncode == 0, done.stderr  # restored into a scratch database with psql / mariadb
    done = run_cli("tokens", "list", "--backend-store-uri", db.uri, "--json", env=env)
    assert done.returncode == 0, done.stderr

    without = run_cli("db", "current", db.uri, "--json")
    assert without.returncode != 0
    wrong = new_password()
    write_secret(secret, wrong)
    refused = run_cli("db", "current", db.uri, "--json", env=env)
    assert refused.returncode != 0
    for done in (without, refused):
        assert first not in done.stdout + done.stderr and wrong not in done.stdout + done.stderr
