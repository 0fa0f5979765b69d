"""Tracking data for backup and migration tests, and an independent way to tell two databases apart.

`seed` writes through the real store (experiments, runs, params, tags, metrics with NaN and infinities,
datasets); `bulk_metrics` adds many metric points with one INSERT … SELECT per dialect. `fingerprint`
reads every row of every table in key order and hashes them in Python: it shares no code with the
checksums in toolkit/contents.py, so tests do not grade the toolkit with its own ruler.
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa

from migrations import runner
from server.store.tracking import TrackingStore
from server.store.uri import create_engine


def seed(uri: str) -> str:
    """A migrated database with a little of everything; returns one run's id."""
    engine = create_engine(uri, pool_size=1)
    try:
        runner.upgrade(engine)
        store = TrackingStore(engine, "/tmp/artifacts")
        store.ensure_default_experiment()
        experiment = store.create_experiment("Ünïcode 'quoted' \"exp\"", None, [("team", "ml; DROP")])
        run_id = None
        for index in range(3):
            run = store.create_run(experiment, "alice", 1_700_000_000_000 + index, f"run-{index}", [])
            run_id = run["info"]["run_id"]
            points = [{"key": "loss", "value": value, "timestamp": 1_700_000_000_000 + step, "step": step}
                      for step, value in enumerate([0.5, float("nan"), float("inf"), -float("inf"), 1e-300])]
            store.log_batch(run_id, points, [("lr", "0.01"), ("note", "tab\there, newline\nthere")],
                            [("mlflow.user", "alice"), ("emoji", "🚀")])
        return run_id
    finally:
        engine.dispose()


def bulk_metrics(uri: str, run_id: str, count: int, key: str = "bulk") -> None:
    """`count` more points of metric `key` on run `run_id`, generated inside the database."""
    engine = create_engine(uri, pool_size=1)
    try:
        with engine.begin() as conn:
            dialect = conn.dialect.name
            quote = conn.dialect.identifier_preparer.quote
            columns = ", ".join(quote(c) for c in ("run_uuid", "key", "timestamp", "step", "value", "is_nan"))
            if dialect == "postgresql":
                conn.execute(sa.text(
                    f"INSERT INTO metrics ({columns}) SELECT :run, :key, 1700000000000 + n, n, n * 0.001, "
                    "false FROM generate_series(1, :count) AS n"),
                    {"run": run_id, "key": key, "count": count})
            elif dialect == "sqlite":
                conn.execute(sa.text(
                    f"WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < :count) "
                    f"INSERT INTO metrics ({columns}) SELECT :run, :key, 1700000000000 + n, n, n * 0.001, 0 "
                    "FROM s"), {"run": run_id, "key": key, "count": count})
            else:  # MariaDB's sequence engine: seq_1_to_N is a virtual table of 1..N
                conn.execute(sa.text(
                    f"INSERT INTO metrics ({columns}) SELECT :run, :key, 1700000000000 + seq, seq, "
                    f"seq * 0.001, 0 FROM seq_1_to_{int(count)}"), {"run": run_id, "key": key})
    finally:
        engine.dispose()


def fingerprint(uri: str) -> dict[str, tuple[int, str]]:
    """{table: (rows, sha256 of every row in primary-key order)} for every table but alembic's."""
    engine = create_engine(uri, pool_size=1)
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            result = {}
            for table in sorted(inspector.get_table_names()):
                columns = [c["name"] for c in inspector.get_columns(table)]
                key = inspector.get_pk_constraint(table)["constrained_columns"] or columns
                quote = conn.dialect.identifier_preparer.quote
                query = (f"SELECT {', '.join(quote(c) for c in columns)} FROM {quote(table)} "
                         f"ORDER BY {', '.join(quote(c) for c in key)}")
                digest, rows = hashlib.sha256(), 0
                streamed = conn.execution_options(stream_results=True, yield_per=20_000)
                for row in streamed.exec_driver_sql(query):
                    digest.update(repr(tuple(row)).encode())
                    rows += 1
                result[table] = (rows, digest.hexdigest())
            return result
    finally:
        engine.dispose()
