"""toolkit/rotation/database.py: `runyard rotate db-password` against real PostgreSQL and MariaDB servers
that check passwords (a throwaway SCRAM PostgreSQL: the machine's trusts 127.0.0.1), with the secret in
a file or in AWS Secrets Manager (moto), and under load from two `runyard server` processes."""

from __future__ import annotations

import http.server
import json
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pymysql
import pytest
import requests
from helpers import databases
from helpers.moto_server import moto_server, secretsmanager, use_moto
from helpers.password_databases import scram_postgres_server
from helpers.ports import wait_for
from psycopg import sql
from sqlalchemy.engine import make_url

from server.errors import RunyardError
from toolkit.rotation import database
from toolkit.rotation.database import rotate_db_password
from toolkit.secrets import FileSecret, open_secret

API = "/api/2.0/mlflow"


# ---- fixtures -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scram_postgres():
    yield from scram_postgres_server()


@dataclass
class Account:
    dialect: str
    uri: str  # no password
    password: str  # the one it was created with, in `secret`
    secret: Path
    user: str
    database: str
    admin: object  # the ScramPostgres or the MariaDB DatabaseServer


def connects(uri: str, password: str) -> bool:
    """True when the account logs in with `password`, False when the database refuses it; anything else
    (unreachable, …) raises, so a refusal is never mistaken for it."""
    url = make_url(uri)
    try:
        if url.get_backend_name() == "postgresql":
            psycopg.connect(host=url.host, port=url.port, user=url.username, password=password,
                            dbname=url.database, connect_timeout=5).close()
        else:
            pymysql.connect(host=url.host, port=url.port, user=url.username, password=password,
                            database=url.database, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        if exc.pgconn is not None and exc.pgconn.used_password:
            return False
        raise
    except pymysql.err.OperationalError as exc:
        if exc.args[0] == 1045:
            return False
        raise
    return True


@pytest.fixture(params=[pytest.param("postgresql", marks=pytest.mark.db),
                        pytest.param("mysql", marks=pytest.mark.db)])
def account(request, tmp_path):
    """A login user with a password owning a fresh database, its password in a 0600 file."""
    user, name = databases.unique_name("rot"), databases.unique_name("rotdb")
    password = secrets.token_urlsafe(16)
    if request.param == "postgresql":
        server = request.getfixturevalue("scram_postgres")
        uri = server.create_user_and_database(user, password, name)
    else:
        server = request.getfixturevalue("mysql_server")
        databases.my_create_database(server, name)
        databases.my_create_user(server, user, password, name)
        uri = f"mysql://{user}@127.0.0.1:{server.port}/{name}"
    secret = tmp_path / "db-password"
    FileSecret(secret).write(password)
    found = Account(request.param, uri, password, secret, user, name, server)
    # The database really checks passwords: a wrong one is refused, the right one works.
    assert not connects(uri, "not-the-password")
    assert connects(uri, password)
    yield found
    if request.param == "postgresql":
        server.drop_user_and_database(user, name)
    else:
        databases.my_drop_database(server, name)
        databases.my_drop_user(server, user)


class Recorder:
    """A Progress that keeps every stage's text."""

    def __init__(self):
        self.stages: list[str] = []

    def stage(self, text: str) -> None:
        self.stages.append(text)

    def revisions(self, pending):
        return None

    def waiting(self) -> None:
        pass


def assert_no_password(*texts: str, passwords: tuple[str, ...]) -> None:
    for text in texts:
        for password in passwords:
            assert password not in text


@pytest.fixture
def known_new_password(monkeypatch):
    """The password the next rotation generates, known to the test so it can look for leaks (later
    rotations get random ones as usual)."""
    new = "N3w-" + secrets.token_urlsafe(24)
    planned = iter([new])
    monkeypatch.setattr(database, "_new_password", lambda: next(planned, None) or secrets.token_urlsafe(32))
    return new


# ---- arguments ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("uri, words", [
    ("postgresql://u:hunter2@127.0.0.1/db", ["without its password", "***"]),
    ("./mlruns", ["PostgreSQL and MariaDB/MySQL", "sqlite"]),
    ("mssql://u@h/db", ["not mssql"]),
    ("postgresql+psycopg2://u@h/db", ["psycopg driver"]),
])
def test_refuses_uris_it_cannot_rotate(uri, words, tmp_path):
    FileSecret(tmp_path / "pw").write("x")
    with pytest.raises(RunyardError) as caught:
        rotate_db_password(uri, str(tmp_path / "pw"))
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "hunter2" not in caught.value.message
    for word in words:
        assert word in caught.value.message


# ---- rotations ----------------------------------------------------------------------------------------

def test_rotation_changes_the_password(account, known_new_password):
    progress = Recorder()
    report = rotate_db_password(account.uri, str(account.secret), progress=progress)
    new = FileSecret(account.secret).read()
    assert new == known_new_password
    assert connects(account.uri, new)
    assert not connects(account.uri, account.password)
    assert (report["rotated"], report["secret"], [s["step"] for s in report["steps"]]) == (
        True, str(account.secret), [1, 2, 3, 4, 5])
    assert report["user"].split("@")[0] == account.user
    assert report["method"] == {  # a hash went to the server, not the password
        "postgresql": "ALTER ROLE … PASSWORD '<SCRAM-SHA-256 verifier>'",
        "mysql": "SET PASSWORD = '<mysql_native_password hash>'"}[account.dialect]
    assert [text.split(":")[0] for text in progress.stages] == [f"Step {n}/5" for n in range(1, 6)]
    assert_no_password(json.dumps(report), *progress.stages, passwords=(account.password, new))
    assert (account.secret.stat().st_mode & 0o777) == 0o600

    # And again, from the password it just set.
    rotate_db_password(account.uri, str(account.secret))
    newer = FileSecret(account.secret).read()
    assert newer != new and connects(account.uri, newer) and not connects(account.uri, new)


def test_postgres_gets_a_scram_verifier_never_the_password(request, known_new_password, tmp_path):
    """What PostgreSQL stores (and what a statement log would show) is a SCRAM-SHA-256 verifier."""
    server = request.getfixturevalue("scram_postgres")
    user, name = databases.unique_name("rot"), databases.unique_name("rotdb")
    uri = server.create_user_and_database(user, "first-password", name)
    try:
        with server.admin() as conn:
            conn.execute("ALTER SYSTEM SET log_statement = 'all'")
            conn.execute("SELECT pg_reload_conf()")
        FileSecret(tmp_path / "pw").write("first-password")
        rotate_db_password(uri, str(tmp_path / "pw"))
        with server.admin() as conn:
            stored = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (user,)
                                  ).fetchone()[0]
            log = conn.execute("SELECT pg_read_file(current_setting('data_directory') || '/../log')"
                               ).fetchone()[0]
        assert stored.startswith("SCRAM-SHA-256$4096:")
        assert f'ALTER ROLE "{user}" PASSWORD \'SCRAM-SHA-256$' in log
        assert known_new_password not in log
    finally:
        with server.admin() as conn:
            conn.execute("ALTER SYSTEM RESET log_statement")
            conn.execute("SELECT pg_reload_conf()")
        server.drop_user_and_database(user, name)


def test_a_password_the_database_refuses_changes_nothing(account):
    FileSecret(account.secret).write("wrong-password-123")
    with pytest.raises(RunyardError) as caught:
        rotate_db_password(account.uri, str(account.secret))
    message = caught.value.message
    assert "refuses the password" in message and "nothing was changed" in message
    assert "wrong-password-123" not in message
    assert FileSecret(account.secret).read() == "wrong-password-123"
    assert connects(account.uri, account.password)


@pytest.mark.parametrize("content", [None, ""])
def test_an_empty_or_missing_secret_changes_nothing(account, content):
    if content is None:
        account.secret.unlink()
    else:
        account.secret.write_text("\n")
    with pytest.raises(RunyardError, match="holds no password"):
        rotate_db_password(account.uri, str(account.secret))
    assert connects(account.uri, account.password)


@pytest.mark.db
def test_a_server_that_does_not_check_passwords_is_refused(postgres_server, tmp_path):
    """The machine's PostgreSQL trusts 127.0.0.1: rotating there could not be verified."""
    user, name = databases.unique_name("rot"), databases.unique_name("rotdb")
    with psycopg.connect(postgres_server.base_url + "/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw'").format(sql.Identifier(user)))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name),
                                                                   sql.Identifier(user)))
    try:
        FileSecret(tmp_path / "pw").write("pw")
        uri = f"postgresql://{user}@127.0.0.1:{postgres_server.port}/{name}"
        with pytest.raises(RunyardError, match="without asking for the password.*nothing was changed"):
            rotate_db_password(uri, str(tmp_path / "pw"))
        assert FileSecret(tmp_path / "pw").read() == "pw"
    finally:
        databases.pg_drop_database(postgres_server, name)
        with psycopg.connect(postgres_server.base_url + "/postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(user)))


def test_two_rotations_of_one_user_do_not_run_at_once(account):
    lock_name = f"runyard.rotate-db-password:{account.user}"
    if account.dialect == "postgresql":
        holder = account.admin.admin(account.database)
        holder.execute("SELECT pg_advisory_lock(hashtext(%s))", (lock_name,))
    else:
        holder = pymysql.connect(host="127.0.0.1", port=account.admin.port, user="root", autocommit=True)
        with holder.cursor() as cur:
            cur.execute("SELECT GET_LOCK(%s, 0)", ((lock_name + "@%")[:64],))
    try:
        with pytest.raises(RunyardError, match="Another rotation.*nothing was changed"):
            rotate_db_password(account.uri, str(account.secret))
    finally:
        holder.close()
    assert FileSecret(account.secret).read() == account.password
    rotate_db_password(account.uri, str(account.secret))  # free again


# ---- failures after the secret was written: rolled back ----------------------------------------------

@pytest.fixture
def not_ready_url():
    """A server whose /ready answers 503, like a runyard that cannot reach its database."""

    class NotReady(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(503 if self.path == "/ready" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotReady)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def assert_rolled_back(account, caught, new: str, step: int) -> None:
    message = caught.value.message
    assert message.startswith(f"Rotation failed at step {step} ")
    assert "rolled back: the database and" in message
    assert_no_password(message, passwords=(account.password, new))
    assert FileSecret(account.secret).read() == account.password
    assert connects(account.uri, account.password)
    assert not connects(account.uri, new)


def test_a_server_not_ready_afterwards_rolls_everything_back(account, known_new_password, not_ready_url):
    progress = Recorder()
    with pytest.raises(RunyardError) as caught:
        rotate_db_password(account.uri, str(account.secret), ready_urls=[not_ready_url], progress=progress,
                           ready_timeout_s=0.5)
    assert "/ready did not answer 200" in caught.value.message and "HTTP 503" in caught.value.message
    assert_rolled_back(account, caught, known_new_password, step=5)
    assert progress.stages[-1] == "Rotation failed at step 5; rolling back"
    assert_no_password(*progress.stages, passwords=(account.password, known_new_password))
    rotate_db_password(account.uri, str(account.secret))  # and a later rotation works


def test_a_failure_once_the_database_changed_rolls_it_back(account, known_new_password, monkeypatch):
    """The ALTER went through but its answer was lost (the connection dropped): the database holds the
    new password and the rotation must put the old one back."""
    real = database._Database.set_password
    calls = []

    def set_then_fail(self, conn, user, password):
        real(self, conn, user, password)
        calls.append(password)
        if len(calls) == 1:
            assert connects(account.uri, password)  # it really changed
            conn.close()
            raise RuntimeError(f"connection lost (the server said {password!r})")  # a chatty driver

    monkeypatch.setattr(database._Database, "set_password", set_then_fail)
    with pytest.raises(RunyardError) as caught:
        rotate_db_password(account.uri, str(account.secret))
    assert "connection lost" in caught.value.message
    assert calls == [known_new_password, account.password]  # the rollback ran on a new connection
    assert_rolled_back(account, caught, known_new_password, step=4)


def test_a_secret_that_cannot_be_written_changes_nothing(account, known_new_password, monkeypatch):
    def refuse(self, value):
        raise RunyardError(f"Cannot write the secret file {self.ref}: Read-only file system", "INVALID_STATE")

    monkeypatch.setattr(FileSecret, "write", refuse)
    with pytest.raises(RunyardError) as caught:
        rotate_db_password(account.uri, str(account.secret))
    monkeypatch.undo()
    assert "step 3" in caught.value.message and "Read-only file system" in caught.value.message
    assert_rolled_back(account, caught, known_new_password, step=3)


def test_a_change_that_did_not_take_is_undone(account, known_new_password, monkeypatch):
    """Should the database not take the new password (the change silently went nowhere), the secret gets
    the old one back."""
    monkeypatch.setattr(database._Database, "set_password", lambda self, conn, user, password: None)
    with pytest.raises(RunyardError) as caught:
        rotate_db_password(account.uri, str(account.secret))
    assert "refuses the new password" in caught.value.message
    assert FileSecret(account.secret).read() == account.password
    assert connects(account.uri, account.password)


# ---- the secret in AWS Secrets Manager -----------------------------------------------------------------

@pytest.fixture(scope="module")
def moto_endpoint():
    with moto_server() as endpoint:
        yield endpoint


def test_rotation_with_the_secret_in_aws_secrets_manager(account, moto_endpoint, monkeypatch,
                                                         known_new_password):
    use_moto(monkeypatch, moto_endpoint)
    ref = f"aws-sm://runyard/{account.user}"
    open_secret(ref).write(account.password)
    report = rotate_db_password(account.uri, ref)
    assert report["secret"] == ref
    stored = secretsmanager(moto_endpoint).get_secret_value(SecretId=f"runyard/{account.user}")
    assert stored["SecretString"] == known_new_password
    assert connects(account.uri, known_new_password)
    assert not connects(account.uri, account.password)


# ---- under load: two `runyard server` processes reading the secret file -------------------------------

class Load:
    """`clients` threads, each creating a run and logging a metric to one server then the other, until
    stopped; every answer that is not 200 (or no answer) is kept as a failure."""

    def __init__(self, servers, experiment_id: str, clients: int = 4):
        self.servers, self.experiment_id = servers, experiment_id
        self.done = [0] * clients
        self.failures: list[tuple[str, str]] = []
        self.phase = "before"
        self.per_phase: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                         for i in range(clients)]

    def _record(self, index: int, ok: bool, detail: str = "") -> None:
        with self._lock:
            self.done[index] += 1
            self.per_phase[self.phase] = self.per_phase.get(self.phase, 0) + 1
            if not ok:
                self.failures.append((self.phase, detail))

    def _call(self, session, index: int, base: str, path: str, body: dict) -> dict | None:
        try:
            answer = session.post(f"{base}{API}/{path}", json=body, timeout=60)
        except requests.RequestException as exc:
            self._record(index, False, f"{path}: {type(exc).__name__}")
            return None
        detail = f"{path}: HTTP {answer.status_code} {answer.text[:300]}"
        self._record(index, answer.status_code == 200, detail)
        return answer.json() if answer.status_code == 200 else None

    def _client(self, index: int) -> None:
        session, step = requests.Session(), 0
        while not self._stop.is_set():
            base = self.servers[(index + step) % len(self.servers)].url
            run = self._call(session, index, base, "runs/create", {"experiment_id": self.experiment_id})
            if run is not None:
                self._call(session, index, base, "runs/log-metric", {
                    "run_id": run["run"]["info"]["run_id"], "key": "m", "value": step, "timestamp": step,
                    "step": step})
            step += 1

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def wait_for_more(self, requests_each: int, timeout: float = 120) -> None:
        """Until every client has completed `requests_each` more requests."""
        with self._lock:
            target = [n + requests_each for n in self.done]
        progressed = wait_for(lambda: all(n >= t for n, t in zip(self.done, target, strict=True)), timeout)
        assert progressed, f"clients stalled: {self.done} (failures: {self.failures[:3]})"

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)


class HoldingProgress(Recorder):
    """Reports stages to the load's phase and, at steps 4 and 5, keeps the rotation waiting until every
    client has made more requests: so the servers open connections in each window (secret changed but
    not the database yet; database changed but not verified yet)."""

    def __init__(self, load: Load, name: str):
        super().__init__()
        self.load, self.name = load, name

    def stage(self, text: str) -> None:
        super().stage(text)
        self.load.phase = f"{self.name}: {text.split(':')[0]}"
        if text.startswith(("Step 4/5", "Step 5/5", "Rotation failed")):
            self.load.wait_for_more(6)


def test_no_failed_request_while_rotating_under_load(account, server_factory, not_ready_url):
    """2 servers with --backend-store-password-file (the secret) and 1 pooled connection each, 4 clients;
    a rotation, a second one, and one rolled back: zero failed requests."""
    flags = ("--backend-store-password-file", str(account.secret))
    servers = [server_factory(account.uri, *flags, env={"RUNYARD_DB_POOL_SIZE": "1"}) for _ in range(2)]
    created = requests.post(f"{servers[0].url}{API}/experiments/create",
                            json={"name": databases.unique_name("load")}, timeout=30)
    assert created.status_code == 200, created.text
    load = Load(servers, created.json()["experiment_id"])
    load.start()
    secrets_seen = [account.password]
    try:
        load.wait_for_more(10)
        for name in ("first", "second"):
            progress = HoldingProgress(load, name)
            report = rotate_db_password(account.uri, str(account.secret), ready_urls=[s.url for s in servers],
                                        progress=progress)
            assert [c["ready"] for c in report["servers_checked"]] == [True, True]
            secrets_seen.append(FileSecret(account.secret).read())
            load.phase = f"after {name}"
            load.wait_for_more(10)
        before_failed = FileSecret(account.secret).read()
        with pytest.raises(RunyardError, match="rolled back"):
            rotate_db_password(account.uri, str(account.secret), ready_urls=[*(s.url for s in servers),
                                                                              not_ready_url],
                               progress=HoldingProgress(load, "rolled back"), ready_timeout_s=0.5)
        assert FileSecret(account.secret).read() == before_failed
        load.phase = "after the rolled back one"
        load.wait_for_more(10)
    finally:
        load.stop()
    print(f"\nrequests per phase: {load.per_phase}; failed: {len(load.failures)}")
    assert load.failures == []
    assert connects(account.uri, secrets_seen[-1])
    assert not any(connects(account.uri, old) for old in secrets_seen[:-1])
    for server in servers:
        assert_no_password(server.log(), passwords=tuple(secrets_seen))
