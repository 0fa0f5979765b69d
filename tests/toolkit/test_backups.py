"""`runyard db backup | verify | restore` against embedded SQLite, real PostgreSQL and real MariaDB.

Databases are compared with helpers.seed.fingerprint (every row, in key order, hashed in the test), not
with the toolkit's own checksums.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers.schema import NEWER_REVISION, newer_migrations
from helpers.seed import bulk_metrics, fingerprint, seed

from migrations import runner
from server.artifacts.local import LocalArtifactRepository
from server.errors import RunyardError
from server.store import schema
from server.store.tracking import TrackingStore
from server.store.uri import create_engine
from toolkit import backups, contents, db

HEAD = runner.head_revision()


def _execute(uri: str, *statements: str) -> None:
    engine = create_engine(uri, pool_size=1)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def _manifest(backup: str) -> dict:
    return json.loads((Path(backup) / "manifest.json").read_text())


def _data_file(backup: str) -> Path:
    return Path(backup) / _manifest(backup)["data_file"]


def _params_checksum(uri: str) -> str:
    engine = create_engine(uri, pool_size=1)
    try:
        with engine.connect() as conn:
            return contents.table_stats(conn)["params"]["checksum"]
    finally:
        engine.dispose()


def test_checksums_follow_content_not_insertion_order(backend_uri):
    seed(backend_uri)
    original = _params_checksum(backend_uri)
    engine = create_engine(backend_uri, pool_size=1)
    try:
        with engine.connect() as conn:
            rows = [tuple(row) for row in conn.execute(sa.select(schema.params))]
        # The same rows, inserted in reverse order after the table was emptied: same checksum.
        with engine.begin() as conn:
            conn.execute(sa.delete(schema.params))
            for run_uuid, key, value in reversed(rows):
                conn.execute(sa.insert(schema.params).values(run_uuid=run_uuid, key=key, value=value))
        assert _params_checksum(backend_uri) == original

        # Two values swapped between rows (column sums would not notice): another checksum.
        (run_a, key_a, value_a), (run_b, key_b, value_b) = rows[0], rows[1]
        with engine.begin() as conn:
            for run_uuid, key, value in ((run_a, key_a, value_b), (run_b, key_b, value_a)):
                conn.execute(sa.update(schema.params).values(value=value)
                             .where(schema.params.c.run_uuid == run_uuid, schema.params.c.key == key))
        assert value_a != value_b and _params_checksum(backend_uri) != original
    finally:
        engine.dispose()


def test_backup_then_restore_brings_every_table_back(backend_uri, tmp_path):
    run_id = seed(backend_uri)
    before = fingerprint(backend_uri)

    made = db.backup(backend_uri, str(tmp_path / "backups"))
    manifest = _manifest(made["backup"])
    assert manifest["revision"] == HEAD and manifest["database"] == db.database_id(backend_uri)
    assert manifest["tables"]["metrics"]["rows"] == 15 and manifest["tables"]["runs"]["rows"] == 3
    assert set(manifest["tables"]) == set(before)
    assert manifest["size_bytes"] == _data_file(made["backup"]).stat().st_size > 0
    assert manifest["tools"]["runyard"] and manifest["duration_s"] >= 0
    assert oct(os.stat(made["backup"]).st_mode)[-3:] != "777"

    # Lose data, add some, and leave a table the backup never had.
    _execute(backend_uri, f"DELETE FROM metrics WHERE run_uuid = '{run_id}'",
             "UPDATE params SET value = 'changed'", "CREATE TABLE ry_intruder (id INTEGER PRIMARY KEY)")
    assert fingerprint(backend_uri) != before

    report = db.restore(backend_uri, made["backup"])
    assert report["revision"] == HEAD
    assert fingerprint(backend_uri) == before
    assert db.current(backend_uri)["interrupted"] is None


def test_round_trip_of_a_million_metric_rows(backend_uri, empty_database_like, tmp_path):
    run_id = seed(backend_uri)
    bulk_metrics(backend_uri, run_id, 1_000_000)
    original = fingerprint(backend_uri)
    assert original["metrics"][0] == 1_000_015

    made = db.backup(backend_uri, str(tmp_path / "backups"))
    assert db.verify(made["backup"], using=backend_uri)["verified"] is True
    copy = empty_database_like(backend_uri)
    db.restore(copy, made["backup"])
    assert fingerprint(copy) == original


def test_backup_is_consistent_while_a_server_writes(backend_uri, tmp_path):
    """The manifest must describe exactly what the dump holds, even as writes land during the backup."""
    run_id = seed(backend_uri)
    bulk_metrics(backend_uri, run_id, 100_000)
    engine = create_engine(backend_uri, pool_size=2)
    store = TrackingStore(engine, "/tmp/artifacts")
    stop, written = threading.Event(), []

    def writer() -> None:
        step = 0
        while not stop.is_set():
            step += 1
            store.log_batch(run_id, [{"key": "live", "value": step, "timestamp": step, "step": step}], [], [])
            written.append(step)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        made = db.backup(backend_uri, str(tmp_path / "backups"))
    finally:
        stop.set()
        thread.join()
        engine.dispose()
    assert written, "the writer never wrote"
    assert db.verify(made["backup"], using=backend_uri)["verified"] is True


def test_verify_and_restore_refuse_a_damaged_backup(backend_uri, tmp_path):
    seed(backend_uri)
    before = fingerprint(backend_uri)
    made = db.backup(backend_uri, str(tmp_path / "backups"))
    data = _data_file(made["backup"])
    original = data.read_bytes()

    data.write_bytes(original[: len(original) // 2])
    for operation in (lambda: db.verify(made["backup"], using=backend_uri),
                      lambda: db.restore(backend_uri, made["backup"])):
        with pytest.raises(RunyardError, match="is damaged: .* bytes, the manifest says .*truncated"):
            operation()

    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    data.write_bytes(bytes(flipped))
    with pytest.raises(RunyardError, match="does not match its SHA-256"):
        db.restore(backend_uri, made["backup"])

    data.write_bytes(original)
    manifest_path = Path(made["backup"]) / "manifest.json"
    manifest_path.write_text("{ not json")
    with pytest.raises(RunyardError, match="manifest.json is unreadable"):
        db.restore(backend_uri, made["backup"])
    manifest_path.unlink()
    with pytest.raises(RunyardError, match="is not a runyard backup"):
        db.verify(made["backup"], using=backend_uri)
    with pytest.raises(RunyardError, match="No backup at"):
        db.verify(str(tmp_path / "nowhere"), using=backend_uri)
    assert fingerprint(backend_uri) == before


def test_a_dump_that_will_not_load_changes_nothing(backend_uri, tmp_path):
    """A backup whose manifest agrees with a dump the tools reject (made by a broken tool, say)."""
    seed(backend_uri)
    before = fingerprint(backend_uri)
    made = db.backup(backend_uri, str(tmp_path / "backups"))
    data = _data_file(made["backup"])
    data.write_bytes(b"garbage, not a dump\n" * 100)
    manifest_path = Path(made["backup"]) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(size_bytes=data.stat().st_size, sha256=backups.sha256_of(data))
    manifest_path.write_text(json.dumps(manifest))

    with pytest.raises(RunyardError, match="failed|damaged"):
        db.restore(backend_uri, made["backup"])
    assert fingerprint(backend_uri) == before
    assert db.current(backend_uri)["interrupted"] is None
    with pytest.raises(RunyardError, match="failed|damaged"):
        db.verify(made["backup"], using=backend_uri)
    if backend_uri.startswith("mysql"):  # the staging and scratch databases are gone too
        database = backend_uri.rsplit("/", 1)[1]
        engine = create_engine(backend_uri, pool_size=1)
        with engine.connect() as conn:
            names = conn.exec_driver_sql("SELECT schema_name FROM information_schema.schemata").scalars()
            left = [name for name in names if name.startswith(database) and name != database]
        engine.dispose()
        assert left == []


def test_verify_catches_a_dump_that_does_not_match_its_manifest(backend_uri, tmp_path):
    seed(backend_uri)
    made = db.backup(backend_uri, str(tmp_path / "backups"))
    manifest_path = Path(made["backup"]) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tables"]["params"]["checksum"] = "12345"
    manifest["tables"]["runs"]["rows"] += 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(RunyardError) as caught:
        db.verify(made["backup"], using=backend_uri)
    assert "does not match the backup's manifest" in caught.value.message
    assert "params: same row count, different contents" in caught.value.message
    assert "runs: 3 rows, expected 4" in caught.value.message


def test_restore_refuses_a_backup_of_another_revision(backend_uri, tmp_path, monkeypatch):
    seed(backend_uri)
    before = fingerprint(backend_uri)
    made = db.backup(backend_uri, str(tmp_path / "backups"))
    monkeypatch.setattr(runner, "SCRIPT_LOCATION", newer_migrations(tmp_path))
    db.upgrade(backend_uri, no_backup=True)
    assert db.current(backend_uri)["revision"] == NEWER_REVISION

    with pytest.raises(RunyardError, match=f"revision {HEAD} but the database is at {NEWER_REVISION}"):
        db.restore(backend_uri, made["backup"])
    assert db.current(backend_uri)["revision"] == NEWER_REVISION

    db.restore(backend_uri, made["backup"], any_revision=True)
    assert fingerprint(backend_uri) == before


@pytest.mark.db
def test_restore_refuses_a_backup_of_another_dialect(postgres_uri, tmp_path):
    sqlite_store = str(tmp_path / "store")
    seed(sqlite_store)
    made = db.backup(sqlite_store, str(tmp_path / "backups"))
    with pytest.raises(RunyardError, match="of a sqlite database; it cannot be restored into postgresql"):
        db.restore(postgres_uri, made["backup"])
    assert db.current(postgres_uri)["status"] == "empty"


def test_read_only_destination_is_a_clear_error(backend_uri, read_only_folder):
    seed(backend_uri)
    before = fingerprint(backend_uri)
    for destination in (read_only_folder, read_only_folder / "nested"):
        with pytest.raises(RunyardError, match=f"Cannot write backups to {read_only_folder}"):
            db.backup(backend_uri, str(destination))
    assert fingerprint(backend_uri) == before


def test_retention_keeps_the_newest_backups_of_this_database(tmp_path):
    mine, other = str(tmp_path / "mine"), str(tmp_path / "other")
    seed(mine)
    seed(other)
    folder = tmp_path / "backups"
    theirs = db.backup(other, str(folder))["backup"]
    made = [db.backup(mine, str(folder), keep=2) for _ in range(4)]
    assert made[-1]["pruned"] == [made[1]["backup"]]
    remaining = sorted(path for path in map(str, folder.iterdir()))
    assert remaining == sorted([theirs, made[2]["backup"], made[3]["backup"]])


def test_backups_in_an_artifact_store(tmp_path):
    """The object-store path of backups, through the artifact-store interface (here its local store)."""
    store = str(tmp_path / "store")
    seed(store)
    made = db.backup(store, str(tmp_path / "staged"))
    destination = backups.RepositoryDestination("memory://backups",
                                                LocalArtifactRepository(tmp_path / "bucket"))
    name = Path(made["backup"]).name
    assert destination.publish(Path(made["backup"]), name) == f"memory://backups/{name}"
    assert destination.names() == [name]
    assert json.loads(destination.manifest_text(name))["name"] == name
    with destination.fetch(name) as folder:
        manifest = backups.read_manifest(folder, name)
        assert backups.check_data_file(folder, manifest, name).stat().st_size == manifest["size_bytes"]
    assert backups.prune(destination, manifest["database"], keep=1) == []
    destination.remove(name)
    assert destination.names() == []


def test_unsupported_destination_scheme_names_the_scheme_only(tmp_path):
    store = str(tmp_path / "store")
    seed(store)
    with pytest.raises(RunyardError, match="'gopher' is not supported") as caught:
        db.backup(store, "gopher://user:hunter2@host/backups")
    assert "hunter2" not in caught.value.message


def test_mssql_backup_prints_the_statements_to_run():
    with pytest.raises(RunyardError) as caught:
        db.backup("mssql+pymssql://sa:s3cretpw@sqlhost/tracking", "/backups")
    message = caught.value.message
    assert ("BACKUP DATABASE [tracking] TO DISK = N'/var/opt/mssql/backup/tracking.bak' WITH COPY_ONLY"
            in message)
    assert "RESTORE VERIFYONLY" in message and "s3cretpw" not in message


def test_backup_of_a_missing_store_is_refused(tmp_path):
    with pytest.raises(RunyardError, match="no database to back up"):
        db.backup(str(tmp_path / "nothing"), str(tmp_path / "backups"))
    assert not (tmp_path / "nothing").exists()


@pytest.fixture(scope="module")
def s3_store(tmp_path_factory):
    from helpers import databases
    from helpers.stores import running

    try:
        with running("s3", tmp_path_factory.mktemp("s3")) as store:
            yield store
    except databases.Unavailable as exc:
        if os.environ.get("RUNYARD_TEST_STRICT") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def test_backups_in_s3_round_trip(s3_store, tmp_path, monkeypatch):
    """DEST as an object-store URI: backup, list, verify, restore and retention through a real S3."""
    for name, value in s3_store.env.items():
        monkeypatch.setenv(name, value)
    store = str(tmp_path / "store")
    seed(store)
    before = fingerprint(store)
    destination = s3_store.root("backups")
    made = [db.backup(store, destination, keep=2) for _ in range(3)]
    assert all(report["backup"].startswith(destination + "/runyard-backup-") for report in made)
    assert made[-1]["pruned"] == [made[0]["backup"]]
    assert db.verify(made[-1]["backup"])["verified"] is True

    _execute(store, "DELETE FROM params")
    db.restore(store, made[-1]["backup"])
    assert fingerprint(store) == before
