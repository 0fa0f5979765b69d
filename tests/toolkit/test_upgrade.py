"""`runyard db upgrade` as operators and jobs run it (a subprocess), on SQLite, PostgreSQL and MariaDB:
backup first, failures undone, a killed upgrade finished or undone by the next one, concurrent
upgrades serialised, bad input refused without touching the database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import databases
from helpers.cli import clean_env, cli_command, run_cli
from helpers.ports import free_port, wait_for
from helpers.schema import (
    BROKEN_UPGRADE,
    LOSSY_UPGRADE,
    NEWER_REVISION,
    SLOW_UPGRADE,
    STALLING_UPGRADE,
    newer_migrations,
)
from helpers.seed import fingerprint, seed

from migrations import marker, runner
from server.errors import RunyardError
from toolkit import db

HEAD = runner.head_revision()
SECRET = "s3cretpw"


def upgrade_cli(uri: str, *flags: str, chain: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("db", "upgrade", uri, "--yes", *flags, chain=chain, env=env)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a failed command prints; fails the test on a traceback or a leaked secret."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output and SECRET not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, output
    return errors[0]


def without_version(tables: dict) -> dict:
    return {name: value for name, value in tables.items() if name != "alembic_version"}


def test_upgrade_backs_up_verifies_then_migrates(backend_uri, tmp_path):
    seed(backend_uri)
    before = fingerprint(backend_uri)
    result = upgrade_cli(backend_uri, "--backup-to", str(tmp_path / "backups"), "--json",
                         chain=newer_migrations(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["upgraded"] is True and report["previous_revision"] == HEAD
    assert report["revision"] == NEWER_REVISION and report["interrupted"] is None
    manifest = json.loads((Path(report["backup"]) / "manifest.json").read_text())
    assert manifest["revision"] == HEAD and Path(report["backup"]).parent == tmp_path / "backups"
    # Stages are reported on stderr (plain lines off a terminal), the JSON alone on stdout.
    assert "Backing up" in result.stderr and "Restoring" in result.stderr and "applied 9002" in result.stderr

    after = fingerprint(backend_uri)
    assert after.pop("ry_newer_marker")[0] == 0  # the table revision 9002 creates
    assert without_version(after) == without_version(before)
    assert marker.TABLE_NAME not in after


def test_a_failing_revision_leaves_the_database_as_it_was(backend_uri, tmp_path):
    seed(backend_uri)
    before = fingerprint(backend_uri)
    result = upgrade_cli(backend_uri, "--backup-to", str(tmp_path / "backups"),
                         chain=newer_migrations(tmp_path, BROKEN_UPGRADE))
    line = error_line(result)
    assert f"Upgrading from {HEAD} to {NEWER_REVISION} failed: revision 9002 is broken on purpose" in line
    if backend_uri.startswith("mysql"):  # DDL committed the DELETE; only the backup undoes it
        assert "Restored the backup" in line and "as it was before the upgrade" in line
    else:
        assert "The database rolled the migration back" in line
    assert fingerprint(backend_uri) == before
    assert db.current(backend_uri)["interrupted"] is None
    db.ensure_ready(backend_uri)  # a server starts on it as before


def test_the_result_check_catches_rows_lost_by_a_revision(backend_uri, tmp_path):
    seed(backend_uri)
    before = fingerprint(backend_uri)
    result = upgrade_cli(backend_uri, "--backup-to", str(tmp_path / "backups"),
                         chain=newer_migrations(tmp_path, LOSSY_UPGRADE))
    assert "Row counts changed in tables no migration was meant to touch: params 6 -> 0" in error_line(result)
    assert fingerprint(backend_uri) == before

    declared = upgrade_cli(backend_uri, "--backup-to", str(tmp_path / "backups"),
                           chain=newer_migrations(tmp_path, LOSSY_UPGRADE, moves_rows=("params",),
                                                  name="declared"))
    assert declared.returncode == 0, declared.stderr
    assert fingerprint(backend_uri)["params"][0] == 0


def test_an_upgrade_killed_half_way_is_undone_then_resumed(backend_uri, tmp_path, monkeypatch):
    seed(backend_uri)
    before = fingerprint(backend_uri)
    reached = tmp_path / "reached"
    proc = subprocess.Popen(
        cli_command("db", "upgrade", backend_uri, "--yes", "--backup-to", str(tmp_path / "backups"),
                    chain=newer_migrations(tmp_path, STALLING_UPGRADE, name="stalling")),
        env=clean_env({"RY_TEST_REACHED": str(reached)}), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: reached.exists() or proc.poll() is not None, timeout=120)
        assert reached.exists(), proc.communicate()[1].decode()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    state = db.current(backend_uri)
    assert state["interrupted"]["kind"] == "upgrade"
    assert state["interrupted"]["to_revision"] == NEWER_REVISION and state["interrupted"]["backup"]
    with pytest.raises(RunyardError, match="did not finish. Run: runyard db upgrade"):
        db.ensure_ready(backend_uri)  # no server starts on a database in that state
    human = run_cli("db", "current", backend_uri)
    assert "an interrupted upgrade was found" in human.stdout

    # The operator runs the upgrade again, now with a revision that works.
    fixed = newer_migrations(tmp_path, name="fixed")
    result = upgrade_cli(backend_uri, "--backup-to", str(tmp_path / "backups"), chain=fixed)
    assert result.returncode == 0, result.stderr
    assert "was interrupted" in result.stdout
    if backend_uri.startswith("mysql"):
        assert "restored the backup" in result.stdout
    else:
        assert "the database rolled it back" in result.stdout
    assert f"to {NEWER_REVISION}" in result.stdout
    after = fingerprint(backend_uri)
    assert after["metrics"] == before["metrics"] and after["params"] == before["params"]
    assert "ry_half_table" not in after and marker.TABLE_NAME not in after
    monkeypatch.setattr(runner, "SCRIPT_LOCATION", fixed)
    db.ensure_ready(backend_uri)  # the upgraded runyard starts on it


def test_five_concurrent_upgrades_migrate_exactly_once(backend_uri, tmp_path):
    seed(backend_uri)
    chain = newer_migrations(tmp_path, SLOW_UPGRADE)
    backups = tmp_path / "backups"
    procs = [subprocess.Popen(cli_command("db", "upgrade", backend_uri, "--yes", "--json", "--backup-to",
                                          str(backups), chain=chain),
                              env=clean_env({"RY_TEST_SLEEP": "2"}), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for _ in range(5)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    reports = []
    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr
        reports.append(json.loads(stdout))
    migrated = [report for report in reports if report["upgraded"]]
    assert len(migrated) == 1 and migrated[0]["previous_revision"] == HEAD
    # The other four looked only once the lock was theirs, and found the work done.
    for report in reports:
        if not report["upgraded"]:
            assert report["previous_revision"] == NEWER_REVISION and report["backup"] is None
    assert all(report["revision"] == NEWER_REVISION for report in reports)
    assert len(list(backups.iterdir())) == 1  # one backup, by the one that migrated


def test_without_yes_a_job_is_refused_before_anything_happens(tmp_path):
    store = str(tmp_path / "store")
    seed(store)
    result = run_cli("db", "upgrade", store, chain=newer_migrations(tmp_path))
    assert "pass --yes" in error_line(result)
    assert db.current(store)["revision"] == HEAD


@pytest.mark.db
def test_a_database_server_needs_a_backup_destination_or_no_backup(postgres_uri, tmp_path):
    seed(postgres_uri)
    chain = newer_migrations(tmp_path)
    assert "--backup-to DEST" in error_line(upgrade_cli(postgres_uri, chain=chain))
    assert db.current(postgres_uri)["revision"] == HEAD

    result = upgrade_cli(postgres_uri, "--no-backup", "--json", chain=chain)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["upgraded"] is True and report["backup"] is None


def test_read_only_backup_destination_stops_the_upgrade(tmp_path, read_only_folder):
    store = str(tmp_path / "store")
    seed(store)
    before = fingerprint(store)
    chain = newer_migrations(tmp_path)
    line = error_line(upgrade_cli(store, "--backup-to", str(read_only_folder), chain=chain))
    assert f"Cannot write backups to {read_only_folder}" in line and "Read-only file system" in line
    assert fingerprint(store) == before


def test_restoring_a_damaged_backup_changes_nothing(backend_uri, tmp_path):
    seed(backend_uri)
    made = db.backup(backend_uri, str(tmp_path / "backups"))
    before = fingerprint(backend_uri)
    manifest = json.loads((Path(made["backup"]) / "manifest.json").read_text())
    data = Path(made["backup"]) / manifest["data_file"]
    data.write_bytes(data.read_bytes()[:100])
    line = error_line(run_cli("db", "restore", backend_uri, "--from", made["backup"], "--yes"))
    assert "is damaged" in line and "truncated" in line
    assert fingerprint(backend_uri) == before


@pytest.mark.parametrize("command", [("db", "current"), ("db", "backup", "--to", "/tmp/ry-unused"),
                                     ("db", "upgrade", "--yes", "--backup-to", "/tmp/ry-unused"),
                                     ("db", "restore", "--yes", "--from", "/tmp/ry-unused")])
def test_unreachable_database_is_one_clean_line(command):
    uri = f"postgresql://someone:{SECRET}@127.0.0.1:{free_port()}/nothing"
    verb, *flags = command[1:]
    result = run_cli("db", verb, uri, *flags)
    line = error_line(result)
    assert "someone:***@" in line or "No backup at" in line


def test_unknown_dialect_is_one_clean_line():
    line = error_line(run_cli("db", "backup", f"oracle://scott:{SECRET}@db/orcl", "--to", "/tmp/ry-unused"))
    assert "Unsupported" in line and "'oracle'" in line


@pytest.mark.db
def test_wrong_password_is_one_clean_line(mysql_server, mysql_uri, tmp_path):
    seed(mysql_uri)
    before = fingerprint(mysql_uri)
    user, database = databases.unique_name("u"), mysql_uri.rsplit("/", 1)[1]
    databases.my_create_user(mysql_server, user, "the-right-one", database)
    try:
        uri = f"mysql://{user}:{SECRET}@127.0.0.1:{mysql_server.port}/{database}"
        for args in (("backup", uri, "--to", str(tmp_path / "b")),
                     ("upgrade", uri, "--yes", "--backup-to", str(tmp_path / "b"))):
            assert "Access denied" in error_line(run_cli("db", *args))
    finally:
        databases.my_drop_user(mysql_server, user)
    assert fingerprint(mysql_uri) == before


@pytest.mark.db
def test_backup_tools_get_the_password_from_a_file_not_argv(mysql_server, mysql_uri, tmp_path):
    """A password-protected account works end to end, and the password never shows in output."""
    seed(mysql_uri)
    user, database = databases.unique_name("u"), mysql_uri.rsplit("/", 1)[1]
    databases.my_create_user(mysql_server, user, SECRET, database)
    try:
        uri = f"mysql://{user}:{SECRET}@127.0.0.1:{mysql_server.port}/{database}"
        result = run_cli("db", "backup", uri, "--to", str(tmp_path / "b"), "--json")
        assert result.returncode == 0, result.stderr
        assert SECRET not in result.stdout + result.stderr
        backup = json.loads(result.stdout)["backup"]
        assert SECRET not in (Path(backup) / "manifest.json").read_text()
        before = fingerprint(mysql_uri)
        # Restoring loads a staging database beside the live one: the account needs that right.
        assert "may not create" in error_line(run_cli("db", "restore", uri, "--from", backup, "--yes"))
        assert fingerprint(mysql_uri) == before
        databases.my_grant(mysql_server, user, f"{database}__ry_%")
        restored = run_cli("db", "restore", uri, "--from", backup, "--yes")
        assert restored.returncode == 0, restored.stderr
        assert fingerprint(mysql_uri) == before
    finally:
        databases.my_drop_user(mysql_server, user)


def test_mssql_upgrade_needs_no_backup_and_says_how_to_take_one():
    line = error_line(run_cli("db", "upgrade", f"mssql+pymssql://sa:{SECRET}@nowhere/tracking", "--yes"))
    assert "BACKUP DATABASE [tracking]" in line and "--no-backup" in line


def test_keep_must_be_positive(tmp_path):
    result = run_cli("db", "backup", str(tmp_path), "--to", str(tmp_path / "b"), "--keep", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_environment_names_the_backup_destination(tmp_path):
    store = str(tmp_path / "store")
    seed(store)
    result = upgrade_cli(store, "--json", chain=newer_migrations(tmp_path),
                         env={"RUNYARD_BACKUP_TO": str(tmp_path / "from-env")})
    assert result.returncode == 0, result.stderr
    assert Path(json.loads(result.stdout)["backup"]).parent == tmp_path / "from-env"
    assert os.listdir(tmp_path / "from-env")
