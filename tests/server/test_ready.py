"""GET /ready: the database (reachable, schema at head), the proxied artifact store (write, read back,
delete) and the store's own checks (a Kerberos ticket for HDFS), each with its latency; 503 naming the
failing check, never a 500, never a secret. And the server riding out a database outage: PostgreSQL
stopped, then started again on the same port and data folder, under a server that keeps running."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import requests
from helpers.databases import PG_BIN, Unavailable
from helpers.ports import free_port, wait_for

API = "/api/2.0/mlflow"
PASSWORD = "pw-never-shown-7f3a"


def ready(server, prefix: str = "") -> requests.Response:
    return requests.get(f"{server.url}{prefix}/ready", timeout=30)


def assert_check_shape(check: dict) -> None:
    assert isinstance(check["ok"], bool) and isinstance(check["ms"], int | float) and check["ms"] >= 0
    assert ("reason" in check) is not check["ok"]


def new_run(base: str) -> str:
    exp = requests.post(f"{base}{API}/experiments/create", json={"name": f"r-{uuid.uuid4().hex}"}, timeout=30)
    assert exp.status_code == 200, exp.text
    run = requests.post(f"{base}{API}/runs/create", json={"experiment_id": exp.json()["experiment_id"]},
                        timeout=30)
    assert run.status_code == 200, run.text
    return run.json()["run"]["info"]["run_id"]


def log_metric(base: str, run_id: str, value: float, step: int) -> requests.Response:
    return requests.post(f"{base}{API}/runs/log-metric", json={
        "run_id": run_id, "key": "m", "value": value, "timestamp": 1000 + step, "step": step}, timeout=30)


def history(base: str, run_id: str) -> list[float]:
    r = requests.get(f"{base}{API}/metrics/get-history", params={"run_id": run_id, "metric_key": "m"},
                     timeout=30)
    assert r.status_code == 200, r.text
    return sorted(point["value"] for point in r.json()["metrics"])


def strict_or_skip(reason: str):
    if os.environ.get("RUNYARD_TEST_STRICT") == "1":
        pytest.fail(f"{reason} (RUNYARD_TEST_STRICT=1: required services must be available)")
    pytest.skip(reason)


# -- every check passing, and what each one covers ---------------------------------------------------

def test_ready_checks_database_and_artifacts(server_factory):
    server = server_factory()
    r = ready(server)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["status"] == "ready"
    assert set(body["checks"]) == {"database", "artifacts"}
    for check in body["checks"].values():
        assert check["ok"] is True
        assert_check_shape(check)
    # concurrent probes all answer, and the probe objects are gone afterwards
    for _ in range(5):
        assert ready(server).status_code == 200
    assert not [p for p in server.artifacts.rglob("*") if p.is_file()]
    assert requests.head(f"{server.url}/ready", timeout=30).status_code == 200


def test_without_artifact_serving_only_the_database_is_checked(server_factory):
    server = server_factory(None, "--no-serve-artifacts", "--static-prefix", "/tracking")
    r = ready(server, "/tracking")
    assert r.status_code == 200, r.text
    assert set(r.json()["checks"]) == {"database"}
    assert requests.get(f"{server.url}/ready", timeout=30).status_code == 404  # under the prefix only


def test_read_only_artifact_destination_is_not_ready_but_healthy(server_factory, read_only_folder):
    server = server_factory(None, "--artifacts-destination", str(read_only_folder))
    r = ready(server)
    assert r.status_code == 503, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["status"] == "not_ready"
    assert body["checks"]["database"]["ok"] is True
    artifacts = body["checks"]["artifacts"]
    assert artifacts["ok"] is False and artifacts["reason"]
    assert_check_shape(artifacts)
    assert "Traceback" not in r.text and "\n" not in artifacts["reason"]
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
    assert "Traceback" not in server.log()


def test_unreachable_artifact_destination_is_not_ready(server_factory):
    port = free_port()  # nothing listens there
    server = server_factory(None, "--artifacts-destination", f"sftp://probe:{PASSWORD}@127.0.0.1:{port}/data")
    r = ready(server)
    assert r.status_code == 503, r.text
    assert r.json()["checks"]["artifacts"]["ok"] is False
    assert PASSWORD not in r.text and PASSWORD not in server.log()
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200


def test_schema_not_at_head_is_not_ready_until_it_is_again(server_factory, tmp_path):
    store = tmp_path / "store"
    server = server_factory(str(store), "--no-serve-artifacts")
    assert ready(server).status_code == 200
    db = sqlite3.connect(store / "runyard.db", timeout=30)
    try:
        (head,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
        with db:
            db.execute("UPDATE alembic_version SET version_num = 'f00dfeed'")
        r = ready(server)
        assert r.status_code == 503, r.text
        reason = r.json()["checks"]["database"]["reason"]
        assert "f00dfeed" in reason and head in reason
        with db:
            db.execute("UPDATE alembic_version SET version_num = ?", (head,))
    finally:
        db.close()
    assert ready(server).status_code == 200


# -- a database that goes away and comes back ------------------------------------------------------

class RestartablePostgres:
    """A throwaway PostgreSQL 15 that can be stopped, started again on the same port and data folder,
    and frozen (SIGSTOP: its host accepts connections and never answers, like one dropping packets)."""

    def __init__(self):
        if not (PG_BIN / "initdb").exists():
            raise Unavailable(f"PostgreSQL 15 binaries not found in {PG_BIN}")
        self.workdir = Path(tempfile.mkdtemp(prefix="runyard-pg-ready-"))
        self.runas: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            shutil.chown(self.workdir, "postgres", "postgres")
            self.runas = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.data = self.workdir / "data"
        subprocess.run([*self.runas, str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A",
                        "trust", "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        self.start()

    def _pg_ctl(self, *args: str) -> None:
        done = subprocess.run([*self.runas, str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args],
                              capture_output=True)
        if done.returncode != 0:
            log = (self.workdir / "log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"pg_ctl {args[-1]} failed: {done.stderr.decode(errors='replace')}\n{log}")

    def start(self) -> None:
        self._pg_ctl("-l", str(self.workdir / "log"), "-w", "-t", "60", "-o",
                     f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "-w", "-t", "60", "stop")

    def _pids(self) -> list[int]:
        """The postmaster and its children (backends, background workers)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        pids = [postmaster]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == postmaster:
                pids.append(int(stat.parent.name))
        return pids

    def freeze(self) -> None:
        for pid in self._pids():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._pids():
            os.kill(pid, signal.SIGCONT)

    def create_database(self, name: str) -> None:
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def destroy(self) -> None:
        try:
            self.thaw()
        except (OSError, ValueError):
            pass
        try:
            self.stop()
        except (RuntimeError, OSError):
            pass
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextmanager
def restartable_postgres():
    try:
        pg = RestartablePostgres()
    except Unavailable as exc:
        strict_or_skip(str(exc))
    try:
        yield pg
    finally:
        pg.destroy()


@pytest.mark.db
def test_database_outage_is_not_ready_and_the_server_recovers_by_itself(server_factory):
    with restartable_postgres() as pg:
        pg.create_database("runyard")
        # trust auth ignores the password; it is here to prove it is never shown
        uri = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{pg.port}/runyard"
        server = server_factory(uri, "--no-serve-artifacts")
        run_id = new_run(server.url)
        assert log_metric(server.url, run_id, 1.0, 1).status_code == 200
        assert ready(server).status_code == 200

        pg.stop()
        assert wait_for(lambda: ready(server).status_code == 503, timeout=60, interval=0.5)
        r = ready(server)
        assert r.status_code == 503 and r.json()["status"] == "not_ready"
        database = r.json()["checks"]["database"]
        assert database["ok"] is False and database["reason"]
        assert PASSWORD not in r.text
        assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
        during = log_metric(server.url, run_id, 2.0, 2)
        assert during.status_code == 503, during.text
        assert during.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"

        pg.start()  # same port, same data folder; the server is not restarted
        back = wait_for(lambda: ready(server).status_code == 200, timeout=60, interval=0.5)
        assert back, ready(server).text
        assert history(server.url, run_id) == [1.0]  # acknowledged before the outage, still there
        assert log_metric(server.url, run_id, 3.0, 3).status_code == 200
        assert history(server.url, run_id) == [1.0, 3.0]
        assert PASSWORD not in server.log()
        assert "Traceback" not in server.log()


@pytest.mark.db
def test_a_database_that_never_answers_still_gets_a_prompt_not_ready(server_factory):
    with restartable_postgres() as pg:
        pg.create_database("runyard")
        server = server_factory(f"postgresql://postgres@127.0.0.1:{pg.port}/runyard", "--no-serve-artifacts")
        assert ready(server).status_code == 200
        pg.freeze()  # connections are accepted by the kernel, queries are never answered
        try:
            for _ in range(2):  # the second probe joins the check still in flight
                r = ready(server)  # the client's 30 s timeout is far above the check's deadline
                assert r.status_code == 503, r.text
                assert "no answer within" in r.json()["checks"]["database"]["reason"]
            assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
        finally:
            pg.thaw()
        assert wait_for(lambda: ready(server).status_code == 200, timeout=60, interval=0.5)


# -- Kerberos (HDFS) ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kerberized(tmp_path_factory):
    from helpers.stores.hdfs import kerberized_hdfs

    try:
        with kerberized_hdfs(tmp_path_factory.mktemp("krb-hdfs")) as service:
            yield service
    except Unavailable as exc:
        strict_or_skip(str(exc))


def test_kerberos_ticket_is_a_check_of_its_own(kerberized, server_factory, tmp_path):
    uri = kerberized.uri(f"/user/t/{uuid.uuid4().hex[:8]}")
    server = server_factory(None, "--artifacts-destination", uri, env=kerberized.env())
    r = ready(server)
    assert r.status_code == 200, r.text
    checks = r.json()["checks"]
    assert set(checks) == {"database", "artifacts", "kerberos"}
    assert all(check["ok"] for check in checks.values())

    # no ticket to be had: the ticket cache named is empty
    empty_cache = tmp_path / "empty-ccache"
    env = {**kerberized.realm.env, "MLFLOW_KERBEROS_TICKET_CACHE": f"FILE:{empty_cache}",
           "MLFLOW_KERBEROS_USER": "runyard", "KRB5CCNAME": f"FILE:{tmp_path / 'no-default-cache'}"}
    without = server_factory(None, "--artifacts-destination", uri, env=env)
    r = ready(without)
    assert r.status_code == 503, r.text
    checks = r.json()["checks"]
    assert checks["kerberos"]["ok"] is False and checks["artifacts"]["ok"] is False
    assert "Kerberos" in checks["kerberos"]["reason"]
    assert str(empty_cache) not in r.text
    assert requests.get(f"{without.url}/health", timeout=30).status_code == 200
