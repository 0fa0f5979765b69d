"""The stock `mlflow` client (3.x) drives a real `runyard server` process through every user flow.

The core lifecycle and the concurrency test run against SQLite, PostgreSQL and MariaDB; the long tail of
flows runs against the module's SQLite server. Every check goes through the client's public API and
compares exact values, counts and order; errors are checked by `MlflowException.error_code`.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus, Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException

pytestmark = pytest.mark.e2e


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def error_code_of(call, *args, **kwargs) -> str:
    with pytest.raises(MlflowException) as info:
        call(*args, **kwargs)
    return info.value.error_code


@pytest.fixture(autouse=True)
def _client_env(monkeypatch):
    """No telemetry, and no minutes-long retry loops: a 5xx must surface at once as a failure."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    yield
    for _ in range(20):  # end runs a failed test left open; end_run pops first, so errors cannot loop
        if mlflow.active_run() is None:
            break
        with contextlib.suppress(MlflowException, requests.RequestException, OSError):  # server may be gone
            mlflow.end_run()


def connect(monkeypatch, srv) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.url)
    mlflow.set_tracking_uri(srv.url)
    return MlflowClient(tracking_uri=srv.url)


@pytest.fixture
def client(server, monkeypatch) -> MlflowClient:
    return connect(monkeypatch, server)


def new_experiment(client: MlflowClient, prefix: str = "exp", **kwargs) -> str:
    return client.create_experiment(unique(prefix), **kwargs)


# ------------------------------------------------------------------------------------------------------
# Core lifecycle, on every backend
# ------------------------------------------------------------------------------------------------------


def test_core_lifecycle_on_every_backend(server_factory, backend_uri, monkeypatch, tmp_path):
    srv = server_factory(backend_uri)
    client = connect(monkeypatch, srv)

    name = unique("core")
    exp = mlflow.set_experiment(name)
    assert exp.name == name
    assert exp.lifecycle_stage == "active"
    assert exp.artifact_location == f"mlflow-artifacts:/{exp.experiment_id}"
    assert mlflow.set_experiment(name).experiment_id == exp.experiment_id  # existing: found by name
    assert client.get_experiment_by_name(name).experiment_id == exp.experiment_id

    with mlflow.start_run(run_name="parent-run") as parent:
        mlflow.log_param("lr", 0.01)
        mlflow.log_params({"layers": 3, "activation": "relu"})
        mlflow.log_metric("loss", 0.9, step=0)
        mlflow.log_metric("loss", 0.5, step=1)
        mlflow.log_metrics({"acc": 0.75, "f1": 0.625}, step=1)
        mlflow.set_tag("team", "vision")
        mlflow.set_tags({"stage": "dev", "owner": "alice"})
        with mlflow.start_run(run_name="child-run", nested=True) as child:
            mlflow.log_metric("child_metric", 2.0)
        note = tmp_path / "note.txt"
        note.write_text("hello from the core test\n")
        mlflow.log_artifact(str(note))
        mlflow.log_text("some text", "texts/a.txt")
    parent_id, child_id = parent.info.run_id, child.info.run_id
    assert parent.info.artifact_uri == f"mlflow-artifacts:/{exp.experiment_id}/{parent_id}/artifacts"

    run = client.get_run(parent_id)
    assert run.info.run_name == "parent-run"
    assert run.info.status == "FINISHED"
    assert run.info.lifecycle_stage == "active"
    assert run.info.experiment_id == exp.experiment_id
    assert run.info.end_time >= run.info.start_time > 0
    assert run.data.params == {"lr": "0.01", "layers": "3", "activation": "relu"}
    assert run.data.metrics == {"loss": 0.5, "acc": 0.75, "f1": 0.625}
    tags = run.data.tags
    assert {k: tags[k] for k in ("team", "stage", "owner", "mlflow.runName")} == {
        "team": "vision",
        "stage": "dev",
        "owner": "alice",
        "mlflow.runName": "parent-run",
    }
    assert "mlflow.parentRunId" not in tags

    child_run = client.get_run(child_id)
    assert child_run.info.run_name == "child-run"
    assert child_run.data.tags["mlflow.parentRunId"] == parent_id
    assert child_run.data.metrics == {"child_metric": 2.0}

    history = client.get_metric_history(parent_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.9), (1, 0.5)]

    # MlflowClient.log_batch with every kind of entity
    client.log_batch(
        parent_id,
        metrics=[Metric("batch_m", float(i) / 4, 1_700_000_000_000 + i, i) for i in range(5)],
        params=[Param("batch_p", "bp")],
        tags=[RunTag("batch_t", "bt")],
    )
    run = client.get_run(parent_id)
    assert run.data.metrics["batch_m"] == 1.0
    assert run.data.params["batch_p"] == "bp"
    assert run.data.tags["batch_t"] == "bt"
    assert [(m.step, m.value, m.timestamp) for m in client.get_metric_history(parent_id, "batch_m")] == [
        (i, float(i) / 4, 1_700_000_000_000 + i) for i in range(5)
    ]

    # artifacts through the proxy
    root = sorted((f.path, f.is_dir) for f in client.list_artifacts(parent_id))
    assert root == [("note.txt", False), ("texts", True)]
    got = Path(
        mlflow.artifacts.download_artifacts(
            run_id=parent_id, artifact_path="note.txt", dst_path=str(tmp_path / "dl")
        )
    )
    assert got.read_bytes() == note.read_bytes()

    # search
    found = client.search_runs([exp.experiment_id], "metrics.loss < 0.6 and params.lr = '0.01'")
    assert [r.info.run_id for r in found] == [parent_id]
    found = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert [r.info.run_id for r in found] == [child_id]
    assert {r.info.run_id for r in client.search_runs([exp.experiment_id])} == {parent_id, child_id}

    # errors
    assert error_code_of(client.get_run, uuid.uuid4().hex) == "RESOURCE_DOES_NOT_EXIST"
    assert error_code_of(client.log_param, parent_id, "lr", "0.02") == "INVALID_PARAMETER_VALUE"
    client.log_param(parent_id, "lr", "0.01")  # same value again: a no-op
    assert error_code_of(client.create_experiment, name) == "RESOURCE_ALREADY_EXISTS"

    # delete / restore a run
    client.delete_run(child_id)
    assert client.get_run(child_id).info.lifecycle_stage == "deleted"
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [parent_id]
    assert [
        r.info.run_id for r in client.search_runs([exp.experiment_id], run_view_type=ViewType.DELETED_ONLY)
    ] == [child_id]
    client.restore_run(child_id)
    assert client.get_run(child_id).info.lifecycle_stage == "active"

    # delete / restore the experiment: its runs follow
    client.delete_experiment(exp.experiment_id)
    assert client.get_experiment(exp.experiment_id).lifecycle_stage == "deleted"
    assert client.get_run(parent_id).info.lifecycle_stage == "deleted"
    assert error_code_of(mlflow.set_experiment, name) == "INVALID_PARAMETER_VALUE"
    client.restore_experiment(exp.experiment_id)
    assert client.get_experiment(exp.experiment_id).lifecycle_stage == "active"
    assert {client.get_run(r).info.lifecycle_stage for r in (parent_id, child_id)} == {"active"}


# ------------------------------------------------------------------------------------------------------
# Many writers to one run, on every backend
# ------------------------------------------------------------------------------------------------------

THREADS = 8
CALLS_PER_THREAD = 25
BATCH_PER_THREAD = 150


def test_concurrent_writers_lose_nothing(server_factory, backend_uri, monkeypatch):
    srv = server_factory(backend_uri)
    connect(monkeypatch, srv)
    setup = MlflowClient(srv.url)
    exp_id = new_experiment(setup, "concurrency")
    run_id = setup.create_run(exp_id, run_name="shared").info.run_id
    barrier = threading.Barrier(THREADS)

    def writer(t: int) -> int:
        client = MlflowClient(srv.url)
        barrier.wait(timeout=60)
        for i in range(CALLS_PER_THREAD):
            client.log_metric(run_id, f"own_{t}", float(i), timestamp=1_000 + i, step=i)
            client.log_metric(run_id, "shared", float(t * 1000 + i), timestamp=2_000 + i, step=t * 1000 + i)
        client.log_param(run_id, f"param_{t}", str(t))
        client.log_param(run_id, "same_everywhere", "x")  # identical value from every thread: no error
        client.set_tag(run_id, f"tag_{t}", str(t))
        client.log_batch(
            run_id,
            metrics=[Metric("batched", float(i), 3_000 + i, t * 10_000 + i) for i in range(BATCH_PER_THREAD)],
        )
        return t

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        done = [f.result(timeout=600) for f in [pool.submit(writer, t) for t in range(THREADS)]]
    assert done == list(range(THREADS))

    run = setup.get_run(run_id)
    assert run.data.params == {**{f"param_{t}": str(t) for t in range(THREADS)}, "same_everywhere": "x"}
    assert {k: v for k, v in run.data.tags.items() if k.startswith("tag_")} == {
        f"tag_{t}": str(t) for t in range(THREADS)
    }
    for t in range(THREADS):
        own = setup.get_metric_history(run_id, f"own_{t}")
        assert sorted((m.step, m.value) for m in own) == [(i, float(i)) for i in range(CALLS_PER_THREAD)]
    shared = setup.get_metric_history(run_id, "shared")
    assert len(shared) == THREADS * CALLS_PER_THREAD
    assert sorted(m.step for m in shared) == sorted(
        t * 1000 + i for t in range(THREADS) for i in range(CALLS_PER_THREAD)
    )
    batched = setup.get_metric_history(run_id, "batched")
    assert len(batched) == THREADS * BATCH_PER_THREAD
    assert len({m.step for m in batched}) == THREADS * BATCH_PER_THREAD
    # latest value per key = greatest step
    assert run.data.metrics["shared"] == float((THREADS - 1) * 1000 + CALLS_PER_THREAD - 1)

    # the same batch delivered twice (a client retry) must not duplicate points
    batch = [Metric("retried", float(i) * 1.5, 5_000 + i, i) for i in range(20)]
    setup.log_batch(run_id, metrics=batch, params=[Param("retried_p", "v")], tags=[RunTag("retried_t", "v")])
    setup.log_batch(run_id, metrics=batch, params=[Param("retried_p", "v")], tags=[RunTag("retried_t", "v")])
    history = setup.get_metric_history(run_id, "retried")
    assert [(m.step, m.value, m.timestamp) for m in history] == [
        (i, float(i) * 1.5, 5_000 + i) for i in range(20)
    ]


# ------------------------------------------------------------------------------------------------------
# The long tail, on SQLite
# ------------------------------------------------------------------------------------------------------


def test_run_name_and_nested_runs(client):
    exp = mlflow.set_experiment(unique("names"))
    with mlflow.start_run() as unnamed:
        pass
    info = client.get_run(unnamed.info.run_id)
    assert info.info.run_name  # server generated a name
    assert info.data.tags["mlflow.runName"] == info.info.run_name

    with (
        mlflow.start_run(run_name="outer") as outer,
        mlflow.start_run(run_name="inner-1", nested=True) as inner1,
        mlflow.start_run(run_name="inner-2", nested=True) as inner2,
    ):
        pass
    assert client.get_run(inner1.info.run_id).data.tags["mlflow.parentRunId"] == outer.info.run_id
    assert client.get_run(inner2.info.run_id).data.tags["mlflow.parentRunId"] == inner1.info.run_id
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{outer.info.run_id}'")
    assert [r.info.run_name for r in children] == ["inner-1"]

    client.update_run(outer.info.run_id, name="renamed")
    renamed = client.get_run(outer.info.run_id)
    assert (renamed.info.run_name, renamed.data.tags["mlflow.runName"]) == ("renamed", "renamed")
    client.set_tag(outer.info.run_id, "mlflow.runName", "by-tag")
    assert client.get_run(outer.info.run_id).info.run_name == "by-tag"


def test_params_metrics_tags_values(client):
    exp_id = new_experiment(client, "values")
    run_id = client.create_run(exp_id).info.run_id
    client.log_metric(run_id, "m", 1.0, timestamp=100, step=5)
    client.log_metric(run_id, "m", 3.0, timestamp=90, step=7)
    client.log_metric(run_id, "m", 2.0, timestamp=200, step=6)
    client.log_metric(run_id, "int_metric", 7, timestamp=1, step=0)
    client.log_metric(run_id, "neg", -0.125, timestamp=2, step=-3)
    client.log_param(run_id, "long", "v" * 500)
    client.set_tag(run_id, "multi/level.key-with space", "tag value")
    client.delete_tag(run_id, "multi/level.key-with space")
    assert error_code_of(client.delete_tag, run_id, "never-set") == "RESOURCE_DOES_NOT_EXIST"

    run = client.get_run(run_id)
    # the latest value is the one with the greatest step, not the last one logged
    assert run.data.metrics == {"m": 3.0, "int_metric": 7.0, "neg": -0.125}
    assert run.data.params == {"long": "v" * 500}
    assert "multi/level.key-with space" not in run.data.tags
    history = client.get_metric_history(run_id, "m")
    assert sorted((m.step, m.timestamp, m.value) for m in history) == [
        (5, 100, 1.0),
        (6, 200, 2.0),
        (7, 90, 3.0),
    ]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "neg")] == [(-3, -0.125)]
    assert client.get_metric_history(run_id, "never-logged") == []


def test_artifacts_upload_list_download(client, tmp_path):
    exp = mlflow.set_experiment(unique("artifacts"))
    src = tmp_path / "src"
    (src / "tree" / "deeper").mkdir(parents=True)
    (src / "tree" / "a.txt").write_text("alpha\n")
    (src / "tree" / "deeper" / "b.bin").write_bytes(bytes(range(256)) * 40)
    (src / "tree" / "empty.dat").write_bytes(b"")
    single = src / "single.csv"
    single.write_text("x,y\n1,2\n")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(single))
        mlflow.log_artifact(str(single), artifact_path="sub/dir")
        mlflow.log_artifacts(str(src / "tree"), artifact_path="tree")
        mlflow.log_text("ünïcode text\n", "notes/readme.md")
        mlflow.log_dict({"lr": 0.1, "layers": [1, 2, 3]}, "config/params.json")
    run_id = run.info.run_id
    assert run.info.artifact_uri == f"mlflow-artifacts:/{exp.experiment_id}/{run_id}/artifacts"

    root = client.list_artifacts(run_id)
    assert [(f.path, f.is_dir) for f in sorted(root, key=lambda f: f.path)] == [
        ("config", True),
        ("notes", True),
        ("single.csv", False),
        ("sub", True),
        ("tree", True),
    ]
    sizes = {f.path: f.file_size for f in root}
    assert sizes["single.csv"] == len(single.read_bytes())
    tree = sorted(client.list_artifacts(run_id, "tree"), key=lambda f: f.path)
    assert [(f.path, f.is_dir, f.file_size if not f.is_dir else None) for f in tree] == [
        ("tree/a.txt", False, 6),
        ("tree/deeper", True, None),
        ("tree/empty.dat", False, 0),
    ]
    assert [f.path for f in client.list_artifacts(run_id, "sub/dir")] == ["sub/dir/single.csv"]
    assert client.list_artifacts(run_id, "no/such/dir") == []

    dl = tmp_path / "dl"
    one = Path(client.download_artifacts(run_id, "sub/dir/single.csv", str(dl / "one")))
    assert one.read_bytes() == single.read_bytes()
    whole = Path(client.download_artifacts(run_id, "tree", str(dl / "tree")))
    got = {p.relative_to(whole).as_posix(): p.read_bytes() for p in whole.rglob("*") if p.is_file()}
    want = {
        p.relative_to(src / "tree").as_posix(): p.read_bytes()
        for p in (src / "tree").rglob("*")
        if p.is_file()
    }
    assert got == want
    text = Path(client.download_artifacts(run_id, "notes/readme.md", str(dl / "t")))
    assert text.read_text(encoding="utf-8") == "ünïcode text\n"
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/config/params.json") == {
        "lr": 0.1,
        "layers": [1, 2, 3],
    }
    assert mlflow.artifacts.load_text(f"runs:/{run_id}/notes/readme.md") == "ünïcode text\n"

    # overwrite is allowed and the new bytes win
    single.write_text("x,y\n3,4\n")
    client.log_artifact(run_id, str(single))
    again = Path(client.download_artifacts(run_id, "single.csv", str(dl / "again")))
    assert again.read_text() == "x,y\n3,4\n"

    with pytest.raises(MlflowException):
        client.download_artifacts(run_id, "missing.txt", str(dl / "missing"))


LOSSES = {"r0": 0.5, "r1": 0.1, "r2": 0.9, "r3": 0.3, "r4": 0.7}


@pytest.fixture
def five_runs(client):
    exp_id = new_experiment(client, "search")
    ids = {}
    for i, (name, loss) in enumerate(LOSSES.items()):
        run = client.create_run(
            exp_id,
            run_name=name,
            tags={"team": "a" if i % 2 == 0 else "b"},
            start_time=1_700_000_000_000 + i * 1000,
        )
        rid = run.info.run_id
        client.log_batch(
            rid,
            metrics=[Metric("loss", loss, 10, 0)],
            params=[Param("model", "cnn" if i < 3 else "mlp"), Param("idx", str(i))],
        )
        if i == 4:
            client.set_terminated(rid, "FAILED")
        else:
            client.set_terminated(rid)
        ids[name] = rid
    return exp_id, ids


def names_of(runs) -> list[str]:
    return [r.info.run_name for r in runs]


def test_search_runs_filters_order_and_paging(client, five_runs):
    exp_id, ids = five_runs

    def search(filter_string="", **kw):
        return names_of(client.search_runs([exp_id], filter_string, **kw))

    assert search("metrics.loss < 0.6", order_by=["metrics.loss ASC"]) == ["r1", "r3", "r0"]
    assert search("metrics.loss >= 0.7", order_by=["metrics.loss DESC"]) == ["r2", "r4"]
    assert search("params.model = 'cnn'", order_by=["params.idx ASC"]) == ["r0", "r1", "r2"]
    assert search("params.model != 'cnn'", order_by=["params.idx DESC"]) == ["r4", "r3"]
    assert search("tags.team = 'b'", order_by=["attributes.run_name ASC"]) == ["r1", "r3"]
    assert search("attributes.run_name = 'r2'") == ["r2"]
    assert search("attributes.status = 'FAILED'") == ["r4"]
    assert search(
        "run_name LIKE 'r%' and metrics.loss > 0.2 and params.model = 'cnn'", order_by=["metrics.loss DESC"]
    ) == ["r2", "r0"]
    assert search(f"attributes.run_id IN ('{ids['r1']}', '{ids['r3']}')", order_by=["run_name DESC"]) == [
        "r3",
        "r1",
    ]
    assert search("metrics.loss > 5") == []
    assert search("params.missing = 'x'") == []
    # default order: start_time DESC
    assert search() == ["r4", "r3", "r2", "r1", "r0"]
    assert search(order_by=["metrics.loss DESC"]) == ["r2", "r4", "r0", "r3", "r1"]

    # paging with MlflowClient.search_runs: pages of two, the last page has no token
    pages, token = [], None
    for _ in range(10):  # bounded
        page = client.search_runs(
            [exp_id], "", order_by=["metrics.loss DESC"], max_results=2, page_token=token
        )
        pages.append(names_of(page))
        token = page.token
        if not token:
            break
    assert pages == [["r2", "r4"], ["r0", "r3"], ["r1"]]

    # fluent search into a DataFrame
    df = mlflow.search_runs(experiment_ids=[exp_id], order_by=["metrics.loss ASC"])
    assert isinstance(df, pd.DataFrame)
    assert len(df) == 5
    for column in (
        "run_id",
        "experiment_id",
        "status",
        "artifact_uri",
        "start_time",
        "end_time",
        "metrics.loss",
        "params.model",
        "params.idx",
        "tags.team",
        "tags.mlflow.runName",
    ):
        assert column in df.columns, column
    assert df["metrics.loss"].tolist() == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert df["tags.mlflow.runName"].tolist() == ["r1", "r3", "r0", "r4", "r2"]
    assert df["run_id"].tolist() == [ids[n] for n in ("r1", "r3", "r0", "r4", "r2")]
    assert df["params.model"].tolist() == ["cnn", "mlp", "cnn", "mlp", "cnn"]
    assert df["status"].tolist() == ["FINISHED", "FINISHED", "FINISHED", "FAILED", "FINISHED"]
    assert set(df["experiment_id"]) == {exp_id}
    filtered = mlflow.search_runs(
        experiment_ids=[exp_id], filter_string="tags.team = 'a'", order_by=["params.idx ASC"]
    )
    assert filtered["tags.mlflow.runName"].tolist() == ["r0", "r2", "r4"]
    as_list = mlflow.search_runs(
        experiment_ids=[exp_id], output_format="list", max_results=3, order_by=["metrics.loss ASC"]
    )
    assert names_of(as_list) == ["r1", "r3", "r0"]


def test_search_runs_view_types(client, five_runs):
    exp_id, ids = five_runs
    client.delete_run(ids["r0"])
    client.delete_run(ids["r3"])
    order = ["run_name ASC"]
    assert names_of(client.search_runs([exp_id], order_by=order)) == ["r1", "r2", "r4"]
    assert names_of(client.search_runs([exp_id], order_by=order, run_view_type=ViewType.DELETED_ONLY)) == [
        "r0",
        "r3",
    ]
    assert names_of(client.search_runs([exp_id], order_by=order, run_view_type=ViewType.ALL)) == [
        "r0",
        "r1",
        "r2",
        "r3",
        "r4",
    ]
    client.restore_run(ids["r3"])
    assert names_of(client.search_runs([exp_id], order_by=order)) == ["r1", "r2", "r3", "r4"]
    assert error_code_of(client.log_metric, ids["r0"], "loss", 1.0) == "INVALID_PARAMETER_VALUE"
    assert client.get_metric_history(ids["r0"], "loss")[0].value == LOSSES["r0"]
    assert len(client.get_metric_history(ids["r0"], "loss")) == 1


def test_metric_history_larger_than_one_client_page(client, server):
    exp_id = new_experiment(client, "history")
    run_id = client.create_run(exp_id).info.run_id
    total = 26_000  # the client pages get-history by 25,000
    metrics = [Metric("long", float(i) / 8, 1_000_000 + i, i) for i in range(total)]
    client.log_batch(run_id, metrics=metrics)  # the client splits this into batches of 1000
    # the server really pages at 25,000 (so the client's loop is exercised, not bypassed)
    first = requests.get(
        f"{server.url}/api/2.0/mlflow/metrics/get-history",
        params={"run_id": run_id, "metric_key": "long", "max_results": 25000},
        timeout=120,
    )
    assert first.status_code == 200
    assert len(first.json()["metrics"]) == 25000 and first.json().get("next_page_token")

    history = client.get_metric_history(run_id, "long")
    assert len(history) == total
    assert [m.step for m in history] == list(range(total))
    assert all(m.value == float(m.step) / 8 and m.timestamp == 1_000_000 + m.step for m in history)
    assert client.get_run(run_id).data.metrics == {"long": float(total - 1) / 8}


def test_delete_and_restore_experiment(client):
    name = unique("doomed")
    exp = mlflow.set_experiment(name)
    exp_id = exp.experiment_id
    with mlflow.start_run(run_name="one") as one:
        mlflow.log_metric("m", 1.0)
    two = client.create_run(exp_id, run_name="two").info.run_id
    client.delete_run(two)  # deleted before the experiment; the experiment's restore brings it back too

    client.delete_experiment(exp_id)
    deleted = client.get_experiment(exp_id)
    assert deleted.lifecycle_stage == "deleted"
    by_name = client.get_experiment_by_name(name)
    assert by_name is not None and by_name.experiment_id == exp_id and by_name.lifecycle_stage == "deleted"
    assert client.get_run(one.info.run_id).info.lifecycle_stage == "deleted"
    assert client.search_runs([exp_id]) == []
    assert {r.info.run_name for r in client.search_runs([exp_id], run_view_type=ViewType.ALL)} == {
        "one",
        "two",
    }

    with pytest.raises(MlflowException) as info:
        mlflow.set_experiment(name)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "deleted" in info.value.message
    assert error_code_of(client.create_experiment, name) == "RESOURCE_ALREADY_EXISTS"
    assert error_code_of(client.create_run, exp_id) == "INVALID_PARAMETER_VALUE"
    active = [e.experiment_id for e in client.search_experiments(filter_string=f"name = '{name}'")]
    assert active == []
    gone = client.search_experiments(view_type=ViewType.DELETED_ONLY, filter_string=f"name = '{name}'")
    assert [e.experiment_id for e in gone] == [exp_id]

    client.restore_experiment(exp_id)
    assert client.get_experiment(exp_id).lifecycle_stage == "active"
    assert mlflow.set_experiment(name).experiment_id == exp_id
    assert client.get_run(one.info.run_id).info.lifecycle_stage == "active"
    # restoring an experiment brings back every one of its runs
    assert {r.info.run_name for r in client.search_runs([exp_id])} == {"one", "two"}


def test_search_experiments_filter_order_and_pages(client):
    prefix = unique("sx")
    ids = {}
    for suffix, kind in (("b", "cv"), ("a", "nlp"), ("d", "cv"), ("c", "cv")):
        ids[suffix] = client.create_experiment(f"{prefix}-{suffix}", tags={"kind": kind})

    def names(exps):
        return [e.name.rsplit("-", 1)[1] for e in exps]

    assert names(
        client.search_experiments(filter_string=f"name LIKE '{prefix}-%'", order_by=["name DESC"])
    ) == ["d", "c", "b", "a"]
    assert names(
        client.search_experiments(
            filter_string=f"name LIKE '{prefix}-%' and tags.kind = 'cv'", order_by=["name ASC"]
        )
    ) == ["b", "c", "d"]
    assert names(
        client.search_experiments(filter_string=f"name LIKE '{prefix}-%'", order_by=["experiment_id ASC"])
    ) == ["b", "a", "d", "c"]
    assert names(
        mlflow.search_experiments(filter_string=f"name ILIKE '{prefix.upper()}-%'", order_by=["name ASC"])
    ) == ["a", "b", "c", "d"]
    pages, token = [], None
    for _ in range(10):
        page = client.search_experiments(
            filter_string=f"name LIKE '{prefix}-%'", order_by=["name ASC"], max_results=3, page_token=token
        )
        pages.append(names(page))
        token = page.token
        if not token:
            break
    assert pages == [["a", "b", "c"], ["d"]]


def test_experiment_tags_and_rename(client):
    name = unique("tagged")
    exp_id = client.create_experiment(name, tags={"owner": "alice", "kind": "cv"})
    client.set_experiment_tag(exp_id, "kind", "nlp")  # upsert
    client.set_experiment_tag(exp_id, "extra", "1")
    client.delete_experiment_tag(exp_id, "owner")
    tags = client.get_experiment(exp_id).tags
    assert {k: v for k, v in tags.items() if not k.startswith("mlflow.")} == {"kind": "nlp", "extra": "1"}
    assert error_code_of(client.delete_experiment_tag, exp_id, "owner") == "RESOURCE_DOES_NOT_EXIST"

    new_name = unique("renamed")
    client.rename_experiment(exp_id, new_name)
    assert client.get_experiment(exp_id).name == new_name
    assert client.get_experiment_by_name(new_name).experiment_id == exp_id
    assert client.get_experiment_by_name(name) is None
    other_name = unique("other")
    other = client.create_experiment(other_name)
    # a name collision is a client error (stock MLflow surfaces it as a 400 BAD_REQUEST from the database)
    assert error_code_of(client.rename_experiment, other, new_name) in (
        "RESOURCE_ALREADY_EXISTS",
        "BAD_REQUEST",
    )
    assert client.get_experiment(other).name == other_name


def test_log_input_dataset(client):
    exp = mlflow.set_experiment(unique("datasets"))
    df = pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": [0, 1, 0]})
    dataset = mlflow.data.from_pandas(df, name="train-df", targets="y")
    with mlflow.start_run() as run:
        mlflow.log_input(dataset, context="training")
        mlflow.log_input(dataset, context="training")  # re-logging the same dataset is a no-op
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    logged = inputs[0].dataset
    assert (logged.name, logged.digest, logged.source_type) == (
        "train-df",
        dataset.digest,
        dataset.to_dict()["source_type"],
    )
    assert json.loads(logged.profile) == {"num_rows": 3, "num_elements": 6}
    assert json.loads(logged.schema) == json.loads(dataset.to_dict()["schema"])
    assert {t.key: t.value for t in inputs[0].tags} == {"mlflow.data.context": "training"}
    found = client.search_runs([exp.experiment_id], "datasets.name = 'train-df'")
    assert [r.info.run_id for r in found] == [run.info.run_id]
    assert client.search_runs([exp.experiment_id], "datasets.name = 'other'") == []


class AddN(mlflow.pyfunc.PythonModel):
    def __init__(self, n):
        self.n = n

    def predict(self, context, model_input, params=None):
        return model_input["x"] + self.n


def test_pyfunc_log_model_load_and_search(client):
    exp = mlflow.set_experiment(unique("models"))
    with mlflow.start_run() as run:
        mlflow.log_param("n", 5)
        mlflow.log_metric("score", 0.75)
        info = mlflow.pyfunc.log_model(name="adder", python_model=AddN(5), pip_requirements=["mlflow"])
    model_id = info.model_id
    assert model_id.startswith("m-")

    loaded = mlflow.pyfunc.load_model(f"models:/{model_id}")
    prediction = loaded.predict(pd.DataFrame({"x": [1, 2, 10]}))
    assert list(prediction) == [6, 7, 15]

    model = mlflow.get_logged_model(model_id)
    assert model.name == "adder"
    assert model.source_run_id == run.info.run_id
    assert model.experiment_id == exp.experiment_id
    assert model.status == LoggedModelStatus.READY
    assert model.params == {"n": "5"}
    assert model.artifact_location == f"mlflow-artifacts:/{exp.experiment_id}/models/{model_id}/artifacts"

    found = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    assert [(m.model_id, m.name) for m in found] == [(model_id, "adder")]
    assert (
        mlflow.search_logged_models(
            experiment_ids=[exp.experiment_id], filter_string="name = 'nope'", output_format="list"
        )
        == []
    )
    df = mlflow.search_logged_models(experiment_ids=[exp.experiment_id])
    assert df["model_id"].tolist() == [model_id]
    outputs = client.get_run(run.info.run_id).outputs.model_outputs
    assert [o.model_id for o in outputs] == [model_id]


def test_client_errors(client):
    exp_id = new_experiment(client, "errors")
    run_id = client.create_run(exp_id).info.run_id
    assert error_code_of(client.get_run, "f" * 32) == "RESOURCE_DOES_NOT_EXIST"
    assert error_code_of(client.get_experiment, "987654321") == "RESOURCE_DOES_NOT_EXIST"
    assert client.get_experiment_by_name(unique("never-created")) is None
    assert error_code_of(client.log_metric, "f" * 32, "m", 1.0) == "RESOURCE_DOES_NOT_EXIST"
    assert error_code_of(client.create_run, "987654321") == "RESOURCE_DOES_NOT_EXIST"
    client.log_param(run_id, "p", "a")
    with pytest.raises(MlflowException) as info:
        client.log_param(run_id, "p", "b")
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    message = info.value.message
    assert "param" in message.lower() and "'a'" in message and "'b'" in message
    assert client.get_run(run_id).data.params == {"p": "a"}
    assert error_code_of(client.log_metric, run_id, "bad key!", 1.0) == "INVALID_PARAMETER_VALUE"
    assert error_code_of(client.search_runs, [exp_id], "metrics.loss >>> 1") == "INVALID_PARAMETER_VALUE"
    assert error_code_of(client.create_experiment, "") == "INVALID_PARAMETER_VALUE"
    assert client.get_run(run_id).data.metrics == {}


def test_set_experiment_by_id_and_default_experiment(client):
    default = client.get_experiment("0")
    assert default.name == "Default"
    exp_id = new_experiment(client, "by-id")
    assert mlflow.set_experiment(experiment_id=exp_id).experiment_id == exp_id
    with mlflow.start_run() as run:
        pass
    assert run.info.experiment_id == exp_id
    assert error_code_of(mlflow.set_experiment, experiment_id="987654321") == "RESOURCE_DOES_NOT_EXIST"


def test_run_timestamps_and_status(client):
    exp_id = new_experiment(client, "status")
    before = int(time.time() * 1000)
    run = client.create_run(exp_id, run_name="timed")
    assert run.info.status == "RUNNING"
    assert run.info.end_time is None
    assert run.info.start_time >= before - 60_000
    client.set_terminated(run.info.run_id, "KILLED", end_time=run.info.start_time + 5)
    done = client.get_run(run.info.run_id)
    assert (done.info.status, done.info.end_time) == ("KILLED", run.info.start_time + 5)
