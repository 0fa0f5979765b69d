"""The `runyard` CLI as users run it: a subprocess, its exit code and its output."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from helpers import cli, databases
from helpers.ports import free_port, wait_for
from helpers.schema import NEWER_REVISION, UNKNOWN_REVISION, newer_migrations, stamp
from helpers.servers import launch, runyard_command

from migrations import runner
from toolkit import db

HEAD = runner.head_revision()
SECRET = "s3cretpw"

def run_cli(*args: str, env: dict | None = None, newer: Path | None = None) -> subprocess.CompletedProcess:
    return cli.run_cli(*args, env=env, chain=newer, timeout=120)


def assert_one_clean_line(result: subprocess.CompletedProcess, *must_contain: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output and SECRET not in output, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    for text in must_contain:
        assert text in lines[0], output


def test_db_current_and_upgrade(backend_uri):
    before = run_cli("db", "current", backend_uri, "--json")
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout) | {"backend": None} == {
        "backend": None, "revision": None, "head": HEAD, "status": "empty", "upgrade_pending": True,
        "interrupted": None}

    upgraded = run_cli("db", "upgrade", backend_uri, "--json")
    assert upgraded.returncode == 0, upgraded.stderr
    assert json.loads(upgraded.stdout)["revision"] == HEAD

    human = run_cli("db", "current", backend_uri)
    assert human.returncode == 0 and f"revision  {HEAD}" in human.stdout and "up to date" in human.stdout

    again = run_cli("db", "upgrade", backend_uri)
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_db_commands_take_the_uri_from_the_environment(backend_uri):
    """How the Kubernetes upgrade Job runs them: a URI with a password never sits in argv."""
    upgraded = run_cli("db", "upgrade", "--yes", "--json", env={"RUNYARD_BACKEND_STORE_URI": backend_uri})
    assert upgraded.returncode == 0, upgraded.stderr
    assert json.loads(upgraded.stdout)["revision"] == HEAD
    current = run_cli("db", "current", "--json", env={"RUNYARD_BACKEND_STORE_URI": backend_uri})
    assert json.loads(current.stdout)["status"] == "current"
    assert run_cli("db", "current").returncode != 0  # neither argument nor variable: refused


def test_upgrade_sql_for_mssql_connects_to_nothing():
    result = run_cli("db", "upgrade", f"mssql+pymssql://u:{SECRET}@nowhere/db", "--sql")
    assert result.returncode == 0, result.stderr
    assert "CREATE TABLE experiments" in result.stdout and "CREATE TABLE metrics" in result.stdout
    assert SECRET not in result.stdout + result.stderr


def test_upgrade_sql_from_a_revision_shows_only_the_pending_steps(tmp_path):
    result = run_cli("db", "upgrade", f"postgresql://u:{SECRET}@nowhere/db", "--sql", "--from-revision", HEAD,
                     newer=newer_migrations(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "CREATE TABLE ry_newer_marker" in result.stdout and "CREATE TABLE experiments" not in result.stdout
    assert f"UPDATE alembic_version SET version_num='{NEWER_REVISION}'" in result.stdout


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
def test_unreachable_database_is_one_clean_line(dialect):
    uri = f"{dialect}://someone:{SECRET}@127.0.0.1:{free_port()}/nothing"
    assert_one_clean_line(run_cli("db", "current", uri), "Cannot use database", "someone:***@")

    as_json = run_cli("db", "current", uri, "--json")
    assert as_json.returncode != 0 and SECRET not in as_json.stdout + as_json.stderr
    assert json.loads(as_json.stdout)["message"].startswith("Cannot use database")


@pytest.mark.db
def test_wrong_password_is_one_clean_line(mysql_server, mysql_uri):
    user, database = databases.unique_name("u"), mysql_uri.rsplit("/", 1)[1]
    databases.my_create_user(mysql_server, user, "the-right-one", database)
    try:
        uri = f"mysql://{user}:{SECRET}@127.0.0.1:{mysql_server.port}/{database}"
        assert_one_clean_line(run_cli("db", "current", uri), "Access denied")
        assert_one_clean_line(run_cli("db", "upgrade", uri), "Access denied")
    finally:
        databases.my_drop_user(mysql_server, user)


def test_server_refuses_an_older_schema(backend_uri, tmp_path):
    db.upgrade(backend_uri)  # at our head, one behind the newer runyard below
    result = run_cli("server", "--backend-store-uri", backend_uri, "--port", str(free_port()),
                     newer=newer_migrations(tmp_path))
    assert_one_clean_line(result, f"at revision {HEAD} but this runyard needs {NEWER_REVISION}",
                          f"runyard db upgrade '{backend_uri}'")


def test_server_refuses_a_newer_schema(backend_uri):
    db.upgrade(backend_uri)
    stamp(backend_uri, UNKNOWN_REVISION)
    result = run_cli("server", "--backend-store-uri", backend_uri, "--port", str(free_port()))
    assert_one_clean_line(result, UNKNOWN_REVISION, "migrated by a newer runyard")


def test_server_starts_on_a_fresh_database(backend_uri, server_factory):
    server = server_factory(backend_uri)
    with urllib.request.urlopen(f"{server.url}/health", timeout=5) as response:
        assert response.status == 200
    assert db.current(backend_uri)["revision"] == HEAD


def test_server_reads_its_options_from_the_environment(tmp_path):
    port = free_port()
    env = {**cli.clean_env(), "RUNYARD_PORT": str(port), "RUNYARD_BACKEND_STORE_URI": str(tmp_path / "store"),
           "RUNYARD_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts")}
    server = launch(runyard_command("server"), tmp_path, port, env["RUNYARD_BACKEND_STORE_URI"],
                    tmp_path / "artifacts", env=env)
    try:
        assert (tmp_path / "store" / "runyard.db").exists()
    finally:
        server.stop()


def test_server_refuses_an_mlflow_file_store(tmp_path):
    (tmp_path / "mlruns" / "0").mkdir(parents=True)
    (tmp_path / "mlruns" / "0" / "meta.yaml").write_text("name: Default\n")
    result = run_cli("server", "--backend-store-uri", str(tmp_path / "mlruns"), "--port", str(free_port()))
    assert_one_clean_line(result, "MLflow file store")


def test_invalid_server_options_exit_2():
    result = run_cli("server", "--static-prefix", "mlflow", "--port", str(free_port()))
    assert result.returncode == 2
    assert_one_clean_line(result, "--static-prefix must start with '/'")


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("runyard")
    if not script.exists():
        pytest.skip("runyard is not installed in this interpreter's environment (pip install -e .)")
    result = subprocess.run([str(script), "db", "--help"], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0 and "upgrade" in result.stdout


def test_shared_server_fixture_serves(server):
    with urllib.request.urlopen(f"{server.url}/health", timeout=5) as response:
        assert response.status == 200


def test_server_with_several_workers_stops_cleanly(server_factory):
    running = server_factory(None, workers=2)
    with urllib.request.urlopen(f"{running.url}/health", timeout=5) as response:
        assert response.status == 200
    running.stop()
    # SIGKILL lands asynchronously: give the kernel a moment before calling a survivor a leak.
    assert wait_for(lambda: _live_processes_in_group(running.proc.pid) == [], timeout=5)


def _live_processes_in_group(pgid: int) -> list[int]:
    """Members of a process group that still run (zombies excluded: PID 1 here may never reap them)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live
