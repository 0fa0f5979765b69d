"""The UI-facing read routes: sampled metric histories of many runs, and the server-side artifact listing
of a run (`/mlflow/artifacts/list`), plus the presigned-URL requests a local store cannot serve."""

from __future__ import annotations

import uuid

import requests

API = "/api/2.0/mlflow"


def _run(server) -> str:
    http = requests.Session()
    exp = http.post(f"{server.url}{API}/experiments/create", json={"name": f"h-{uuid.uuid4().hex}"}).json()
    run = http.post(f"{server.url}{API}/runs/create", json={"experiment_id": exp["experiment_id"]}).json()
    return run["run"]["info"]["run_id"]


def _log_steps(server, run_id: str, steps) -> None:
    metrics = [{"key": "loss", "value": float(s), "timestamp": 1000 + s, "step": s} for s in steps]
    for start in range(0, len(metrics), 1000):
        r = requests.post(f"{server.url}{API}/runs/log-batch",
                          json={"run_id": run_id, "metrics": metrics[start:start + 1000]})
        assert r.status_code == 200, r.text


def test_bulk_interval_samples_evenly_and_keeps_both_ends(server):
    a, b = _run(server), _run(server)
    _log_steps(server, a, range(1000))
    _log_steps(server, b, range(5))
    r = requests.get(f"{server.url}{API}/metrics/get-history-bulk-interval",
                     params={"run_ids": [a, b], "metric_key": "loss", "max_results": 11})
    assert r.status_code == 200, r.text
    points = r.json()["metrics"]
    steps_a = [p["step"] for p in points if p["run_id"] == a]
    steps_b = [p["step"] for p in points if p["run_id"] == b]
    assert steps_a == [round(i * 99.9) for i in range(11)]
    assert steps_b == [0, 1, 2, 3, 4]


def test_bulk_interval_restricts_to_the_step_range(server):
    run_id = _run(server)
    _log_steps(server, run_id, range(100))
    r = requests.get(f"{server.url}{API}/metrics/get-history-bulk-interval",
                     params={"run_ids": run_id, "metric_key": "loss", "start_step": 10, "end_step": 19})
    assert [p["step"] for p in r.json()["metrics"]] == list(range(10, 20))


def test_bulk_interval_rejects_bad_arguments(server):
    run_id = _run(server)
    url = f"{server.url}{API}/metrics/get-history-bulk-interval"
    for params, needle in (({"run_ids": run_id, "metric_key": "loss", "start_step": 5}, "both"),
                           ({"run_ids": run_id, "metric_key": "loss", "max_results": 0}, "max_results"),
                           ({"run_ids": run_id, "metric_key": "loss", "start_step": 9, "end_step": 1},
                            "end_step"),
                           ({"run_ids": [uuid.uuid4().hex for _ in range(101)], "metric_key": "loss"},
                            "at most 100"),
                           ({"metric_key": "loss"}, "run_ids")):
        r = requests.get(url, params=params)
        assert r.status_code == 400, (params, r.text)
        assert r.json()["error_code"] == "INVALID_PARAMETER_VALUE"
        assert needle in r.json()["message"]


def test_bulk_history_of_unknown_run_is_not_found(server):
    r = requests.get(f"{server.url}{API}/metrics/get-history-bulk-interval",
                     params={"run_ids": uuid.uuid4().hex, "metric_key": "loss"})
    assert r.status_code == 404
    assert r.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"


def test_run_artifact_listing_returns_paths_relative_to_the_run_root(server):
    run_id = _run(server)
    run = requests.get(f"{server.url}{API}/runs/get", params={"run_id": run_id}).json()["run"]
    root = run["info"]["artifact_uri"].removeprefix("mlflow-artifacts:/")
    for name, body in (("a.txt", b"hello"), ("sub/b.bin", b"12345678")):
        r = requests.put(f"{server.url}/api/2.0/mlflow-artifacts/artifacts/{root}/{name}", data=body)
        assert r.status_code == 200, r.text
    top = requests.get(f"{server.url}{API}/artifacts/list", params={"run_id": run_id}).json()
    assert top["root_uri"] == run["info"]["artifact_uri"]
    assert top["files"] == [{"path": "a.txt", "is_dir": False, "file_size": 5},
                            {"path": "sub", "is_dir": True}]
    sub = requests.get(f"{server.url}{API}/artifacts/list", params={"run_id": run_id, "path": "sub"}).json()
    assert sub["files"] == [{"path": "sub/b.bin", "is_dir": False, "file_size": 8}]
    empty = requests.get(f"{server.url}{API}/artifacts/list", params={"run_id": run_id, "path": "none"})
    assert empty.json() == {"root_uri": run["info"]["artifact_uri"]}


def test_run_artifact_listing_refuses_escapes(server):
    run_id = _run(server)
    r = requests.get(f"{server.url}{API}/artifacts/list", params={"run_id": run_id, "path": "../../x"})
    assert r.status_code == 400
    assert r.json()["error_code"] == "INVALID_PARAMETER_VALUE"


def test_presigned_urls_are_not_implemented_for_a_local_store(server):
    run_id = _run(server)
    for kind in ("upload", "download"):
        r = requests.post(f"{server.url}{API}/artifacts/presigned-{kind}-url",
                          json={"run_id": run_id, "path": "a.txt"})
        assert r.status_code == 501
        assert r.json()["error_code"] == "NOT_IMPLEMENTED"
