"""Metric writes through the store on every dialect: each has its own fast path (PostgreSQL one fused
statement, SQLite the driver's executemany, MySQL a locked read-compare-write), so the rules are
checked on all three: latest value by (step, timestamp, value), duplicates stored once, and nothing
written for a run that is deleted or unknown."""

from __future__ import annotations

import pytest

from migrations.runner import ensure_schema
from server.errors import RunyardError
from server.store.tracking import TrackingStore
from server.store.uri import create_engine


@pytest.fixture
def store(backend_uri):
    engine = create_engine(backend_uri)
    ensure_schema(engine, backend_uri)
    store = TrackingStore(engine, "mlflow-artifacts:/")
    store.ensure_default_experiment()
    yield store
    engine.dispose()


def point(value, timestamp, step, key="m"):
    return {"key": key, "value": value, "timestamp": timestamp, "step": step}


def history(store, run_id, key="m"):
    return [(m["step"], m["timestamp"], m["value"])
            for m in store.get_metric_history(run_id, key, None, None).get("metrics", [])]


def latest(store, run_id):
    metrics = store.get_run(run_id)["data"]["metrics"]
    return {m["key"]: (m["step"], m["timestamp"], m["value"]) for m in metrics}


def test_latest_value_is_the_greatest_step_then_timestamp_then_value(store):
    run_id = store.create_run("0", "u", None, None, [])["info"]["run_id"]
    for p in (point(5.0, 10, 3), point(1.0, 99, 2), point(7.0, 10, 3), point(2.0, 5, 3)):
        store.log_batch(run_id, [p], [], [])
    assert latest(store, run_id) == {"m": (3, 10, 7.0)}
    store.log_batch(run_id, [point(0.5, 1, 4), point(9.0, 1, 1)], [], [])  # within one batch too
    assert latest(store, run_id) == {"m": (4, 1, 0.5)}


def test_identical_points_are_stored_once(store):
    run_id = store.create_run("0", "u", None, None, [])["info"]["run_id"]
    batch = [point(float(i), 100 + i, i) for i in range(50)]
    store.log_batch(run_id, batch, [], [])
    store.log_batch(run_id, batch + batch[:3], [], [])
    store.log_batch(run_id, [batch[7]], [], [])
    assert len(history(store, run_id)) == 50


def test_nan_and_infinity_are_kept_apart_from_numbers(store):
    run_id = store.create_run("0", "u", None, None, [])["info"]["run_id"]
    store.log_batch(run_id, [point(float("nan"), 1, 0), point(0.0, 1, 0), point(float("inf"), 2, 0)], [], [])
    values = [m["value"] for m in store.get_metric_history(run_id, "m", None, None)["metrics"]]
    assert sorted(map(str, values)) == ["0.0", "1.7976931348623157e+308", "NaN"]


def test_deleted_or_unknown_runs_take_no_points(store):
    run_id = store.create_run("0", "u", None, None, [])["info"]["run_id"]
    store.log_batch(run_id, [point(1.0, 1, 0)], [], [])
    store.delete_run(run_id)
    with pytest.raises(RunyardError) as excinfo:
        store.log_batch(run_id, [point(2.0, 2, 1), point(3.0, 3, 2, key="other")], [], [])
    assert excinfo.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "active" in excinfo.value.message
    store.restore_run(run_id)
    assert history(store, run_id) == [(0, 1, 1.0)]
    assert latest(store, run_id) == {"m": (0, 1, 1.0)}
    with pytest.raises(RunyardError) as excinfo:
        store.log_batch("f" * 32, [point(1.0, 1, 0)], [], [])
    assert excinfo.value.error_code == "RESOURCE_DOES_NOT_EXIST"
