"""toolkit.db and migrations.runner against embedded SQLite, real PostgreSQL and real MariaDB."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers.schema import (
    NEWER_REVISION,
    UNKNOWN_REVISION,
    engine_for,
    newer_migrations,
    schema_diff,
    stamp,
    table_names,
)

from migrations import runner
from server.errors import RunyardError
from server.store.schema import metadata
from toolkit import db

HEAD = runner.head_revision()


@pytest.fixture
def newer_runyard(tmp_path, monkeypatch):
    """Plays a newer runyard whose chain has one more revision than the database's."""
    monkeypatch.setattr(runner, "SCRIPT_LOCATION", newer_migrations(tmp_path))


def test_fresh_database_upgrade_then_current(backend_uri):
    before = db.current(backend_uri)
    assert before["revision"] is None and before["head"] == HEAD
    assert before["status"] == "empty" and before["upgrade_pending"] is True

    report = db.upgrade(backend_uri)
    assert report["upgraded"] is True and report["previous_revision"] is None

    after = db.current(backend_uri)
    assert after["revision"] == HEAD and after["status"] == "current" and after["upgrade_pending"] is False

    again = db.upgrade(backend_uri)
    assert again["upgraded"] is False and again["revision"] == HEAD


def test_upgraded_schema_matches_schema_py(backend_uri):
    db.upgrade(backend_uri)
    assert schema_diff(backend_uri) == []
    assert set(metadata.tables) | {"alembic_version"} == table_names(backend_uri)


def test_ensure_schema_initialises_an_empty_database(backend_uri):
    db.ensure_ready(backend_uri)
    assert db.current(backend_uri)["revision"] == HEAD
    db.ensure_ready(backend_uri)  # a second start finds it ready


def test_ensure_schema_refuses_an_older_revision(backend_uri, newer_runyard, tmp_path):
    # The database is at our head; the "newer runyard" needs one revision more.
    engine = engine_for(backend_uri)
    runner.upgrade(engine, HEAD)
    engine.dispose()
    with pytest.raises(RunyardError) as caught:
        db.ensure_ready(backend_uri)
    assert caught.value.error_code == "INVALID_STATE"
    assert f"at revision {HEAD} but this runyard needs {NEWER_REVISION}" in caught.value.message
    assert f"runyard db upgrade '{backend_uri}'" in caught.value.message

    report = db.upgrade(backend_uri, backup_to=str(tmp_path / "backups"))
    assert report["previous_revision"] == HEAD and report["revision"] == NEWER_REVISION
    assert report["backup"].startswith(str(tmp_path / "backups"))
    assert "ry_newer_marker" in table_names(backend_uri)
    db.ensure_ready(backend_uri)


def test_ensure_schema_refuses_an_unknown_revision(backend_uri):
    db.upgrade(backend_uri)
    stamp(backend_uri, UNKNOWN_REVISION)
    with pytest.raises(RunyardError, match="migrated by a newer runyard") as caught:
        db.ensure_ready(backend_uri)
    assert caught.value.error_code == "INVALID_STATE"
    assert db.current(backend_uri)["status"] == "ahead"
    with pytest.raises(RunyardError, match="newer runyard"):
        db.upgrade(backend_uri)  # nothing we can migrate to


def test_ensure_schema_refuses_tables_without_a_revision(backend_uri):
    engine = engine_for(backend_uri)
    metadata.create_all(engine)
    engine.dispose()
    with pytest.raises(RunyardError, match="runyard did not create them"):
        db.ensure_ready(backend_uri)
    assert db.current(backend_uri)["status"] == "unmanaged"


def test_concurrent_starts_initialise_once(backend_uri):
    with ThreadPoolExecutor(max_workers=4) as pool:
        starts = [pool.submit(db.ensure_ready, backend_uri) for _ in range(4)]
    for start in starts:
        start.result()  # re-raises what the start raised
    assert db.current(backend_uri)["revision"] == HEAD


@pytest.mark.parametrize("uri", ["mssql+pymssql://u:s3cretpw@nowhere/db", "mssql", "mysql://u:s3cretpw@x/db"])
def test_offline_sql_connects_to_nothing(uri):
    report = db.upgrade(uri, sql=True)
    assert "CREATE TABLE experiments" in report["sql"] and "CREATE TABLE metrics" in report["sql"]
    assert "s3cretpw" not in str(report)


def test_offline_sql_renders_dialect_options():
    assert "\nGO\n" in runner.offline_sql("mssql")
    mysql_sql = runner.offline_sql("mysql")
    assert "COLLATE utf8mb4_bin" in mysql_sql and "ON DELETE CASCADE" in mysql_sql
    sqlite_sql = runner.offline_sql("sqlite")
    assert "WITHOUT ROWID" in sqlite_sql and "CONSTRAINT ck_runs_status CHECK" in sqlite_sql


def test_unreachable_database_is_one_clean_error():
    with pytest.raises(RunyardError) as caught:
        db.current("postgresql://postgres:s3cretpw@127.0.0.1:1/nothing")
    assert "Cannot use database postgresql://postgres:***@127.0.0.1:1/nothing" in caught.value.message
    assert "s3cretpw" not in caught.value.message and "\n" not in caught.value.message


def test_mlflow_file_store_is_refused(tmp_path):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "meta.yaml").write_text("name: Default\n")
    with pytest.raises(RunyardError, match="MLflow file store"):
        db.current(str(tmp_path))
    with pytest.raises(RunyardError, match="MLflow file store"):
        db.upgrade(str(tmp_path))


def test_current_does_not_create_a_missing_store(tmp_path):
    assert db.current(str(tmp_path / "nowhere"))["status"] == "empty"
    assert not (tmp_path / "nowhere").exists()
