"""`runyard server` options that change how it serves: worker processes, a path prefix, the Host
allow-list, and where artifacts go when the server does not proxy them."""

from __future__ import annotations

import threading
import uuid

import pytest
import requests

API = "/api/2.0/mlflow"


def _new_run(base: str) -> tuple[str, dict]:
    exp_id = requests.post(f"{base}{API}/experiments/create",
                           json={"name": f"o-{uuid.uuid4().hex}"}).json()["experiment_id"]
    run = requests.post(f"{base}{API}/runs/create", json={"experiment_id": exp_id}).json()["run"]
    return exp_id, run


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.db),
                                     pytest.param("mysql", marks=pytest.mark.db)])
def test_two_workers_share_one_store_and_lose_no_write(request, server_factory, tmp_path, backend):
    uri = str(tmp_path / "store") if backend == "sqlite" else request.getfixturevalue(
        {"postgresql": "postgres_uri", "mysql": "mysql_uri"}[backend])
    server = server_factory(uri, workers=2)
    _, run = _new_run(server.url)
    run_id = run["info"]["run_id"]
    errors = []

    def writer(worker: int) -> None:
        http = requests.Session()  # one connection each: the kernel spreads them over the workers
        for i in range(100):
            r = http.post(f"{server.url}{API}/runs/log-metric", json={
                "run_id": run_id, "key": "m", "value": i, "timestamp": worker * 1000 + i, "step": i})
            if r.status_code != 200:
                errors.append(r.text)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    history = requests.get(f"{server.url}{API}/metrics/get-history",
                           params={"run_id": run_id, "metric_key": "m"}).json()["metrics"]
    assert len(history) == 400


def test_static_prefix_moves_every_route(server_factory):
    server = server_factory(None, "--static-prefix", "/mlflow/")
    assert requests.get(f"{server.url}/mlflow/health").text == "OK"
    r = requests.post(f"{server.url}/mlflow{API}/experiments/create", json={"name": "prefixed"})
    assert r.status_code == 200, r.text
    assert requests.get(f"{server.url}/mlflow/api/3.0/mlflow/server-info").status_code == 200
    unprefixed = requests.post(f"{server.url}{API}/experiments/create", json={"name": "bare"})
    assert unprefixed.status_code == 404
    assert unprefixed.json()["error_code"] == "ENDPOINT_NOT_FOUND"


def test_host_allow_list(server_factory):
    default = server_factory()
    assert requests.get(f"{default.url}/health", headers={"Host": "10.1.2.3:5000"}).status_code == 200
    refused = requests.get(f"{default.url}{API}/experiments/get?experiment_id=0",
                           headers={"Host": "evil.example.net"})
    assert refused.status_code == 403
    assert refused.json()["error_code"] == "PERMISSION_DENIED"

    listed = server_factory(None, "--allowed-hosts", "mlflow.example.com,*.corp.example")
    for host, status in (("mlflow.example.com", 200), ("a.corp.example:443", 200), ("10.1.2.3", 403),
                         ("evil.example.net", 403)):
        assert requests.get(f"{listed.url}/health", headers={"Host": host}).status_code == status, host


def test_without_proxy_artifacts_go_to_the_configured_root(server_factory, tmp_path):
    server = server_factory(None, "--no-serve-artifacts", "--default-artifact-root", "s3://bucket/path")
    exp_id, run = _new_run(server.url)
    experiment = requests.get(f"{server.url}{API}/experiments/get",
                              params={"experiment_id": exp_id}).json()["experiment"]
    assert experiment["artifact_location"] == f"s3://bucket/path/{exp_id}"
    assert run["info"]["artifact_uri"] == f"s3://bucket/path/{exp_id}/{run['info']['run_id']}/artifacts"
    disabled = requests.get(f"{server.url}/api/2.0/mlflow-artifacts/artifacts", params={"path": exp_id})
    assert disabled.status_code == 503
    info = requests.get(f"{server.url}/api/3.0/mlflow/server-info").json()
    assert info["artifact_serving_enabled"] is False


def test_without_proxy_or_root_clients_get_the_absolute_destination(server_factory):
    server = server_factory(None, "--no-serve-artifacts")
    exp_id, run = _new_run(server.url)
    assert run["info"]["artifact_uri"] == f"{server.artifacts}/{exp_id}/{run['info']['run_id']}/artifacts"
